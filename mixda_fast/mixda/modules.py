"""The MixDA layer's small modules: domain adapters, the gate, BERT's output bypass.

:class:`~mixda_fast.mixda.layer.MixDAFFN` builds them. For the gate: :class:`GatePlan` decides
once whether ``ops.gate_mlp`` can compute it, :func:`run_gate` runs it, and :func:`last_token`
picks the sequence gate's input (docs/design.md section 1).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

__all__ = ["DomainAdapter", "MixDAGate", "GatePlan", "FFNOutputBypass", "mark_hf_initialized",
           "hooked", "run_gate", "last_index", "last_token"]

logger = logging.getLogger(__package__ + ".layer")   # the name this warning had in layer.py


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

    is_gate = True          # its own learning rate in MixDATrainer (core.model.gate_parameters)

    def __init__(self, in_features: int, outputs: int, hidden: int, num_linear: int,
                 dropout: float, device=None, dtype=None):
        mods: list[nn.Module] = []
        width = in_features
        for i in range(num_linear):
            if i > 0:
                mods.append(nn.ReLU())
            mods.append(nn.Dropout(dropout))
            out = outputs if i == num_linear - 1 else hidden
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


def run_gate(gate: nn.Module, params: Optional[tuple], z: torch.Tensor) -> torch.Tensor:
    """Logits (..., E) of ``gate`` for z (..., Din): one ``ops.gate_mlp`` with ``params``
    (:meth:`GatePlan.params`), or the eager gate for None. Dropout in the op needs the kernels:
    the reference's counter-based masks are slow, and the eager gate's nn.Dropout is faster."""
    if params is None or (params[2] > 0 and not ops.runs_kernels_for(z)):
        return gate(z)
    ws, bs, p = params
    logits = ops.gate_mlp(z.reshape(-1, z.shape[-1]), ws, bs, p)
    return logits.view(*z.shape[:-1], ws[-1].shape[0])


@functools.lru_cache(maxsize=64)
def _warn_unfit_mask(shape: tuple, B: int, T: int) -> None:
    """Logged once per shape."""
    logger.warning("mixda_fast: attention mask of shape %s does not fit hidden states (B=%d, T=%d); "
                   "the sequence gate reads the last position", shape, B, T)


def last_index(mask: Optional[torch.Tensor], B: int, T: int, device) -> Optional[torch.Tensor]:
    """Index of each sequence's last non-padding token among the current T positions, from the
    call's (B, L) attention mask (1 = real token; L >= T with a KV cache), or None (use position
    T - 1) when no usable 2-D mask is known."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < T:
        _warn_unfit_mask(tuple(mask.shape), B, T)
        return None
    m = mask[:, -T:].to(device=device) != 0                   # (B, T)
    return (T - 1) - m.flip(-1).int().argmax(-1)               # last True; T-1 when none


def last_token(z: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, Din): z (B, T, Din) at each sequence's last non-padding token (:func:`last_index`)."""
    B, T = z.shape[:2]
    idx = last_index(mask, B, T, z.device)
    return z[:, -1] if idx is None else z[torch.arange(B, device=z.device), idx]


class FFNOutputBypass(nn.Module):
    """Sits where the host's second projection was when that projection lives outside the FFN
    module (BERT's ``output.dense``): the patched FFN already applied it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

