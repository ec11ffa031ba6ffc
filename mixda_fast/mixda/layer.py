"""The patched feed-forward network: host FFN + K domain adapters + softmax gate (MixDA).

docs/design.md section 1. :class:`MixDAFFN` replaces one layer's FFN module in place and keeps the
original as ``host_ffn`` (not as ``base_layer``: PEFT takes any module with that attribute for one
of its own tuner layers, and its ``merge_and_unload`` would try to merge it). It computes the whole
FFN with the host's own modules (:class:`~.host.Host`, looked up at patch time), so with the
adapters off it is the host FFN bit for bit; a forward picks one computation and runs the shared
epilogue once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..core.call_state import CallState, StopForward
from .config import MixDAConfig
from ..core.families import FamilySpec
from .. import ops
from . import forcing, packing
from .formulations import folded_form, paper_form
from .host import Host
from .modules import (DomainAdapter, FFNOutputBypass, GatePlan, MixDAGate, last_index,  # noqa: F401
                      last_token, mark_hf_initialized, run_gate)

__all__ = ["DomainAdapter", "MixDAGate", "MixDAFFN", "FFNOutputBypass", "last_index"]


class MixDAFFN(nn.Module):
    """One layer's FFN with K domain adapters in parallel with W2 and a softmax gate.

    ``formulation`` picks how it is computed, all with the same result: "fused" (default) runs
    ``ops.ffn_in`` (first GEMM + activation) and ``ops.mixda_out`` (second GEMM, adapters, gate
    softmax and mix), kernels or torch references per ``mixda_fast.set_backend``, and "folded"
    where they cannot compute the host exactly (``Host.fusable``); "folded" is three torch GEMMs
    (``formulations.folded_form``); "paper" the eager paper form (``formulations.paper_form``).
    ``adapters_enabled = False`` makes the module the host FFN exactly.
    """

    FORMULATIONS = ("fused", "folded", "paper")

    def __init__(self, host_ffn: nn.Module, spec: FamilySpec, config: MixDAConfig,
                 down_proj: Optional[nn.Module], calls: CallState, layer_index: int,
                 default_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.host_ffn = host_ffn
        self.down_proj = down_proj           # BERT's second projection, moved here; else in host_ffn
        self._spec = spec
        self._calls = calls                  # per-call state: attention mask, old-knowledge captures
        self.layer_index = layer_index
        self.mixda_config = config
        self.formulation = "fused"
        self.adapters_enabled = True
        self._host = Host(host_ffn, spec, down_proj)
        self.hidden_size, self.intermediate_size = self._host.sizes(layer_index)
        z_width = self.intermediate_size if config.adapter_input == "intermediate" else self.hidden_size
        self.bottleneck = self.intermediate_size // config.reduction_factor
        if self.bottleneck < 1:
            raise ValueError(
                f"MixDAConfig.reduction_factor={config.reduction_factor} is not accepted for this model: "
                f"the bottleneck intermediate_size // reduction_factor = {self.intermediate_size} // "
                f"{config.reduction_factor} = 0; use a reduction_factor <= {self.intermediate_size}")
        # the dtype W2 returns, not its storage (int8 / packed 4-bit on a quantized host): the model's
        # dtype (``default_dtype``, from patch_model) where W2 does not say
        factory = self._host.factory(default_dtype or torch.get_default_dtype())
        self.adapters = nn.ModuleDict({
            name: DomainAdapter(z_width, self.bottleneck, self.hidden_size, config.adapter_init, **factory)
            for name in config.domains})
        self.gate = MixDAGate(z_width, config.gate_width, config.gate_hidden, config.gate_layers,
                              config.gate_dropout, **factory)
        self._gate_plan = GatePlan(self.gate)

    @property
    def host(self) -> Host:
        """The host FFN's parts (:class:`~.host.Host`), built again after a module was swapped."""
        host = self._host
        if not host.holds(self.host_ffn, self.down_proj):
            host = self._host = Host(self.host_ffn, self._spec, self.down_proj)
        return host

    def host_intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """h (B, T, F) = act(W1 x) (gated: act(W_gate x) * W_up x), with the host's own modules."""
        return self.host.intermediate(x)

    # -- packed weights (packing.py) ---------------------------------------------------------
    def _pack_members(self, host: bool) -> tuple[list, list]:
        """The K adapters' down weights and biases; with ``host``, W2 and b2 first where usable."""
        ads = list(self.adapters.values())
        down = self.host.down if host and self.mixda_config.adapter_input == "intermediate" else None
        return packing.members([a.down.weight for a in ads], [a.down.bias for a in ads], down)

    def adapters_packed(self, host: bool = False) -> bool:
        """Whether :meth:`pack_adapters` ``(host)``'s parameters lie back to back in one buffer."""
        return packing.is_packed(*self._pack_members(host))

    def pack_adapters(self, host: bool = False) -> bool:
        """Make the K adapters' down weights and biases (with ``host``: W2 and b2 first) views of one
        buffer each, for one GEMM (``packing``); returns whether they are. ``patch_model``, ``.to()``
        and deepcopy pack, a forward never does (threads may share a model)."""
        return packing.pack(*self._pack_members(host))

    def pack_for_forward(self) -> bool:
        """:meth:`pack_adapters`, with W2 and b2 when the fused forward computes this host."""
        return self.pack_adapters(host=self.host.fusable())

    def release_host_weights(self) -> None:
        """Give W2 and b2 storage of their own again: the unpatched model keeps no buffer of ours."""
        down = self.host.down
        if type(down) is nn.Linear:
            packing.release([down.weight, down.bias])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)          # .to() / .half() / .cuda() replace the parameters' storage
        self.pack_for_forward()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)          # copy.deepcopy gives each parameter storage of its own
        if "base_layer" in self._modules:    # pickled before the host FFN was renamed host_ffn
            self._modules = {("host_ffn" if k == "base_layer" else k): v for k, v in self._modules.items()}
        self._host = Host(self.host_ffn, self._spec, self.down_proj)   # (also for older pickles)
        self._gate_plan = GatePlan(self.gate)
        self.pack_for_forward()

    # -- gate -------------------------------------------------------------------------------
    def _fused_gate_params(self) -> Optional[tuple[list, list, float]]:
        """(weights, biases, dropout p) where the fused formulation runs the gate as one op
        (``GatePlan.params``), else None. The plan is made again only after a gate module swap."""
        if self.formulation != "fused":
            return None
        if not self._gate_plan.holds(self.gate):
            self._gate_plan = GatePlan(self.gate)
        return self._gate_plan.params()

    def gate_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E) per sequence from the last non-padding token, or (B, T, E) per token; for z (B, T, Din).

        Where the call forces this layer's weights (``mixda_fast.domain_forced``, ``mixda_domains=``:
        :mod:`.forcing`) they are (B, E) logits log(w) for either gate, and the gate runs only for
        rows left to it; where the call records gate weights (``mixda_fast.gate_weights``) their
        softmax is kept."""
        frame = self._calls.current()
        forced = forcing.forced_for(frame, self.layer_index)
        learned = None if forced is not None and forced.learned is None else self._learned_logits(z)
        logits = learned if forced is None else forced.logits(z.shape[0], z, learned)
        forcing.record(frame, self.layer_index, logits, z.shape[1] if self.mixda_config.gate == "token" else None)
        return logits

    def _learned_logits(self, z: torch.Tensor) -> torch.Tensor:
        """What the gate says."""
        if self.mixda_config.gate != "token":
            frame = None if self.mixda_config.paper_gate_bug else self._calls.current(strict=True)
            z = last_token(z, None if frame is None else frame.mask)          # (B, Din)
        return run_gate(self.gate, self._fused_gate_params(), z)

    def stacked_adapter_params(self):
        """(down_w (K, r, Din), down_b (K, r), up_w (K, D, r), up_b (K, D)) in domain order."""
        ads = list(self.adapters.values())
        return (torch.stack([a.down.weight for a in ads]), torch.stack([a.down.bias for a in ads]),
                torch.stack([a.up.weight for a in ads]), torch.stack([a.up.bias for a in ads]))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (B, T, D) for x (B, T, D) or (T, D): one computation, then :meth:`_collect` and post."""
        squeeze = x.dim() == 2                                   # (T, D) inputs from odd callers
        if squeeze:
            x = x.unsqueeze(0)
        if not torch.compiler.is_compiling():           # never compute over a stray meta parameter
            ops.check_devices("MixDAFFN", x=x, **dict(self.named_parameters()))
        host = self.host
        if not self.adapters_enabled or x.shape[0] == 0 or x.shape[1] == 0:   # no tokens: no gate input
            compute = self._host_ffn
        elif self.formulation == "fused" and host.fusable():
            compute = self._fused
        else:
            compute = self._paper if self.formulation == "paper" else self._folded
        y = host.post(self._collect(*compute(x, host)))
        return y.squeeze(0) if squeeze else y

    # Each computation: x (B, T, D) -> (y, f), both (B, T, D) before the post module; f is the
    # output with the adapters off (the old-knowledge target), None where nothing is captured.
    def _host_ffn(self, x, host):
        y = host.down(host.intermediate(x))
        return y, (y if self.adapters_enabled else None)

    def _fused(self, x, host):
        """Through ``ops.ffn_in`` and ``ops.mixda_out``."""
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)                                 # (N, D)
        h2 = host.fused_intermediate(x2)                         # (N, F)
        h = h2.view(B, T, h2.shape[1])
        intermediate = self.mixda_config.adapter_input == "intermediate"
        logits = self.gate_logits(h if intermediate else x)      # (B, E) or (B, T, E)
        ads = list(self.adapters.values())
        w2, b2 = host.down_weight()                              # fusable: W2 is exact
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
        w2, b2 = host.down_weight() or (None, None)
        f = host.down(h) if w2 is None else None      # a quantized / wrapped W2 is called, never read
        return folded_form(z, h, w2, b2, *self.stacked_adapter_params(), logits, self.mixda_config.mixing,
                           f=f, return_f=True)

    def _paper(self, x, host):
        h, z, logits = self._mix_inputs(x, host)
        f = host.down(h)
        return paper_form(z, f, *self.stacked_adapter_params(), logits, self.mixda_config.mixing), f

    def _collect(self, y: torch.Tensor, f: Optional[torch.Tensor]) -> torch.Tensor:
        """Append (y, f) where the call collects old-knowledge pairs; stop after the last layer needed."""
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
