"""The MixDA layer's small modules: domain adapters, the gate, BERT's output bypass.

:class:`~mixda_fast.mixda.layer.MixDAFFN` builds them; :class:`GatePlan` decides once whether
``ops.gate_mlp`` can compute a gate (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DomainAdapter", "MixDAGate", "GatePlan", "FFNOutputBypass", "mark_hf_initialized",
           "hooked"]


def mark_hf_initialized(module: nn.Module) -> None:
    """Flag every submodule and parameter as initialised, so a later HuggingFace
    ``initialize_weights()`` / ``post_init()`` (which re-inits unflagged modules one by one) leaves
    them alone: the released MixDA code lost its zero up-projection that way."""
    for m in module.modules():
        m._is_hf_initialized = True
    for p in module.parameters():
        p._is_hf_initialized = True


class DomainAdapter(nn.Module):
    """a = Wup GELU(Wdown z + bdown) + bup (Houlsby-style bottleneck, no residual of its own)."""

    def __init__(self, in_features: int, bottleneck: int, out_features: int, init: str,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, out_features, device=device, dtype=dtype)
        self.reset_parameters(init)
        mark_hf_initialized(self)  # HF's init must not overwrite the zero up-projection

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "zero_up":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:  # "normal"
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(z)))


class MixDAGate(nn.Sequential):
    """Dropout -> Linear(in, H) -> [ReLU -> Dropout -> Linear(H, H)] x (n-2) -> ReLU -> Dropout
    -> Linear(H, E): the released code's 4-Linear, width-768 gate for n = 4."""

    def __init__(self, in_features: int, num_experts: int, hidden: int, num_linear: int,
                 dropout: float, device=None, dtype=None):
        mods: list[nn.Module] = []
        width = in_features
        for i in range(num_linear):
            if i > 0:
                mods.append(nn.ReLU())
            mods.append(nn.Dropout(dropout))
            out = num_experts if i == num_linear - 1 else hidden
            mods.append(nn.Linear(width, out, device=device, dtype=dtype))
            width = out
        super().__init__(*mods)
        mark_hf_initialized(self)


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a forward (pre-)hook: a fused op that skips calling it would skip that."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


class GatePlan:
    """Whether ``ops.gate_mlp`` can compute ``gate``: a :class:`MixDAGate` of the layout it builds
    (Dropout before every Linear, ReLU between), decided once for the modules the gate holds
    now. The layer asks :meth:`holds` per call and makes a new plan after a swap."""

    def __init__(self, gate: nn.Module):
        self.gate = gate
        self.mods = tuple(gate) if type(gate) is MixDAGate else ()
        L = sum(type(m) is nn.Linear for m in self.mods)
        layout = [t for i in range(L) for t in ((nn.ReLU,) if i else ()) + (nn.Dropout, nn.Linear)]
        self.fits = bool(self.mods) and [type(m) for m in self.mods] == layout

    def holds(self, gate: nn.Module) -> bool:
        """Whether this plan still describes ``gate``: the same module, with the same modules."""
        return gate is self.gate and (type(gate) is not MixDAGate or (
            len(gate) == len(self.mods) and all(a is b for a, b in zip(gate, self.mods))))

    def params(self) -> Optional[tuple[list, list, float]]:
        """(weights, biases, dropout p) for ``ops.gate_mlp``, read now; None when the layout does
        not fit, a forward hook is on the gate or one of its modules (the op would skip it), a
        Linear has no bias, or the dropouts disagree: all inactive (eval mode or p = 0) or all
        active with one p < 1 (nn.Dropout takes p = 1, the op does not)."""
        if not self.fits or hooked(self.gate) or any(hooked(m) for m in self.mods):
            return None
        linears, dropouts = self.mods[1::3], self.mods[0::3]
        bs = [m.bias for m in linears]
        ps = {m.p if m.training else 0.0 for m in dropouts}
        if len(ps) != 1 or not 0 <= next(iter(ps)) < 1 or any(b is None for b in bs):
            return None
        return [m.weight for m in linears], bs, ps.pop()


class FFNOutputBypass(nn.Module):
    """Sits where the host's second projection was when that projection lives outside the FFN
    module (BERT's ``output.dense``): the patched FFN already applied it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

