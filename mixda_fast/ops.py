"""The one place that chooses between the compiled kernels and the pure-torch references.

Layer code calls the functions here (``softmax_combine``, ...) and never branches on the backend.
The backend is process-wide:

- ``"auto"`` (default): the kernels where the extension has one for the tensors' device, else
  the reference.
- ``"cpp"``: the same, but asking for it without a built extension is an error.
- ``"torch"``: always the pure-torch reference (``mixda_fast.reference``).

Initial value from the environment variable ``MIXDA_FAST_BACKEND``; change it with
``set_backend``. The choice is a plain Python branch on module globals, so ``torch.compile``
traces it, guards on it and recompiles when it changes. For the compiled path this module also
registers, per op, a fake (meta) impl and the autograd formula (the pytorch/extension-cpp way),
so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` accept the ops.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _ext
from .reference import _check_softmax_combine_args, softmax_combine_ref

__all__ = ["BACKENDS", "BACKEND_ENV", "set_backend", "get_backend", "kernels_available", "softmax_combine"]

BACKENDS = ("auto", "cpp", "torch")
BACKEND_ENV = "MIXDA_FAST_BACKEND"

# Device types with compiled kernels, fixed once the extension is loaded.
_KERNEL_DEVICES = frozenset(_ext.built_devices())


def _resolve(name: str, what: str) -> bool:
    """Validate a backend name (``what`` names where it came from); True if it selects the kernels."""
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name == "cpp" and not _ext.EXT_AVAILABLE:
        raise RuntimeError(f"{what}={name!r} needs the compiled extension mixda_fast._C, "
                           f"which is not available: {_ext.EXT_ERROR}")
    return name != "torch" and _ext.EXT_AVAILABLE


_backend: str = os.environ.get(BACKEND_ENV, "auto")                       # what was asked for
_use_kernels: bool = _resolve(_backend, f"environment variable {BACKEND_ENV}")  # what the ops read


def set_backend(name: str) -> None:
    """Choose the implementation of every op: "auto", "cpp" (compiled kernels) or "torch" (reference)."""
    global _backend, _use_kernels
    _use_kernels = _resolve(name, "set_backend(name)")
    _backend = name


def get_backend() -> str:
    """The backend name last set ("auto", "cpp" or "torch")."""
    return _backend


def kernels_available() -> bool:
    """True when the compiled extension is loaded and has kernels for at least one device."""
    return _ext.EXT_AVAILABLE and bool(_KERNEL_DEVICES)


def _use_kernel_for(t: Tensor) -> bool:
    return _use_kernels and t.device.type in _KERNEL_DEVICES


def softmax_combine(logits: Tensor, experts: Tensor) -> Tensor:
    """``out[r, s, :] = sum_e softmax(logits[r, :])[e] * experts[e, r, s, :]``.

    logits (R, E), experts (E, R, S, D), same dtype -> (R, S, D) in that dtype; softmax and sums
    in float32 for 16-bit dtypes. Differentiable in both inputs. See ``softmax_combine_ref``.
    """
    if _use_kernel_for(experts):
        return torch.ops.mixda_fast.softmax_combine.default(logits, experts)
    return softmax_combine_ref(logits, experts)


# ---- fake impls and autograd of the compiled ops (registered only when they exist) ----------

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("mixda_fast::softmax_combine")
    def _softmax_combine_fake(logits: Tensor, experts: Tensor) -> Tensor:
        _check_softmax_combine_args(logits, experts)
        _, R, S, D = experts.shape
        return experts.new_empty((R, S, D))

    @torch.library.register_fake("mixda_fast::softmax_combine_backward")
    def _softmax_combine_backward_fake(grad_out: Tensor, logits: Tensor, experts: Tensor):
        op = "softmax_combine_backward"
        _check_softmax_combine_args(logits, experts, op)
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

    def _softmax_combine_backward(ctx, grad_out: Tensor):
        logits, experts = ctx.saved_tensors
        grad_logits, grad_experts = torch.ops.mixda_fast.softmax_combine_backward.default(
            grad_out, logits, experts)
        return (grad_logits if ctx.needs_input_grad[0] else None,
                grad_experts if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd(
        "mixda_fast::softmax_combine", _softmax_combine_backward,
        setup_context=_softmax_combine_setup_context)
