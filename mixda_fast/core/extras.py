"""Optional dependencies: what ``import mixda_fast`` does not need, and the extra that brings it.

``pip install mixda-fast`` installs what patching, the ops and saving need (torch, transformers,
safetensors). Training reads data with ``datasets`` and runs ``transformers.Trainer``, which needs
``accelerate`` (extra ``train``); the demos and the model benchmark compare against PEFT LoRA and
plot with matplotlib (extras ``demo``, ``bench``). :func:`require` imports one of them or says,
in one line, which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or an ImportError naming ``what`` needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the package {module!r}, which is not installed: "
                          f"pip install 'mixda-fast[{extra}]'") from None
