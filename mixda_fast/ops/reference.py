"""Pure-torch references of the compiled ops in ``torch.ops.mixda_fast`` (docs/design.md section 4).

Each ``<op>_ref`` has the signature and semantics of the op it mirrors and plays three parts:
the fallback when the extension is not built (``mixda_fast.ops`` picks one or the other), the
oracle the kernel tests compare against, and the baseline of the benchmarks. Keep them plain
and obviously correct; speed belongs to the kernels. New ops add their ``_ref`` here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ACTIVATIONS, act_ref
from .philox import dropout_keep

__all__ = ["check_softmax_combine_args", "softmax_combine_ref", "ACTIVATIONS", "act_ref", "ffn_in_ref",
           "ffn_in_backward_ref", "mixda_out_ref", "mixda_out_backward_ref", "gate_mlp_ref"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else (16-bit types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_softmax_combine_args(logits: Tensor, experts: Tensor, op: str = "softmax_combine") -> None:
    """The checks of csrc/mixda.cpp, with the same messages and error type (RuntimeError, as
    TORCH_CHECK raises); also used by the fake impls in ``mixda_fast.ops.combine``. Plain ``if``s
    rather than ``torch._check``, whose message closures torch.compile cannot trace."""
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
    check_softmax_combine_args(logits, experts)
    acc = _acc_dtype(experts.dtype)
    w = torch.softmax(logits.to(acc), dim=-1)                   # (R, E)
    out = torch.einsum("re,ersd->rsd", w, experts.to(acc))      # (R, S, D)
    return out.to(experts.dtype)


# ---- fused MixDA FFN (docs/design.md section 4, steps 0-4) ------------------------------------------

def ffn_in_ref(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor], b3: Optional[Tensor],
               act: int) -> tuple[Tensor, Tensor]:
    """The host FFN's first projection and activation.

    Args:
        x: (N, d) input rows.
        w1: (F, d) first projection (nn.Linear layout); b1: (F,) or None.
        w3: (F, d) or None: the up projection of a gated MLP (Llama: w1 = gate_proj, w3 = up_proj);
            b3: (F,) or None.
        act: activation code (``activations.ACTIVATIONS``).
        Weights may be float32 for a 16-bit ``x`` (they are cast to x's dtype here).

    Returns:
        h: (N, F) = act(x w1^T + b1), or act(x w1^T + b1) * (x w3^T + b3) when gated;
        pre: (N, F), or (N, 2F) = [x w1^T + b1 | x w3^T + b3] when gated (what the backward needs).
    """
    cast = (lambda t: None if t is None else t.to(x.dtype))
    a = F.linear(x, cast(w1), cast(b1))                         # (N, F)
    if w3 is None:
        return act_ref(act, a), a
    u = F.linear(x, cast(w3), cast(b3))                         # (N, F)
    return act_ref(act, a) * u, torch.cat([a, u], 1)


def mixda_out_ref(h: Tensor, z: Tensor, w2: Tensor, b2: Optional[Tensor], wdown: list[Tensor],
                  bdown: list[Tensor], wup: list[Tensor], bup: list[Tensor], logits: Tensor) -> tuple[Tensor, Tensor]:
    """FFN output, K adapters and the gate mix (the folded form of docs/design.md section 1).

    Args:
        h: (N, F) intermediate activation; z: (N, Din) adapter input (h itself, or the FFN input).
        w2: (D, F), b2: (D,) or None: the host's second projection.
        wdown, bdown, wup, bup: K tensors each: (r, Din), (r,), (D, r), (D,).
        logits: (R, E) gate logits, R dividing N (one gate row per S = N / R consecutive rows:
            R = B sequences of S = T tokens, or R = N tokens); E = K + 1 (paper mixing, the last
            expert is the FFN) or K (residual mixing).
        Weights may be float32 for 16-bit ``h`` (cast to h's dtype here).

    Returns:
        y: (N, D) = g_E f + sum_k g_k a_k (paper) or f + sum_k g_k a_k (residual), with
            f = h w2^T + b2, a_k = wup_k GELU(wdown_k z + bdown_k) + bup_k, g = softmax(logits)
            (in float32 for 16-bit dtypes);
        p: (N, D + K r) = [f | wdown_k z + bdown_k ...]: f and the adapter pre-activations.
    """
    dt = h.dtype
    cast = (lambda t: None if t is None else t.to(dt))
    N, K = h.shape[0], len(wdown)
    r = wdown[0].shape[0]
    f = F.linear(h, cast(w2), cast(b2))                                         # (N, D)
    pa = torch.cat([F.linear(z, cast(wdown[k]), cast(bdown[k])) for k in range(K)], 1)   # (N, K r)
    g = torch.softmax(logits.to(_acc_dtype(dt)), dim=-1).to(dt)                 # (R, E)
    g = g.repeat_interleave(N // logits.shape[0], 0)                            # (N, E)
    s = (F.gelu(pa).view(N, K, r) * g[:, :K, None]).view(N, K * r)              # g_k GELU(p_k)
    up = sum(F.linear(s[:, k * r:(k + 1) * r], cast(wup[k])) for k in range(K))
    up = up + g[:, :K] @ torch.stack([cast(b) for b in bup])                    # (N, D)
    y = (g[:, K:] * f if logits.shape[1] == K + 1 else f) + up
    return y, torch.cat([f, pa], 1)


def ffn_in_backward_ref(grad_h: Tensor, pre: Tensor, act: int) -> Tensor:
    """dL/dpre of ``ffn_in`` given dL/dh (N, F) and pre (N, F) or (N, 2F) gated; by autograd."""
    pre = pre.detach().requires_grad_()
    F_ = grad_h.shape[1]
    h = act_ref(act, pre) if pre.shape[1] == F_ else act_ref(act, pre[:, :F_]) * pre[:, F_:]
    return torch.autograd.grad(h, pre, grad_h)[0]


def mixda_out_backward_ref(grad_y: Tensor, p: Tensor, logits: Tensor, wup: list[Tensor], bup: list[Tensor]):
    """(grad_p (N, D + K r), grad_logits (R, E), s (N, K r), grad_bup (K, D)) of ``mixda_out``
    given dL/dy (N, D) and its saved p; by autograd through the same math as ``mixda_out_ref``."""
    dt = p.dtype
    N, K = p.shape[0], len(wup)
    D, r = wup[0].shape
    p = p.detach().requires_grad_()
    logits = logits.detach().requires_grad_()
    bu = torch.stack([b.to(dt) for b in bup]).requires_grad_()                 # (K, D)
    f, pa = p[:, :D], p[:, D:]
    g = torch.softmax(logits.to(_acc_dtype(dt)), dim=-1).to(dt).repeat_interleave(N // logits.shape[0], 0)
    s = (F.gelu(pa).view(N, K, r) * g[:, :K, None]).view(N, K * r)
    up = sum(F.linear(s[:, k * r:(k + 1) * r], wup[k].to(dt)) for k in range(K)) + g[:, :K] @ bu
    y = (g[:, K:] * f if logits.shape[1] == K + 1 else f) + up
    grad_p, grad_logits, grad_bup = torch.autograd.grad(y, (p, logits, bu), grad_y)
    return grad_p, grad_logits, s.detach(), grad_bup


def gate_mlp_ref(z: Tensor, weights: list[Tensor], biases: list[Tensor], p: float = 0.0,
                 seed: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
    """The gate MLP (``MixDAGate``): Linear layers with ReLU between them, and with ``p > 0``
    dropout before every Linear (masks of ``philox.dropout_keep``: the kernel's, bit for bit).

    Args:
        z: (N, Din); weights: L tensors (H_1, Din), (H_2, H_1), .., (E, H_{L-1}); biases (H_i,).
            Weights may be float32 for 16-bit ``z`` (cast to z's dtype here).
        p: dropout probability in [0, 1); seed: one int64 (CPU tensor), needed when p > 0.

    Returns:
        logits (N, E) and hidden: the L - 1 inputs of Linear layers 2..L (post-ReLU, post-dropout
        activations (N, H_i)), in z's dtype.
    """
    if not 0 <= p < 1:
        raise RuntimeError(f"gate_mlp: p (the dropout probability) must be in [0, 1), got {p}")
    if p > 0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise RuntimeError(f"gate_mlp: seed must be one int64 when p > 0, got {seed!r}")
    key = int(seed.item()) if p > 0 else 0

    def drop(a: Tensor, layer: int) -> Tensor:
        if p == 0:
            return a
        keep = dropout_keep(a.shape, p, key, layer, device=a.device)
        return (a.to(_acc_dtype(a.dtype)) * keep * (1.0 / (1.0 - p))).to(a.dtype)   # dropped inf: nan

    a, hidden = drop(z, 0), []
    for i, (w, b) in enumerate(zip(weights, biases)):
        a = F.linear(a, w.to(z.dtype), b.to(z.dtype))
        if i + 1 < len(weights):
            a = drop(torch.relu(a), i + 1)
            hidden.append(a)
    return a, hidden
