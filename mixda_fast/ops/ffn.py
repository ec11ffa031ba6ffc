"""The fused MixDA FFN (docs/design.md section 4): ``ffn_in`` (the host FFN's first GEMM with its
activation as the epilogue) and ``mixda_out`` (second GEMM, K adapters, gate softmax and mix),
each beside the fake (meta) impls and autograd formula of its compiled ops
(``mixda_fast::ffn_in`` / ``ffn_in_backward``, ``mixda_fast::mixda_out`` / ``mixda_out_backward``).
The weight and input gradients are GEMMs here, in the dtype the kernels compute in (``_mm``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from .backend import autocast_inputs, autocast_off, check_devices, runs_kernels_for
from .packed import packed_rows
from .reference import ffn_in_ref, mixda_out_ref

__all__ = ["ffn_in", "mixda_out"]


def _fp32_gemm_for_16bit() -> bool:
    """True when this CPU has no native bf16/fp16 dot products (no AVX512-BF16 / AMX): there a
    bf16 GEMM runs ~4x slower than the same GEMM in float32, so the kernels compute 16-bit
    inputs in float32 (exact products, float32 accumulation). Mirrors csrc/cpu/mixda_ffn.cpp."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except AttributeError:
        return True
    return not (caps.get("avx512_bf16") or caps.get("amx_bf16"))


