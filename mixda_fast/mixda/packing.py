"""Packed storage for the MixDA layer's down-projections (``MixDAFFN.pack_adapters``).

The K adapters' down-projection weights (r, Din) and biases (r,), optionally preceded by the
host's W2 (D, F) and b2, become views of one buffer each, as ``nn.LSTM.flatten_parameters()``
does: ``h @ [W2 | Wdown_1 .. Wdown_K]^T`` is then one GEMM in the fused kernel, with nothing
copied per call. Packing keeps values, Parameter objects (so optimizer state), ``requires_grad``
and flags; in-place updates write into the buffer. The kernel checks the layout on every call
(``ops.packed_rows``), so a parameter replaced since is computed unpacked, exactly as correctly.
Functions over lists of parameters; the layer picks which.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops

__all__ = ["packable", "members", "is_packed", "pack", "release"]


def packable(params: list) -> bool:
    """Plain Parameters (no tensor subclass; CPU or CUDA storage; not inference tensors, which
    cannot become views) of one trailing shape, dtype and device."""
    p0 = params[0]
    return all(type(p) is nn.Parameter and p.layout == torch.strided and p.device.type in ("cpu", "cuda")
               and not p.is_inference() and p.dim() == p0.dim()
               and p.shape[1:] == p0.shape[1:] and p.dtype == p0.dtype and p.device == p0.device
               for p in params)


def members(ws: list, bs: list, down: Optional[nn.Module] = None) -> tuple[list, list]:
    """The weights and biases packed together: the adapters' ``ws`` and ``bs``, preceded by W2
    and b2 of the host's second projection ``down`` when the kernel can use them (an
    ``nn.Linear`` with a bias, packable with the adapters')."""
    if (down is not None and type(down) is nn.Linear and down.bias is not None
            and packable([down.weight] + ws) and packable([down.bias] + bs)):
        return [down.weight] + ws, [down.bias] + bs
    return ws, bs


def is_packed(ws: list, bs: list) -> bool:
    """True when ``ws`` and ``bs`` each lie back to back in one buffer (the kernel's layout)."""
    return ops.packed_rows(ws) is not None and ops.packed_rows(bs) is not None


@torch.no_grad()
def pack(ws: list, bs: list) -> bool:
    """Make ``ws`` and ``bs`` views of one buffer each (values unchanged); returns whether they
    are packed: never fewer than two, or parameters that are not :func:`packable`."""
    if len(ws) < 2 or not (packable(ws) and packable(bs)):
        return False
    if is_packed(ws, bs):
        return True
    with torch.inference_mode(False):              # plain tensors, usable by autograd later
        for params in (ws, bs):
            flat = torch.cat([p.detach() for p in params])      # (D + K r, F) / (K r, Din), or 1-d
            start = 0
            for p in params:
                p.data = flat[start:start + p.shape[0]]
                start += p.shape[0]
    return True


@torch.no_grad()
def release(params: list) -> None:
    """Give each parameter that shares its storage (packed) storage of its own, same values."""
    for p in params:
        if (p is not None and p.device.type in ("cpu", "cuda") and not p.is_inference()
                and p.untyped_storage().nbytes() > p.numel() * p.element_size()):
            with torch.inference_mode(False):
                p.data = p.data.clone()
