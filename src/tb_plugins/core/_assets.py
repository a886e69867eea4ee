"""Locate the data files that LiteLLM ships, without importing LiteLLM.

``import litellm`` costs seconds, but its package data files are all tb_plugins needs of it
offline: the model cost map (so prices are known, see :mod:`tb_plugins.core.pricing`) and the
tiktoken BPE files (so OpenAI token counts are exact, see
:mod:`tb_plugins.counting.bpe_files`). This module finds LiteLLM's package folder with
:func:`importlib.util.find_spec`, which reads the import system's metadata and never executes
the package.

Example:
    >>> from tb_plugins.core import _assets
    >>> path = _assets.litellm_model_cost_map()
    >>> path is None or path.name == "model_prices_and_context_window_backup.json"
    True
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

__all__ = ["litellm_model_cost_map", "litellm_package_dir"]


@functools.cache
def litellm_package_dir() -> Path | None:
    """Return LiteLLM's package folder, or ``None`` if LiteLLM is not installed.

    Example:
        >>> d = litellm_package_dir()
        >>> d is None or d.name == "litellm"
        True
    """
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        # ValueError: "litellm" is in sys.modules with no __spec__ (a test stub).
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def litellm_model_cost_map() -> Path | None:
    """Return the path of LiteLLM's bundled model cost map, if installed.

    Example:
        >>> p = litellm_model_cost_map()
        >>> p is None or p.suffix == ".json"
        True
    """
    package = litellm_package_dir()
    if package is None:
        return None
    path = package / "model_prices_and_context_window_backup.json"
    return path if path.is_file() else None
