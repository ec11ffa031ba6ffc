"""Pure-torch references of the compiled ops in ``torch.ops.mixda_fast`` (DESIGN.md section 4).

Each ``<op>_ref`` has the signature and semantics of the op it mirrors and plays three parts:
the fallback when the extension is not built (``mixda_fast.ops`` picks one or the other), the
oracle the kernel tests compare against, and the baseline of the benchmarks. Keep them plain
and obviously correct; speed belongs to the kernels. New ops add their ``_ref`` here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["softmax_combine_ref"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else (16-bit types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_softmax_combine_args(logits: Tensor, experts: Tensor, op: str = "softmax_combine") -> None:
    """The checks of csrc/mixda.cpp, with the same messages and error type (RuntimeError, as
    TORCH_CHECK raises); also used by the fake impls in ``mixda_fast.ops``. Plain ``if``s rather
    than ``torch._check``, whose message closures torch.compile cannot trace."""
    if logits.dim() != 2:
        raise RuntimeError(f"{op}: logits must have shape (R, E), got a {logits.dim()}-d tensor of shape "
                           f"{list(logits.shape)}")
    if logits.shape[1] < 1:
        raise RuntimeError(f"{op}: logits must have shape (R, E) with at least one expert (E >= 1), got "
                           f"{list(logits.shape)}")
    if experts.dim() != 4:
        raise RuntimeError(f"{op}: experts must have shape (E, R, S, D), got a {experts.dim()}-d tensor of shape "
                           f"{list(experts.shape)}")
    if experts.shape[0] != logits.shape[1] or experts.shape[1] != logits.shape[0]:
        raise RuntimeError(f"{op}: experts must have shape (E, R, S, D) with E = logits.size(1) = {logits.shape[1]} "
                           f"and R = logits.size(0) = {logits.shape[0]}, got {list(experts.shape)}")
    if experts.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{op}: experts must have dtype float32, float64, bfloat16 or float16, got {experts.dtype}")
    if logits.dtype != experts.dtype:
        raise RuntimeError(f"{op}: logits must have the same dtype as experts ({experts.dtype}), got {logits.dtype}")
    if logits.device != experts.device:
        raise RuntimeError(f"{op}: logits must be on the same device as experts ({experts.device}), got "
                           f"{logits.device}")


def softmax_combine_ref(logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax over experts, then the weighted sum of the experts' outputs.

    Args:
        logits: (R, E) gate logits, one row per gate vector (R = B with S = T tokens for a
            per-sequence gate, or R = B * T with S = 1 for a per-token gate).
        experts: (E, R, S, D) the E experts' outputs, same dtype as ``logits``.

    Returns:
        (R, S, D) in the experts' dtype:
        ``out[r, s, :] = sum_e softmax(logits[r, :])[e] * experts[e, r, s, :]``, with softmax and
        accumulation in float32 for 16-bit dtypes (float64 for float64), rounded once at the end.
    """
    _check_softmax_combine_args(logits, experts)
    acc = _acc_dtype(experts.dtype)
    w = torch.softmax(logits.to(acc), dim=-1)                   # (R, E)
    out = torch.einsum("re,ersd->rsd", w, experts.to(acc))      # (R, S, D)
    return out.to(experts.dtype)
