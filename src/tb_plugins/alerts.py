"""Moved: see :mod:`tb_plugins.engine.alerts`."""

from tb_plugins.engine.alerts import *  # noqa: F403
from tb_plugins.engine.alerts import __all__  # noqa: F401
