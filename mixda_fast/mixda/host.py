"""The host FFN's parts, looked up once at patch time (docs/design.md section 1).

:class:`Host` holds the modules the patched FFN calls (first projection, gated up projection,
activation, second projection, post module) and decides once whether the fused ops can compute
them. It holds modules, not tensors: the weights are read from the modules on every call, so
``.to()``, an optimizer step or ``load_state_dict(assign=True)`` never leaves a stale tensor. A
module swapped after patching (a new activation, a wrapped projection) is noticed by
:meth:`Host.holds`, and the layer then builds a new Host.

Only exact projections (``core.projections.is_exact``) are ever read; a quantized or wrapped one
(bitsandbytes, torch.ao dynamic int8, PEFT LoRA) is called as a module, its sizes taken from
``in_features`` / ``out_features`` and the adapters' dtype from what it returns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..core.families import FamilySpec, linear_weight
from ..core.projections import is_exact, output_dtype, projection_device, projection_shape
from .. import ops
from ..ops.activations import activation_code
from .modules import hooked

__all__ = ["Host"]


def _links(root: nn.Module, rel_paths: list) -> tuple:
    """(parent, name, child) for every step of the dotted paths below ``root``."""
    links = {}
    for path in rel_paths:
        parent = root
        for name in path.split(".") if path else ():
            child = getattr(parent, name)
            links[(id(parent), name)] = (parent, name, child)
            parent = child
    return tuple(links.values())


class Host:
    """The modules of one host FFN, from ``host_ffn`` (the FFN module the patch replaced) by
    the paths of ``spec``; ``down_proj`` is the second projection when the patch moved it out of
    its layer (BERT), else None."""

    def __init__(self, host_ffn: nn.Module, spec: FamilySpec, down_proj: Optional[nn.Module]):
        self.host_ffn, self.down_proj = host_ffn, down_proj      # what it was built from
        sub = lambda path: host_ffn.get_submodule(spec.rel(path))   # noqa: E731
        gated = spec.gate_proj is not None
        self.first = sub(spec.gate_proj if gated else spec.up)        # W1: the activation's input
        self.act = sub(spec.act)
        self.up = sub(spec.up) if gated else None                     # W3: act(W1 x) * W3 x
        self.down = down_proj if down_proj is not None else sub(spec.down)   # W2
        self.post_module = sub(spec.post) if spec.post else None      # GPT-2's dropout after W2
        self.code = activation_code(self.act)                        # None: the fused ops lack it
        self._projections = (self.first, self.down) + ((self.up,) if gated else ())
        self._fusable = self.code is not None and all(is_exact(m) for m in self._projections)
        self._down_exact = is_exact(self.down)                        # else W2 is called, never read
        paths = (spec.up, spec.act, spec.gate_proj, spec.post, None if down_proj is not None else spec.down)
        self._links = _links(host_ffn, [spec.rel(p) for p in paths if p])

    def sizes(self, layer_index: int) -> tuple[int, int]:
        """(D, F) from W2 (D, F); a ValueError when the up projection (F, D) does not fit it.
        Shapes are (out, in) by ``core.projections.projection_shape``: never a packed weight's."""
        where = f"layer {layer_index}:"
        up = projection_shape(self.up if self.up is not None else self.first, "patch_model", where + " up projection")
        down = projection_shape(self.down, "patch_model", where + " down projection")
        if up != down[::-1]:
            raise ValueError(f"patch_model: {where} up projection {up} does not fit down projection {down}")
        return down

    def factory(self, default_dtype: torch.dtype) -> dict:
        """``device`` and ``dtype`` for modules that add to W2's output (adapters, gate): W2's
        device and the dtype it returns (``core.projections.output_dtype``; a quantized W2's
        storage is int8 or packed), ``default_dtype`` (the model's) where W2 does not say."""
        return dict(device=projection_device(self.down), dtype=output_dtype(self.down, default_dtype))

    def down_weight(self) -> Optional[tuple]:
        """(W2, b2) in nn.Linear layout where W2 is an exact projection; None where it must be
        called as a module (quantized, wrapped)."""
        return linear_weight(self.down) if self._down_exact else None

    def holds(self, host_ffn: nn.Module, down_proj: Optional[nn.Module]) -> bool:
        """Whether this Host still describes the layer's host: the same ``host_ffn`` and
        ``down_proj``, and the same module at each path (a user may swap one after patching)."""
        return (host_ffn is self.host_ffn and down_proj is self.down_proj
                and all(parent._modules.get(name) is child for parent, name, child in self._links))

    def fusable(self) -> bool:
        """Whether the fused ops compute this host exactly: decided once (exact nn.Linear/Conv1D
        projections, a known activation), plus the one per-call check: no forward hook on those
        modules (the fused ops would skip it)."""
        return self._fusable and not hooked(self.act) and not any(hooked(m) for m in self._projections)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """h (B, T, F) = act(W1 x), gated: act(W1 x) * W3 x, with the host's own modules."""
        h = self.act(self.first(x))
        return h if self.up is None else h * self.up(x)

    def fused_intermediate(self, x2: torch.Tensor) -> torch.Tensor:
        """h (N, F) for x2 (N, D) through ``ops.ffn_in`` (first GEMM and activation in one op);
        only where :meth:`fusable`."""
        w1, b1 = linear_weight(self.first)
        w3, b3 = linear_weight(self.up) if self.up is not None else (None, None)
        return ops.ffn_in(x2, w1, b1, w3, b3, self.code)[0]

    def post(self, y: torch.Tensor) -> torch.Tensor:
        """The module the host applies right after W2 (if any)."""
        return y if self.post_module is None else self.post_module(y)
