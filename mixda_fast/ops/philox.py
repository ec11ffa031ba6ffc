"""Pure-torch mirror of csrc/philox.h: the counter-based dropout masks of the gate MLP op.

Philox4x32-10 (Salmon et al., SC 2011; the generator of cuRAND, JAX and torch's CUDA RNG) on
int64 tensors holding 32-bit words, the 32x32 -> 64-bit products split into 16-bit halves so
no intermediate leaves int64. Element e of a layer's activation is kept when word e % 4 of
``philox(counter=(lo32(e // 4), hi32(e // 4), layer, 0), key=(lo32(seed), hi32(seed)))`` is
>= ``floor(p * 2**32)``. Plain and slow: the oracle of the kernels, never the fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox4x32_10", "dropout_threshold", "dropout_keep"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57      # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85      # key increments (golden ratio, sqrt(3) - 1)
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of m * c for a 32-bit constant m and int64 c in [0, 2^32)."""
    t_lo = (c & 0xFFFF) * m                                   # < 2^48
    t_hi = (c >> 16) * m                                      # < 2^48; m * c = t_hi 2^16 + t_lo
    low = ((t_hi & 0xFFFF) << 16) + t_lo                      # < 2^49
    return ((t_hi >> 16) + (low >> 32)) & _MASK32, low & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> list[Tensor]:
    """The four output words (int64 tensors in [0, 2^32)) for counters c0..c3 and key (k0, k1)."""
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def dropout_threshold(p: float) -> int:
    """Words >= this are kept: floor(p * 2^32), for 0 <= p < 1."""
    return min(int(p * 4294967296.0), _MASK32)


def dropout_keep(shape, p: float, seed: int, layer: int, device=None) -> Tensor:
    """Bool mask of ``shape``: which elements of layer ``layer``'s activation survive dropout ``p``
    with ``seed`` (an int64, read as its 64-bit two's complement)."""
    n = 1
    for s in shape:
        n *= int(s)
    seed &= (1 << 64) - 1
    b = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    zero = torch.zeros_like(b)
    words = philox4x32_10(b & _MASK32, b >> 32, zero + (layer & _MASK32), zero, seed & _MASK32, seed >> 32)
    return (torch.stack(words, dim=1).reshape(-1)[:n] >= dropout_threshold(p)).reshape(shape)
