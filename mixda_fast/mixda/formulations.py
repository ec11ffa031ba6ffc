"""The MixDA layer's mixing math in pure torch, in two equivalent formulations.

docs/design.md section 1 (Diao et al., ACL 2023, eq. 1-3). With h the FFN's intermediate activation,
f = W2 h + b2 the FFN output, adapters a_k = Wup_k GELU(Wdown_k z + bdown_k) + bup_k reading
z (= h, or the FFN input x) and gate weights g = softmax(logits):

    paper:     y = g_{K+1} f + sum_k g_k a_k
    residual:  y = f + sum_k g_k a_k            (K-way softmax)

``paper_form`` computes it as written (K adapter passes, a stack, the softmax-combine op): the
paper's formulation, the benchmark's "eager reference". ``folded_form`` computes the same with
three GEMMs: one over [W2 | Wdown_1 .. Wdown_K] (when adapters read h), the gate weight folded
into the adapter activations, one over the stacked [Wup_1 .. Wup_K]. Both take explicit tensors
so the tests and benchmarks can call them without a model.

Shapes: z (B, T, Din) adapter input; h (B, T, F); f (B, T, D); logits (B, E) per sequence or
(B, T, E) per token, E = K + 1 (paper) or K (residual); down_w (K, r, Din); down_b (K, r);
up_w (K, D, r); up_b (K, D).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops

__all__ = ["paper_form", "folded_form", "gate_weights"]


def gate_weights(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the last dim, taken in float32 for 16-bit inputs."""
    return torch.softmax(logits, dim=-1, dtype=torch.float32 if logits.dtype in (torch.bfloat16, torch.float16) else None).to(dtype)


def _combine(logits: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    # experts: E tensors (B, T, D); logits (B, E) or (B, T, E) -> (B, T, D)
    B, T, D = experts[0].shape
    stacked = torch.stack(experts, dim=0)                       # (E, B, T, D)
    if logits.dim() == 2:                                       # one gate per sequence
        return ops.softmax_combine(logits, stacked)
    E = logits.shape[-1]
    out = ops.softmax_combine(logits.reshape(B * T, E), stacked.reshape(E, B * T, 1, D))
    return out.reshape(B, T, D)


def paper_form(z, f, down_w, down_b, up_w, up_b, logits, mixing: str) -> torch.Tensor:
    """The formula as the paper writes it: every adapter on its own, then the softmax mix."""
    adapters = [F.linear(F.gelu(F.linear(z, down_w[k], down_b[k])), up_w[k], up_b[k])
                for k in range(down_w.shape[0])]
    if mixing == "paper":
        return _combine(logits, adapters + [f])
    return f + _combine(logits, adapters)


def folded_form(z, h, w2, b2, down_w, down_b, up_w, up_b, logits, mixing: str,
                f: Optional[torch.Tensor] = None, return_f: bool = False):
    """Three GEMMs: [W2 | Wdown] on h, gate-scaled GELU, stacked Wup. ``z is h`` enables the
    shared first GEMM; otherwise (adapters read x) f is W2 h on its own (or given as ``f``).
    ``return_f=True`` returns (y, f), f being the FFN output without adapters."""
    K, r, _ = down_w.shape
    D = up_w.shape[1]
    dw = down_w.reshape(K * r, -1)
    db = down_b.reshape(K * r)
    if f is None and z is h:
        bias = torch.cat([b2 if b2 is not None else dw.new_zeros(D), db])
        packed = F.linear(h, torch.cat([w2, dw]), bias)         # (B, T, D + K r)
        f, pre = packed[..., :D], packed[..., D:]
    else:
        if f is None:
            f = F.linear(h, w2, b2)
        pre = F.linear(z, dw, db)                               # (B, T, K r)
    g = gate_weights(logits, f.dtype)
    if g.dim() == 2:                                            # (B, E) -> (B, 1, E)
        g = g.unsqueeze(1)
    gk = g[..., :K]                                             # (B, T|1, K)
    B, T = pre.shape[:2]
    s = (F.gelu(pre).view(B, T, K, r) * gk.unsqueeze(-1)).view(B, T, K * r)
    up = F.linear(s, up_w.permute(1, 0, 2).reshape(D, K * r)) + gk @ up_b   # (B, T, D)
    y = g[..., K:] * f + up if mixing == "paper" else f + up
    return (y, f) if return_f else y
