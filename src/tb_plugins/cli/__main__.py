"""``python -m tb_plugins.cli``: the ``tb`` command."""

import sys

from tb_plugins.cli import main

sys.exit(main())
