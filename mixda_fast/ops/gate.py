"""The MixDA gate MLP in one op: ``gate_mlp`` (Linear layers, ReLU, counter-based dropout) and
``dropout_seed`` (the key of its masks), beside the fake (meta) impls and autograd formula of its
compiled ops ``mixda_fast::gate_mlp`` and ``mixda_fast::gate_mlp_backward``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from .backend import autocast_inputs, autocast_off, check_devices, runs_kernels_for
from .reference import gate_mlp_ref

__all__ = ["gate_mlp", "dropout_seed"]


def dropout_seed() -> Tensor:
    """A key for the counter-based dropout masks of ``gate_mlp``: one int64 drawn from torch's
    default CPU generator, so ``torch.manual_seed`` makes the masks reproducible."""
    return torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64, device="cpu")


@autocast_inputs
def gate_mlp(z: Tensor, weights: list[Tensor], biases: list[Tensor], p: float = 0.0,
             seed: Optional[Tensor] = None) -> Tensor:
    """The gate MLP in one op: logits (N, E) of Linear layers with ReLU between them and, with
    ``p > 0``, dropout before each (the ``MixDAGate``). z (N, Din); weights (H_1, Din) ..
    (E, H_{L-1}); biases (H_i,). Masks are keyed by ``seed`` (one int64 CPU tensor; drawn by
    ``dropout_seed`` when None). Differentiable in every tensor. See ``gate_mlp_ref``."""
    if not torch.compiler.is_compiling():
        check_devices("gate_mlp", z=z, weights=weights, biases=biases)
    if p > 0 and seed is None:
        seed = dropout_seed()
    if runs_kernels_for(z):
        return torch.ops.mixda_fast.gate_mlp.default(z, list(weights), list(biases), p, seed)[0]
    return gate_mlp_ref(z, weights, biases, p, seed)[0]


# ---- fake impls and autograd of the compiled ops (registered only when they exist) ----------

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("mixda_fast::gate_mlp")
    def _gate_mlp_fake(z, weights, biases, p=0.0, seed=None):
        check_devices("gate_mlp", z=z, weights=weights, biases=biases)
        if not 0 <= p < 1 or (p > 0 and seed is None):
            raise RuntimeError(f"gate_mlp: p (the dropout probability) must be in [0, 1), with a seed when "
                               f"p > 0; got p = {p}, seed {'None' if seed is None else 'given'}")
        if z.dim() != 2 or len(weights) < 1:
            raise RuntimeError(f"gate_mlp: z must have shape (N, Din) and weights L >= 1 tensors, got "
                               f"{list(z.shape)} and {len(weights)}")
        N = z.shape[0]
        return z.new_empty((N, weights[-1].shape[0])), [z.new_empty((N, w.shape[0])) for w in weights[:-1]]

    @torch.library.register_fake("mixda_fast::gate_mlp_backward")
    def _gate_mlp_backward_fake(grad_logits, z, weights, hidden, p=0.0, seed=None, grad_z=True):
        return (z.new_empty(z.shape if grad_z else (0,)), [w.new_empty(w.shape) for w in weights],
                [w.new_empty((w.shape[0],)) for w in weights])

    def _gate_mlp_setup_context(ctx, inputs, output) -> None:
        z, weights, biases, p, seed = inputs           # defaults filled in by torch.library
        ctx.L, ctx.p = len(weights), p
        ctx.bias_dtypes = [b.dtype for b in biases]
        ctx.save_for_backward(z, seed, *weights, *output[1])

    @autocast_off
    def _gate_mlp_backward(ctx, grad_logits: Tensor, grad_hidden):
        # hidden is returned for this backward only (ops.gate_mlp drops it): not differentiable
        z, seed, *rest = ctx.saved_tensors
        weights, hidden = rest[:ctx.L], rest[ctx.L:]
        need_z = ctx.needs_input_grad[0]
        grad_z, grad_w, grad_b = torch.ops.mixda_fast.gate_mlp_backward.default(
            grad_logits, z, list(weights), list(hidden), ctx.p, seed, need_z)
        grads = (grad_z if need_z else None, list(grad_w),
                 [g.to(dt) for g, dt in zip(grad_b, ctx.bias_dtypes)], None, None)
        # The dispatcher drops trailing arguments equal to their defaults from the call, and
        # the backward must match the call: needs_input_grad has its length.
        return grads[:len(ctx.needs_input_grad)]

    torch.library.register_autograd("mixda_fast::gate_mlp", _gate_mlp_backward,
                                    setup_context=_gate_mlp_setup_context)
