"""``packed_rows``: the Python mirror of csrc/packed_rows.h, which finds tensors laid back to back
in one storage (``MixDAFFN.pack_adapters``) so K GEMMs can run as one."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["packed_rows"]


def packed_rows(ts) -> Optional[Tensor]:
    """Mirror of csrc/packed_rows.h: if the tensors are contiguous, of one dtype and trailing shape
    (first sizes may differ), and lie back to back in one storage (``MixDAFFN.pack_adapters``), a
    (sum of first sizes, ...) view over all of them (``ts[0]`` for one tensor); else None. Always
    None while tracing (fake tensors have no storage to compare), where the unpacked path is
    exactly as correct."""
    ts = list(ts)
    if not ts or torch.compiler.is_compiling():
        return None
    t0 = ts[0]
    if (type(t0) not in (Tensor, torch.nn.Parameter) or t0.dim() < 1 or not t0.is_contiguous()
            or t0.device.type not in ("cpu", "cuda") or t0.is_inference()):
        return None
    if len(ts) == 1:
        return t0
    base, nxt, rows = t0.untyped_storage().data_ptr(), t0.storage_offset() + t0.numel(), t0.shape[0]
    for t in ts[1:]:
        if (type(t) not in (Tensor, torch.nn.Parameter) or not t.is_contiguous() or t.dim() != t0.dim()
                or t.is_inference()
                or t.shape[1:] != t0.shape[1:] or t.dtype != t0.dtype or t.device != t0.device
                or t.untyped_storage().data_ptr() != base or t.storage_offset() != nxt):
            return None
        nxt += t.numel()
        rows += t.shape[0]
    size = (rows, *t0.shape[1:])
    stride = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        stride[d] = stride[d + 1] * size[d + 1]
    return t0.as_strided(size, stride, t0.storage_offset())
