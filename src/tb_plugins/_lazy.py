"""Optional dependencies, imported on first use with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling which extra installs it.

    Example:
        >>> require("json", "core").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module!r} is needed for this feature: pip install 'tb-plugins[{extra}]' "
            f"(from a checkout: pip install -e '.[{extra}]')"
        ) from exc
