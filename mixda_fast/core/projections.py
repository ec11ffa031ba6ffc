"""What a patch may read of a host projection: an exact one's weight, any other's sizes and
output dtype only (docs/design.md section 1, "Quantized and wrapped hosts").

An *exact* projection (``nn.Linear`` or transformers' ``Conv1D``, exactly those classes) computes
``x W^T + b`` from a float weight that the fused ops can read (:func:`is_exact`, defined next to
``linear_weight`` in :mod:`.families`, the only reader of weights; re-exported here). Any other module in a projection's place is *called*, never read: bitsandbytes' ``Linear8bitLt`` /
``Linear4bit`` (subclasses of ``nn.Linear`` whose ``weight`` is int8 or packed 4-bit: a 4-bit
(64, 32) projection stores a (1024, 1) uint8 tensor), torch.ao's dynamic int8 ``Linear`` (its
weight sits behind a method, packed), PEFT's LoRA-wrapped ``Linear``. Its sizes come from
``in_features`` / ``out_features`` (its own, or its ``base_layer``'s), and modules built beside it
(adapters, gates) take the dtype it returns (:func:`output_dtype`), never the storage dtype.
:func:`quantized_modules` names the modules that store quantized weights, for a method that must
refuse them (MoDE: its experts are trainable copies of whole layers).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn as nn

from .families import is_exact, linear_weight

__all__ = ["is_exact", "projection_shape", "output_dtype", "projection_device", "floating_dtype",
           "without_backward", "is_quantized", "quantized_modules"]


def _ao_dynamic_linear() -> tuple:
    """(torch.ao's dynamic quantized Linear class,), or () where torch no longer has it (deprecated)."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError:
        return ()
    return (Linear,)


_AO_DYNAMIC_LINEAR = _ao_dynamic_linear()


def _features(m: nn.Module) -> Optional[tuple[int, int]]:
    """(out_features, in_features) where ``m`` (or the module it wraps, ``base_layer``) states them."""
    for mod in (m, getattr(m, "base_layer", None)):
        out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int) and out_f > 0 and in_f > 0:
            return out_f, in_f
    return None


def projection_shape(m: nn.Module, fn: str, what: str) -> tuple[int, int]:
    """(out, in) of a projection: an exact one's weight (nn.Linear layout), any other module's
    ``out_features`` / ``in_features`` (never its weight, which may be packed). ``fn`` and
    ``what`` (e.g. "layer 3: down projection") start the ValueError for a module without them."""
    if is_exact(m):
        return tuple(linear_weight(m)[0].shape)
    shape = _features(m)
    if shape is None:
        raise ValueError(
            f"{fn}: {what} {type(m).__name__} is not accepted: expected nn.Linear, transformers' Conv1D "
            "or a module with int in_features and out_features (its own or its base_layer's)")
    return shape


def output_dtype(m: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype ``m`` returns, which modules adding to its output (adapters, gates) must have:
    an exact projection's weight dtype; float32 for torch.ao's dynamic quantized Linear (it takes
    and returns float32 only); a wrapper's ``base_layer``'s; a floating ``weight``'s; else
    ``default``, the model's dtype: bitsandbytes' 8-bit and 4-bit Linear return their input's
    dtype, whatever the 4-bit ``compute_dtype`` they compute in (bf16 inside an fp32 model)."""
    if is_exact(m):
        return linear_weight(m)[0].dtype
    if isinstance(m, _AO_DYNAMIC_LINEAR):
        return torch.float32
    base = getattr(m, "base_layer", None)
    if isinstance(base, nn.Module):
        return output_dtype(base, default)
    weight = getattr(m, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return default


def projection_device(m: nn.Module) -> torch.device:
    """The device of ``m``'s first parameter or buffer; CPU for a module with none (torch.ao's
    dynamic quantized Linear, whose packed weight runs on the CPU only)."""
    t = next(itertools.chain(m.parameters(), m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (a quantized model's embeddings
    and norms keep it), else torch's default dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def without_backward(model: nn.Module) -> list[str]:
    """Names of the modules no gradient passes through: torch.ao's dynamic quantized Linear, for
    which PyTorch registers no autograd kernel (backward drops the gradient there and warns that
    the result may be silently incorrect)."""
    return [n for n, m in model.named_modules() if isinstance(m, _AO_DYNAMIC_LINEAR)]


def is_quantized(m: nn.Module) -> bool:
    """Whether ``m`` itself stores quantized weights: torch.ao's dynamic quantized Linear, or a
    parameter of its own that is not floating point (bitsandbytes' int8 and packed 4-bit)."""
    return isinstance(m, _AO_DYNAMIC_LINEAR) or any(
        not (p.is_floating_point() or p.is_complex()) for p in m.parameters(recurse=False))


def quantized_modules(model: nn.Module, within: Optional[list[nn.Module]] = None) -> list[tuple[str, nn.Module]]:
    """(name in ``model``, module) of every module that stores quantized weights
    (:func:`is_quantized`), in ``model``'s order; with ``within``, only those inside one of
    those modules (e.g. the transformer layers)."""
    inside = None if within is None else {id(m) for w in within for m in w.modules()}
    return [(n, m) for n, m in model.named_modules()
            if (inside is None or id(m) in inside) and is_quantized(m)]
