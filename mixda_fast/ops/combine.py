"""``softmax_combine``: the softmax-weighted sum of E experts' outputs (the gate mix of the MixDA
"paper" formulation and of MoDE blocks), beside the fake (meta) impls and autograd formula of its
compiled ops ``mixda_fast::softmax_combine`` and ``mixda_fast::softmax_combine_backward``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from .backend import autocast_inputs, autocast_off, check_devices, runs_kernels_for
from .reference import check_softmax_combine_args, softmax_combine_ref

__all__ = ["softmax_combine"]


@autocast_inputs
def softmax_combine(logits: Tensor, experts: Tensor) -> Tensor:
    """``out[r, s, :] = sum_e softmax(logits[r, :])[e] * experts[e, r, s, :]``.

    logits (R, E), experts (E, R, S, D), same dtype -> (R, S, D) in that dtype; softmax and sums
    in float32 for 16-bit dtypes. Differentiable in both inputs. See ``softmax_combine_ref``.
    """
    if not torch.compiler.is_compiling():
        check_devices("softmax_combine", logits=logits, experts=experts)
    if runs_kernels_for(experts):
        return torch.ops.mixda_fast.softmax_combine.default(logits, experts)
    return softmax_combine_ref(logits, experts)


# ---- fake impls and autograd of the compiled op (registered only when it exists) ------------

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("mixda_fast::softmax_combine")
    def _softmax_combine_fake(logits: Tensor, experts: Tensor) -> Tensor:
        check_devices("softmax_combine", logits=logits, experts=experts)
        check_softmax_combine_args(logits, experts)
        _, R, S, D = experts.shape
        return experts.new_empty((R, S, D))

    @torch.library.register_fake("mixda_fast::softmax_combine_backward")
    def _softmax_combine_backward_fake(grad_out: Tensor, logits: Tensor, experts: Tensor):
        op = "softmax_combine_backward"
        check_softmax_combine_args(logits, experts, op)
        if grad_out.shape != experts.shape[1:]:
            raise RuntimeError(f"{op}: grad_out must have shape (R, S, D) = {list(experts.shape[1:])} "
                               f"(experts.shape[1:]), got {list(grad_out.shape)}")
        if grad_out.dtype != experts.dtype:
            raise RuntimeError(f"{op}: grad_out must have the same dtype as experts ({experts.dtype}), "
                               f"got {grad_out.dtype}")
        return logits.new_empty(logits.shape), experts.new_empty(experts.shape)

    def _softmax_combine_setup_context(ctx, inputs, output) -> None:
        logits, experts = inputs
        ctx.save_for_backward(logits, experts)  # w is recomputed in backward: (R, E) is cheap

    @autocast_off
    def _softmax_combine_backward(ctx, grad_out: Tensor):
        logits, experts = ctx.saved_tensors
        grad_logits, grad_experts = torch.ops.mixda_fast.softmax_combine_backward.default(
            grad_out, logits, experts)
        return (grad_logits if ctx.needs_input_grad[0] else None,
                grad_experts if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd(
        "mixda_fast::softmax_combine", _softmax_combine_backward,
        setup_context=_softmax_combine_setup_context)
