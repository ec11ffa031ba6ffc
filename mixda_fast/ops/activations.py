"""The fused ops' activation codes (``reference.ACTIVATIONS``) for host activation modules."""

from __future__ import annotations

import functools
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F


def activation_code(act: nn.Module) -> Optional[int]:
    """The ``ffn_in`` activation code (``reference.ACTIVATIONS``) of a host activation module,
    or None when the fused ops do not know it (the layer then runs the folded torch form).
    Exact types only: a subclass may compute something else."""
    t = type(act)
    if t is nn.GELU:
        return 1 if act.approximate == "none" else 2
    if t is nn.SiLU:
        return 4
    if t is nn.ReLU:
        return 5
    if t.__module__ != "transformers.activations":
        return None
    if t.__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return 1
    if t.__name__ == "GELUTanh":
        fn = getattr(act, "act", None)
        if isinstance(fn, functools.partial) and fn.func is F.gelu and fn.keywords == {"approximate": "tanh"}:
            return 2
        return None
    if t.__name__ == "NewGELUActivation":
        return 3
    if t.__name__ == "SiLUActivation":
        return 4
    return None
