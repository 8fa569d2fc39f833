"""Optional dependencies: imported where one feature needs them, with a message saying how to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, feature: str, extra: str) -> ModuleType:
    """Import ``module`` for ``feature``; ImportError naming the pip extra that provides it if missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{feature} needs {top}: pip install 'renyiprune[{extra}]' ({e})") from e