_FP32_GEMM_FOR_16BIT = _fp32_gemm_for_16bit()
_16BIT = (torch.bfloat16, torch.float16)


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b in the dtype the kernels compute in (see ``_fp32_gemm_for_16bit``), cast to out_dtype."""
    if a.device.type == "cpu" and _FP32_GEMM_FOR_16BIT and (a.dtype in _16BIT or b.dtype in _16BIT):
        return (a.float() @ b.float()).to(out_dtype)
    return (a @ b.to(a.dtype)).to(out_dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _needs(flag) -> bool:
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


# ---- ffn_in -------------------------------------------------------------------------------------

@autocast_inputs
def ffn_in(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor], b3: Optional[Tensor],
           act: int) -> tuple[Tensor, Tensor]:
    """The host FFN's first GEMM with its activation as the epilogue: (h (N, F), pre).

    x (N, d); w1, w3 (F, d) (w3: the up projection of a gated MLP, else None); biases (F,) or
    None; act an activation code of ``activations.ACTIVATIONS``. See ``ffn_in_ref``.
    Differentiable in x and the weights.
    """
    if not torch.compiler.is_compiling():
        check_devices("ffn_in", x=x, w1=w1, b1=b1, w3=w3, b3=b3)
    if runs_kernels_for(x):
        return torch.ops.mixda_fast.ffn_in.default(x, w1, b1, w3, b3, act)
    return ffn_in_ref(x, w1, b1, w3, b3, act)


if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("mixda_fast::ffn_in")
    def _ffn_in_fake(x, w1, b1, w3, b3, act):
        check_devices("ffn_in", x=x, w1=w1, b1=b1, w3=w3, b3=b3)
        if x.dim() != 2 or w1.dim() != 2 or w1.shape[1] != x.shape[1]:
            raise RuntimeError(f"ffn_in: x must have shape (N, d) and w1 (F, d), got {list(x.shape)} and "
                               f"{list(w1.shape)}")
        N, F_ = x.shape[0], w1.shape[0]
        return x.new_empty((N, F_)), x.new_empty((N, 2 * F_ if w3 is not None else F_))

    @torch.library.register_fake("mixda_fast::ffn_in_backward")
    def _ffn_in_backward_fake(grad_h, pre, act):
        return pre.new_empty(pre.shape)

    def _ffn_in_setup_context(ctx, inputs, output) -> None:
        x, w1, b1, w3, b3, act = inputs
        ctx.act = act
        ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b3 is None else b3.dtype)
        ctx.save_for_backward(x, w1, w3, output[1])
        ctx.set_materialize_grads(False)    # pre is for the backward: no zero (N, F) gradient for it

    @autocast_off
    def _ffn_in_backward(ctx, grad_h: Optional[Tensor], grad_pre: Optional[Tensor]):
        x, w1, w3, pre = ctx.saved_tensors
        if grad_h is None:
            grad_h = pre.new_zeros((pre.shape[0], w1.shape[0]))
        gp = torch.ops.mixda_fast.ffn_in_backward.default(grad_h.contiguous(), pre, ctx.act)
        if grad_pre is not None:
            gp = gp + grad_pre
        F_ = w1.shape[0]
        g1, g3 = (gp, None) if w3 is None else (gp[:, :F_], gp[:, F_:])
        need = ctx.needs_input_grad
        grad_x = grad_w1 = grad_b1 = grad_w3 = grad_b3 = None
        if need[0]:
            grad_x = _mm(g1, w1, x.dtype)
            if w3 is not None:
                grad_x = grad_x + _mm(g3, w3, x.dtype)
        if need[1]:
            grad_w1 = _mm(g1.t(), x, w1.dtype)
        if need[2]:
            grad_b1 = g1.sum(0, dtype=_acc(gp.dtype)).to(ctx.bias_dtypes[0])
        if w3 is not None and need[3]:
            grad_w3 = _mm(g3.t(), x, w3.dtype)
        if w3 is not None and need[4]:
            grad_b3 = g3.sum(0, dtype=_acc(gp.dtype)).to(ctx.bias_dtypes[1])
        return grad_x, grad_w1, grad_b1, grad_w3, grad_b3, None

    torch.library.register_autograd("mixda_fast::ffn_in", _ffn_in_backward, setup_context=_ffn_in_setup_context)


# ---- mixda_out ----------------------------------------------------------------------------------

@autocast_inputs
def mixda_out(h: Tensor, z: Tensor, w2: Tensor, b2: Optional[Tensor], wdown: list[Tensor], bdown: list[Tensor],
              wup: list[Tensor], bup: list[Tensor], logits: Tensor) -> tuple[Tensor, Tensor]:
    """FFN output + K adapters + gate softmax and mix in one op: (y (N, D), p (N, D + K r)).

    h (N, F), z (N, Din) (z may be h), w2 (D, F), b2 (D,) or None, K adapters' wdown (r, Din),
    bdown (r,), wup (D, r), bup (D,), logits (R, E) with R dividing N, E = K + 1 (paper
    mixing) or K (residual). ``p[:, :D]`` is the FFN output f. See ``mixda_out_ref``.
    Differentiable in every tensor.
    """
    if not torch.compiler.is_compiling():
        check_devices("mixda_out", h=h, z=z, w2=w2, b2=b2, wdown=wdown, bdown=bdown, wup=wup, bup=bup, logits=logits)
    if runs_kernels_for(h):
        return torch.ops.mixda_fast.mixda_out.default(h, z, w2, b2, list(wdown), list(bdown), list(wup),
                                                      list(bup), logits)
    return mixda_out_ref(h, z, w2, b2, wdown, bdown, wup, bup, logits)


if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("mixda_fast::mixda_out")
    def _mixda_out_fake(h, z, w2, b2, wdown, bdown, wup, bup, logits):
        check_devices("mixda_out", h=h, z=z, w2=w2, b2=b2, wdown=wdown, bdown=bdown, wup=wup, bup=bup, logits=logits)
        if h.dim() != 2 or w2.dim() != 2 or len(wdown) < 1:
            raise RuntimeError(f"mixda_out: h must have shape (N, F), w2 (D, F) and wdown K >= 1 tensors, got "
                               f"{list(h.shape)}, {list(w2.shape)}, {len(wdown)}")
        N, D, K, r = h.shape[0], w2.shape[0], len(wdown), wdown[0].shape[0]
        return h.new_empty((N, D)), h.new_empty((N, D + K * r))

    @torch.library.register_fake("mixda_fast::mixda_out_backward")
    def _mixda_out_backward_fake(grad_y, p, logits, wup, bup):
        N, K = p.shape[0], len(wup)
        D, r = wup[0].shape
        return p.new_empty(p.shape), logits.new_empty(logits.shape), p.new_empty((N, K * r)), p.new_empty((K, D))

    def _mixda_out_setup_context(ctx, inputs, output) -> None:
        h, z, w2, b2, wdown, bdown, wup, bup, logits = inputs
        ctx.K = len(wdown)
        ctx.b2_dtype = None if b2 is None else b2.dtype
        ctx.bdown_dtype = bdown[0].dtype
        ctx.bup_dtype = bup[0].dtype
        ctx.z_is_h = z is h
        ctx.save_for_backward(h, z, w2, logits, output[1], *wdown, *wup, *bup)
        ctx.set_materialize_grads(False)    # p is mostly for the backward: no zero gradient for it

    @autocast_off
    def _mixda_out_backward(ctx, grad_y: Optional[Tensor], grad_p_out: Optional[Tensor]):
        K = ctx.K
        h, z, w2, logits, p, *rest = ctx.saved_tensors
        wdown, wup, bup = rest[:K], rest[K:2 * K], rest[2 * K:]
        grad_y = p.new_zeros((p.shape[0], w2.shape[0])) if grad_y is None else grad_y.contiguous()
        grad_p, grad_logits, s, grad_bup = torch.ops.mixda_fast.mixda_out_backward.default(
            grad_y, p, logits, list(wup), list(bup))
        if grad_p_out is not None:
            grad_p = grad_p + grad_p_out
        D, r = w2.shape[0], wdown[0].shape[0]
        gf = grad_p[:, :D]
        ga = [grad_p[:, D + k * r:D + (k + 1) * r] for k in range(K)]
        need = ctx.needs_input_grad
        grads = [None] * 4 + [[None] * K for _ in range(4)] + [None]   # list inputs take lists
        wd_all = packed_rows(wdown)                      # packed adapters: one GEMM, not K
        w_all = packed_rows([w2, *wdown]) if ctx.z_is_h and need[0] and need[1] else None
        if w_all is not None:                            # z is h, [w2 | wdown] packed: one GEMM for both
            grads[0] = _mm(grad_p, w_all, h.dtype)
        elif need[0]:
            grads[0] = _mm(gf, w2, h.dtype)
        if need[1] and w_all is None:
            if wd_all is not None:
                grads[1] = _mm(grad_p[:, D:], wd_all, z.dtype)
            else:
                gz = _mm(ga[0], wdown[0], _acc(z.dtype))
                for k in range(1, K):
                    gz = gz + _mm(ga[k], wdown[k], _acc(z.dtype))
                grads[1] = gz.to(z.dtype)
        if need[2]:
            grads[2] = _mm(gf.t(), h, w2.dtype)
        if need[3]:
            grads[3] = gf.sum(0, dtype=_acc(grad_p.dtype)).to(ctx.b2_dtype)
        need4 = list(need[4]) if isinstance(need[4], (list, tuple)) else [bool(need[4])] * K
        if any(need4):
            if wd_all is not None and all(need4):
                grads[4] = list(_mm(grad_p[:, D:].t(), z, wd_all.dtype).split(r))
            else:
                grads[4] = [_mm(ga[k].t(), z, wdown[k].dtype) if need4[k] else None
                            for k in range(K)]
        if _needs(need[5]):
            grads[5] = [ga[k].sum(0, dtype=_acc(grad_p.dtype)).to(ctx.bdown_dtype) for k in range(K)]
        if _needs(need[6]):
            grads[6] = [_mm(grad_y.t(), s[:, k * r:(k + 1) * r], wup[k].dtype) for k in range(K)]
        if _needs(need[7]):
            grads[7] = [grad_bup[k].to(ctx.bup_dtype) for k in range(K)]
        if need[8]:
            grads[8] = grad_logits
        return tuple(grads)

    torch.library.register_autograd("mixda_fast::mixda_out", _mixda_out_backward,
                                    setup_context=_mixda_out_setup_context)
