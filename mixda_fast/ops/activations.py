"""The activation codes of ``ffn_in``: the one Python table of them.

The same codes are the ``enum class Act`` of csrc/activations.h, which the kernels switch on
(tests/ops/test_activations.py checks that the two agree). Here: the table (``ACTIVATIONS``,
code -> name), ``activation_code`` (the code of a host activation module, or None when the
fused ops do not compute it) and ``act_ref`` (the activation of a code, in pure torch).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IDENTITY", "GELU", "GELU_TANH", "GELU_NEW", "SILU", "RELU", "ACTIVATIONS", "activation_code", "act_ref"]

IDENTITY, GELU, GELU_TANH, GELU_NEW, SILU, RELU = 0, 1, 2, 3, 4, 5

ACTIVATIONS = {IDENTITY: "identity", GELU: "gelu", GELU_TANH: "gelu_tanh", GELU_NEW: "gelu_new", SILU: "silu",
               RELU: "relu"}
"""Activation codes of ``ffn_in``: the host FFN activations the kernels implement."""


def activation_code(act: nn.Module) -> Optional[int]:
    """The ``ffn_in`` activation code (``ACTIVATIONS``) of a host activation module, or None
    when the fused ops do not know it (the layer then runs the folded torch form).
    Exact types only: a subclass may compute something else."""
    t = type(act)
    if t is nn.GELU:
        return GELU if act.approximate == "none" else GELU_TANH
    if t is nn.SiLU:
        return SILU
    if t is nn.ReLU:
        return RELU
    if t.__module__ != "transformers.activations":
        return None
    if t.__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return GELU
    if t.__name__ == "GELUTanh":
        fn = getattr(act, "act", None)
        if isinstance(fn, functools.partial) and fn.func is F.gelu and fn.keywords == {"approximate": "tanh"}:
            return GELU_TANH
        return None
    if t.__name__ == "NewGELUActivation":
        return GELU_NEW
    if t.__name__ == "SiLUActivation":
        return SILU
    return None


def act_ref(act: int, x: Tensor) -> Tensor:
    """The activation of code ``act``, computed as the host module computes it (so a patched FFN
    matches the host bit for bit): ``GELU_NEW`` is transformers' NewGELUActivation formula, op by op."""
    if act == IDENTITY:
        return x
    if act == GELU:
        return F.gelu(x)
    if act == GELU_TANH:
        return F.gelu(x, approximate="tanh")
    if act == GELU_NEW:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if act == SILU:
        return F.silu(x)
    if act == RELU:
        return F.relu(x)
    raise RuntimeError(f"ffn_in: act must be an activation code 0..5 ({ACTIVATIONS}), got {act}")
