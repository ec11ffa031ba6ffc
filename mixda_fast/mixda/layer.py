"""The patched feed-forward network: host FFN + K domain adapters + softmax gate (MixDA).

DESIGN.md section 1. :class:`MixDAFFN` replaces one layer's FFN module in place and keeps the
original as ``base_layer`` (PEFT's shape); it computes the whole FFN with the host's own
projections and activation (:class:`~.host.Host`), so with the adapters switched off it is the
host FFN bit for bit. What can be decided at patch time is decided then (the host's parts and
whether the fused ops can compute them, the gate's layout); a forward picks one computation.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn as nn

from ..core.call_state import CallState, StopForward
from .config import MixDAConfig
from ..core.families import FamilySpec, linear_weight
from .. import ops
from . import packing
from .formulations import folded_form, paper_form
from .host import Host
from .modules import DomainAdapter, FFNOutputBypass, GatePlan, MixDAGate, mark_hf_initialized  # noqa: F401

__all__ = ["DomainAdapter", "MixDAGate", "MixDAFFN", "FFNOutputBypass", "last_index"]

logger = logging.getLogger(__name__)


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


class MixDAFFN(nn.Module):
    """One layer's FFN with K domain adapters in parallel with W2 and a softmax gate.

    ``formulation`` picks how it is computed; all give the same result:

    - "fused" (default): the fused ops ``ops.ffn_in`` (first GEMM + activation) and
      ``ops.mixda_out`` (second GEMM, adapters, gate softmax and mix), compiled kernels or their
      torch references per ``mixda_fast.set_backend``. Hosts the ops cannot compute exactly
      (``Host.fusable``: an activation they do not know, another projection type, a forward
      hook) run "folded" instead.
    - "folded": three GEMMs in torch (``formulations.folded_form``).
    - "paper": the eager paper form, every adapter on its own (``formulations.paper_form``).

    ``adapters_enabled = False`` makes the module the host FFN exactly.
    """

    FORMULATIONS = ("fused", "folded", "paper")

    def __init__(self, base_layer: nn.Module, spec: FamilySpec, config: MixDAConfig,
                 down_proj: Optional[nn.Module], calls: CallState, layer_index: int):
        super().__init__()
        self.base_layer = base_layer
        # The second projection lives inside base_layer for GPT-2/Llama; for BERT it is moved here.
        self.down_proj = down_proj
        self._spec = spec
        self._calls = calls                  # per-call state: attention mask, old-knowledge captures
        self.layer_index = layer_index
        self.mixda_config = config
        self.formulation = "fused"
        self.adapters_enabled = True
        self._host = host = Host(base_layer, spec, down_proj)
        up_w, _ = linear_weight(host.up if host.up is not None else host.first)
        down_w, _ = linear_weight(host.down)
        self.hidden_size, self.intermediate_size = down_w.shape[0], down_w.shape[1]
        if up_w.shape[0] != self.intermediate_size or up_w.shape[1] != self.hidden_size:
            raise ValueError(f"patch_model: layer {layer_index}: up projection {tuple(up_w.shape)} "
                             f"does not fit down projection {tuple(down_w.shape)}")
        z_width = self.intermediate_size if config.adapter_input == "intermediate" else self.hidden_size
        self.bottleneck = self.intermediate_size // config.reduction_factor
        if self.bottleneck < 1:
            raise ValueError(
                f"MixDAConfig.reduction_factor={config.reduction_factor} is not accepted for this model: "
                f"the bottleneck intermediate_size // reduction_factor = {self.intermediate_size} // "
                f"{config.reduction_factor} = 0; use a reduction_factor <= {self.intermediate_size}")
        factory = dict(device=down_w.device, dtype=down_w.dtype)
        self.adapters = nn.ModuleDict({
            name: DomainAdapter(z_width, self.bottleneck, self.hidden_size, config.adapter_init, **factory)
            for name in config.domains})
        self.gate = MixDAGate(z_width, config.num_experts, config.gate_hidden, config.gate_layers,
                              config.gate_dropout, **factory)
        self._gate_plan = GatePlan(self.gate)

    @property
    def host(self) -> Host:
        """The host FFN's parts (:class:`~.host.Host`): built at patch time, built again only
        after one of its modules was swapped (checked here, on each use)."""
        host = self._host
        if not host.holds(self.base_layer, self.down_proj):
            host = self._host = Host(self.base_layer, self._spec, self.down_proj)
        return host

    def host_intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """h (B, T, F) = act(W1 x) (gated: act(W_gate x) * W_up x), with the host's own modules."""
        return self.host.intermediate(x)

    # -- packed weights (packing.py) ---------------------------------------------------------
    def _pack_members(self, host: bool) -> tuple[list, list]:
        """The K adapters' down-projection weights and biases, preceded by the host's W2 and b2
        when ``host`` and the kernel can use them (adapters reading h)."""
        ads = list(self.adapters.values())
        down = self.host.down if host and self.mixda_config.adapter_input == "intermediate" else None
        return packing.members([a.down.weight for a in ads], [a.down.bias for a in ads], down)

    def adapters_packed(self, host: bool = False) -> bool:
        """Whether the K adapters' down-projections (with ``host``, preceded by W2 and b2 where
        :meth:`pack_adapters` packs them) lie back to back in one buffer: one GEMM in the kernel."""
        return packing.is_packed(*self._pack_members(host))

    def pack_adapters(self, host: bool = False) -> bool:
        """Make the K adapters' down-projection weights and biases (with ``host``, W2 and b2
        first: BERT-style hosts, adapters reading h) views of one buffer each (``packing``);
        returns whether they are packed. ``patch_model``, ``.to()`` and ``copy.deepcopy`` pack;
        a forward never does, so threads may share a patched model. A parameter replaced since
        runs unpacked, exactly as correct, until this is called again. :meth:`release_host_weights`
        (``unpatch_model``) gives W2 and b2 storage of their own again."""
        return packing.pack(*self._pack_members(host))

    def pack_for_forward(self) -> bool:
        """:meth:`pack_adapters`, with W2 and b2 when the fused forward computes this host."""
        return self.pack_adapters(host=self.host.fusable())

    def release_host_weights(self) -> None:
        """Give the host's W2 and b2 storage of their own again (same values), so the unpatched
        model keeps no buffer of ours alive."""
        down = self.host.down
        if type(down) is nn.Linear:
            packing.release([down.weight, down.bias])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)          # .to() / .half() / .cuda() replace the parameters' storage
        self.pack_for_forward()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)          # copy.deepcopy gives each parameter storage of its own
        self._host = Host(self.base_layer, self._spec, self.down_proj)   # (also for older pickles)
        self._gate_plan = GatePlan(self.gate)
        self.pack_for_forward()

    # -- gate -------------------------------------------------------------------------------
    def _fused_gate_params(self) -> Optional[tuple[list, list, float]]:
        """(weights, biases, dropout p) for ``ops.gate_mlp`` when the fused formulation may run
        the gate as one op (``GatePlan.params``), else None. The layout is decided once, and
        again only after the gate or one of its modules was swapped."""
        if self.formulation != "fused":
            return None
        plan = self._gate_plan
        if not plan.holds(self.gate):
            plan = self._gate_plan = GatePlan(self.gate)
        return plan.params()

    def _gate(self, z: torch.Tensor) -> torch.Tensor:
        params = self._fused_gate_params()
        # Dropout in the op needs the kernels: the reference's counter-based masks are slow,
        # and the eager gate's nn.Dropout is the faster fallback.
        if params is None or (params[2] > 0 and not ops.runs_kernels_for(z)):
            return self.gate(z)
        ws, bs, p = params
        logits = ops.gate_mlp(z.reshape(-1, z.shape[-1]), ws, bs, p)
        return logits.view(*z.shape[:-1], ws[-1].shape[0])

    def gate_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E) per sequence from the last non-padding token, or (B, T, E) per token."""
        if self.mixda_config.gate == "token":
            return self._gate(z)
        B, T = z.shape[:2]
        frame = None if self.mixda_config.paper_gate_bug else self._calls.current(strict=True)
        idx = None if frame is None else last_index(frame.mask, B, T, z.device)
        zl = z[:, -1] if idx is None else z[torch.arange(B, device=z.device), idx]   # (B, Din)
        return self._gate(zl)

    def stacked_adapter_params(self):
        """(down_w (K, r, Din), down_b (K, r), up_w (K, D, r), up_b (K, D)) in domain order."""
        ads = list(self.adapters.values())
        return (torch.stack([a.down.weight for a in ads]), torch.stack([a.down.bias for a in ads]),
                torch.stack([a.up.weight for a in ads]), torch.stack([a.up.bias for a in ads]))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (B, T, D) for x (B, T, D) (or (T, D)): one computation, then, once, the
        old-knowledge capture (:meth:`_collect`) and the host's post-W2 module."""
        squeeze = x.dim() == 2                                   # (T, D) inputs from odd callers
        if squeeze:
            x = x.unsqueeze(0)
        if not torch.compiler.is_compiling():           # never compute over a stray meta parameter
            ops.check_devices("MixDAFFN", x=x, **dict(self.named_parameters()))
        host = self.host
        if not self.adapters_enabled:
            compute = self._host_ffn
        elif x.shape[0] == 0 or x.shape[1] == 0:                 # no tokens: nothing for a gate to read
            compute = self._no_tokens
        elif self.formulation == "fused" and host.fusable():
            compute = self._fused
        else:
            compute = self._paper if self.formulation == "paper" else self._folded
        y = host.post(self._collect(*compute(x, host)))
        return y.squeeze(0) if squeeze else y

    # Each computation: x (B, T, D) -> (y, f), both (B, T, D) before the post module; f is the
    # output with the adapters off (the old-knowledge target), None where nothing is captured.
    def _host_ffn(self, x, host):
        return host.down(host.intermediate(x)), None

    def _no_tokens(self, x, host):
        y = host.down(host.intermediate(x))
        return y, y

    def _fused(self, x, host):
        """Through ``ops.ffn_in`` and ``ops.mixda_out``."""
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)                                 # (N, D)
        h2 = host.fused_intermediate(x2)                         # (N, F)
        h = h2.view(B, T, h2.shape[1])
        intermediate = self.mixda_config.adapter_input == "intermediate"
        logits = self.gate_logits(h if intermediate else x)      # (B, E) or (B, T, E)
        ads = list(self.adapters.values())
        w2, b2 = linear_weight(host.down)
        y2, p = ops.mixda_out(h2, h2 if intermediate else x2, w2, b2,
                              [a.down.weight for a in ads], [a.down.bias for a in ads],
                              [a.up.weight for a in ads], [a.up.bias for a in ads],
                              logits.reshape(-1, logits.shape[-1]))
        D = y2.shape[1]
        return y2.view(B, T, D), p[:, :D].view(B, T, D)

    def _mix_inputs(self, x, host):
        """(h (B, T, F), adapter input z, gate logits) for the torch formulations."""
        h = host.intermediate(x)
        z = h if self.mixda_config.adapter_input == "intermediate" else x
        return h, z, self.gate_logits(z)

    def _folded(self, x, host):
        h, z, logits = self._mix_inputs(x, host)
        w2, b2 = linear_weight(host.down)
        return folded_form(z, h, w2, b2, *self.stacked_adapter_params(), logits, self.mixda_config.mixing,
                           return_f=True)

    def _paper(self, x, host):
        h, z, logits = self._mix_inputs(x, host)
        f = host.down(h)
        return paper_form(z, f, *self.stacked_adapter_params(), logits, self.mixda_config.mixing), f

    def _collect(self, y: torch.Tensor, f: Optional[torch.Tensor]) -> torch.Tensor:
        """Append (y, f) when the call collects old-knowledge pairs
        (:class:`~mixda_fast.core.call_state.Frame`); stop the forward after the last layer needed."""
        frame = self._calls.current()
        if frame is not None and frame.captures is not None:
            if f is not None:
                frame.captures.append((y, f))
            if frame.stop_after == self.layer_index:
                raise StopForward                      # nothing above this layer is needed
        return y

    def extra_repr(self) -> str:
        c = self.mixda_config
        return (f"layer={self.layer_index}, domains={list(c.domains)}, bottleneck={self.bottleneck}, "
                f"adapter_input={c.adapter_input!r}, gate={c.gate!r}, mixing={c.mixing!r}")
