"""One MoDE block: N experts beside a slice of the frozen backbone, and the per-token gate that
mixes them (Schafhalter et al., arXiv 2410.10181, section 3; docs/design.md section 3).

For block i with input x (the input of the block's first backbone layer)::

    y = a_bb * backbone_i(x) + sum_j a_j * expert_ij(x),    a = softmax(Linear(d, N + 1)(x))  per token

Each expert is a stack of L_e layers of the host model's own layer class, called with the same
arguments (attention mask, rotary ``position_embeddings``, ``cache_position``, ...) that the
backbone's first layer of the block received. The block never runs the backbone itself: the
patch (:mod:`mixda_fast.mode.patching`) hooks the backbone's first and last layer of the block,
so the backbone runs in HuggingFace's own loop and the block only adds the experts and the mix.

Executions of the same math (``MoDEConfig.execution``):

- ``"loop"`` (the reference): every expert layer runs on its own; the mixture is the formula
  above in plain torch.
- ``"batched"``: per depth, each expert layer runs up to its FFN (attention, norms, residual:
  HuggingFace's own code), then the N experts' FFN GEMMs run as one batched GEMM over weights
  stacked once and kept in sync with the parameters (restacked every call under autograd), then
  each layer's tail (residual add, or BERT's output LayerNorm); the gate softmax and weighted sum
  are the fused :func:`mixda_fast.ops.softmax_combine`.
- ``"auto"`` (default): the fused mix always; the batched FFN GEMMs only outside autograd,
  where the stacks are cached. Measured on the 2-core AVX2 CPU this was written on
  (bench/test_mode_bench.py): MKL's batched GEMM costs what the N GEMMs cost, so inference is a
  wash (0.86x-1.19x), and under autograd restacking the weights made training 5-40% slower.

KV cache: expert layers get their own cache slots after the model's L layers (slot
``L + (i * N + j) * L_e + l`` for layer l of expert j in block i), so ``generate()`` with the
default dynamic cache is exact; crop/reorder/beam search act on those slots like on any other.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from .. import ops
from ..core.call_state import CallState
from ..core.families import FamilySpec, linear_weight
from ..core.projections import is_exact

__all__ = ["MoDEBlock", "BATCHED_TAILS"]

logger = logging.getLogger(__name__)

BATCHED_TAILS = {"gpt2": "residual", "llama": "residual", "mistral": "residual", "qwen2": "residual",
                 "bert": "down_parent", "roberta": "down_parent"}
"""How a family's layer continues after its FFN, which the batched path must redo after the
batched GEMMs: ``"residual"`` (layer output = residual + ffn(z), the FFN module returns f) or
``"down_parent"`` (BERT: the module holding ``down`` computes LayerNorm(dropout(down(h)) + a)).
Families not listed run the experts with ``execution="loop"``."""

try:  # transformers >= 5 records hidden states / attentions with hooks on every layer instance
    from transformers.utils.output_capturing import _active_collector
except Exception:  # pragma: no cover - older or newer transformers without it
    _active_collector = None

try:
    from transformers.cache_utils import Cache as _HFCache
except Exception:  # pragma: no cover
    _HFCache = ()


@contextlib.contextmanager
def _output_capture_paused() -> Iterator[None]:
    """Expert layers are instances of the model's layer class, so transformers' output-capturing
    hooks (``output_hidden_states=True``, ``output_attentions=True``) would record them as if they
    were backbone layers. Pause the collector while experts run."""
    if _active_collector is None:
        yield
        return
    previous = _active_collector.get()
    if previous is None:
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        if token is not None:
            _active_collector.reset(token)
        else:  # under torch.compile the collector is a plain global
            _active_collector.set(previous)


_EXPERTS_LOCK = threading.RLock()


def _experts_lock():
    """The batched path swaps expert layers' ``forward`` for the length of a call
    (``_forward_replaced``); experts run under one lock, so a concurrent call (another thread)
    never runs a layer with another call's swap. Not under torch.compile, which never swaps."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _EXPERTS_LOCK


class _SlotCache:
    """A view of the model's KV cache that stores everything under one fixed layer slot: the
    expert layer's attention calls ``update(k, v, self.layer_idx)`` with the backbone index it was
    built with, and the entries land in the expert's own slot."""

    __slots__ = ("_cache", "_slot")

    def __init__(self, cache, slot: int):
        self._cache = cache
        self._slot = slot

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self._cache.update(key_states, value_states, self._slot, *args, **kwargs)

    def __getattr__(self, name):
        if name in _SlotCache.__slots__:   # not set yet (torch.compile builds the object in two steps)
            raise AttributeError(name)
        return getattr(self._cache, name)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, fn) -> Iterator[None]:
    """Temporarily replace ``module.forward`` (keeping an instance-level forward that another tool,
    e.g. accelerate, may have installed)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class MoDEBlock(nn.Module):
    """Experts and gate of one block; see the module docstring for the math.

    Attributes a user may set: ``force_gate`` (None, or an index 0..N: the gate becomes exactly
    one-hot on that expert, N = the backbone), ``enabled`` (False: the block returns the
    backbone's output untouched, experts skipped), ``execution`` ("auto" / "batched" / "loop").
    """

    def __init__(self, index: int, start: int, stop: int, experts: dict[str, list[nn.Module]],
                 hidden_size: int, spec: FamilySpec, model_type: str, execution: str, slot_base: int,
                 gate_std: float, calls: CallState, device=None, dtype=None):
        super().__init__()
        self.index, self.start, self.stop = index, start, stop
        self.experts = nn.ModuleDict({name: nn.ModuleList(layers) for name, layers in experts.items()})
        self.gate = nn.Linear(hidden_size, len(experts) + 1, device=device, dtype=dtype)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, gate_std)
            self.gate.bias.zero_()
        self.gate._is_hf_initialized = True
        self.gate.is_gate = True              # its own learning rate in MixDATrainer (gate_parameters)
        self.hidden_size = hidden_size
        self.execution = execution
        self.force_gate: Optional[int] = None
        self.enabled = True
        self._spec = spec
        self._model_type = model_type
        self._slot_base = slot_base
        self._calls = calls                    # per-call state: the block input between the two hooks
        self._stacked: dict[int, tuple] = {}   # depth -> (key, stacked weights), inference only
        self._warned_loop = False

    # ---- shapes and names --------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_layers(self) -> int:
        return len(next(iter(self.experts.values())))

    @property
    def names(self) -> list[str]:
        return list(self.experts.keys())

    def slot(self, j: int, depth: int) -> int:
        """KV-cache slot of layer ``depth`` of expert ``j``."""
        return self._slot_base + j * self.expert_layers + depth

    def extra_repr(self) -> str:
        return (f"layers={self.start}..{self.stop - 1}, experts={self.names}, "
                f"expert_layers={self.expert_layers}, execution={self.execution!r}")

    # ---- called by the patch's hooks ---------------------------------------------------------

    def prepare(self, args: tuple, kwargs: dict) -> None:
        """Entry hook: remember the block input and the layer arguments (in the call's frame,
        so concurrent calls never mix) and make the cache slots."""
        if self.enabled:
            self._frame("prepare").blocks[self.index] = (args, kwargs)
        cache = _find_cache(args, kwargs)
        if cache is not None:
            self._ensure_slots(cache)

    def _ensure_slots(self, cache) -> None:
        needed = self._slot_base + self.num_experts * self.expert_layers
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            return  # a lazily grown cache makes the slots on first update
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            raise ValueError(f"MoDE: past_key_values={type(cache).__name__} is not supported for MoDE expert "
                             "slots: expected a transformers Cache with a `layers` list (DynamicCache); "
                             "pass use_cache=False to run without a cache")
        while len(layers) < needed:
            template = layers[self.start]
            if getattr(template, "is_initialized", False):
                raise ValueError(
                    f"MoDE: past_key_values already holds {cache.get_seq_length()} tokens but has no slots for "
                    "the MoDE experts (it was filled by a model without this patch); start generation with an "
                    "empty cache or pass use_cache=False")
            layers.append(copy.deepcopy(template))

    def mix(self, output):
        """Exit hook: ``output`` is the backbone's output of the block's last layer (tensor or
        tuple); returns it with the hidden states replaced by the gated mixture."""
        if not self.enabled:
            return output
        inputs = self._frame("mix").blocks.pop(self.index, None)
        if inputs is None:
            raise RuntimeError(f"MoDE block {self.index}: the exit hook ran without the entry hook "
                               f"(was layer {self.start} skipped?)")
        args, kwargs = inputs
        backbone = _first(output)                                        # (B, T, D)
        x = args[0] if args else kwargs["hidden_states"]                 # (B, T, D)
        with _output_capture_paused(), _experts_lock():
            if self.execution in ("batched", "auto"):
                if self._batched_ok():
                    experts = self._experts_batched(x, args, kwargs)     # (N, B, T, D)
                else:
                    experts = torch.stack(self._experts_loop(x, args, kwargs))
                y = self._combine_fused(x, experts, backbone)
            else:
                experts = self._experts_loop(x, args, kwargs)            # list of N (B, T, D)
                y = self._combine_reference(x, experts, backbone)
        if isinstance(output, tuple):
            return (y,) + tuple(output[1:])
        return y

    def _frame(self, hook: str):
        frame = self._calls.current(strict=True)
        if frame is None:
            raise RuntimeError(f"MoDE block {self.index}: its {hook} hook ran outside a forward call of the "
                               "patched model's base model (layers called on their own cannot be mixed)")
        return frame

    # ---- gate --------------------------------------------------------------------------------

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, N + 1) logits; with ``force_gate = k`` exactly 0 at k and -inf elsewhere, so the
        softmax is exactly one-hot."""
        logits = self.gate(x)
        if self.force_gate is None:
            return logits
        k = int(self.force_gate)
        if not 0 <= k <= self.num_experts:
            raise ValueError(f"MoDEBlock.force_gate={self.force_gate!r} is not accepted: expected None or an "
                             f"index 0..{self.num_experts} ({self.num_experts} = the backbone)")
        forced = torch.full_like(logits, float("-inf"))
        forced[..., k] = 0
        return forced

    def _combine_reference(self, x, experts: list, backbone):
        """The paper's formula in plain torch: y = a_bb * backbone + sum_j a_j * expert_j."""
        logits = self.gate_logits(x)
        acc = torch.promote_types(logits.dtype, torch.float32)       # 16-bit dtypes: softmax in float32
        a = torch.softmax(logits.to(acc), dim=-1).to(backbone.dtype)   # (B, T, N + 1)
        y = a[..., -1:] * backbone
        for j, e in enumerate(experts):
            y = y + a[..., j:j + 1] * e
        return y

    def _combine_fused(self, x, experts: torch.Tensor, backbone):
        """The fused softmax + weighted sum over [expert_0 .. expert_{N-1}, backbone], per token."""
        B, T, D = backbone.shape
        R, E = B * T, self.num_experts + 1
        logits = self.gate_logits(x).reshape(R, E)
        stacked = torch.cat([experts.reshape(E - 1, R, D), backbone.reshape(1, R, D)])  # (E, R, D)
        return ops.softmax_combine(logits, stacked.reshape(E, R, 1, D)).reshape(B, T, D)

    # ---- experts, one layer at a time (reference) --------------------------------------------

    def _call_layer(self, layer: nn.Module, h, args: tuple, kwargs: dict, slot: int):
        args = tuple(_SlotCache(a, slot) if _is_cache(a) else a for a in args[1:])
        kwargs = {k: (_SlotCache(v, slot) if _is_cache(v) else v) for k, v in kwargs.items()}
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = h
            return _first(layer(*args, **kwargs))
        return _first(layer(h, *args, **kwargs))

    def _experts_loop(self, x, args, kwargs) -> list:
        outs = []
        for j, layers in enumerate(self.experts.values()):
            h = x
            for depth, layer in enumerate(layers):
                h = self._call_layer(layer, h, args, kwargs, self.slot(j, depth))
            outs.append(h)
        return outs

    # ---- experts, FFN GEMMs batched over experts (fast path) ---------------------------------

    def _batched_ok(self) -> bool:
        if self.num_experts == 1:
            return False  # nothing to batch; the fused combine still runs
        if torch.compiler.is_compiling():
            # The batched path swaps layers' ``forward`` for the call (``_forward_replaced``),
            # which dynamo cannot trace; under torch.compile the experts run one by one and the
            # compiler fuses what it can (the fused combine still runs).
            return False
        if self.execution == "auto" and torch.is_grad_enabled() and any(
                p.requires_grad for p in self.experts.parameters()):
            return False  # restacking the weights every step costs more than batching saves (CPU)
        tail = BATCHED_TAILS.get(self._model_type)
        ok = tail is not None
        if ok:
            for layers in self.experts.values():
                for layer in layers:
                    if getattr(layer, "chunk_size_feed_forward", 0) or (
                            getattr(layer, "gradient_checkpointing", False) and layer.training) or not all(
                            is_exact(layer.get_submodule(p)) for p in self._projection_paths()):
                        ok = False
        if not ok and not self._warned_loop:
            logger.info("MoDE block %d: execution='batched' is not available here (family %r, chunked FFN, "
                        "gradient checkpointing or a wrapped projection); running the experts one by one",
                        self.index, self._model_type)
            self._warned_loop = True
        return ok

    def _projection_paths(self) -> list[str]:
        """The FFN projections the batched path reads as weights (``core.projections.is_exact`` only)."""
        s = self._spec
        return [p for p in (s.up, s.gate_proj, s.down) if p]

    def _ffn_modules(self, depth: int) -> list[dict]:
        s = self._spec
        out = []
        for layers in self.experts.values():
            layer = layers[depth]
            out.append({"up": layer.get_submodule(s.up), "act": layer.get_submodule(s.act),
                        "down": layer.get_submodule(s.down),
                        "gate": layer.get_submodule(s.gate_proj) if s.gate_proj else None,
                        "post": layer.get_submodule(s.post) if s.post else None})
        return out

    def _stacked_weights(self, depth: int, mods: list[dict]) -> dict:
        """{part: (W^T stacked (N, in, out), bias stacked (N, 1, out) or None)} for up/gate/down.
        Outside autograd the stack is built once and rebuilt only when a weight changes."""
        parts = [p for p in ("up", "gate", "down") if mods[0][p] is not None]
        params = [(p, linear_weight(m[p])) for p in parts for m in mods]
        tensors = [t for _, (w, b) in params for t in (w, b) if t is not None]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if not grad:
            hit = self._stacked.get(depth)
            if hit is not None and hit[0] == key:
                return hit[1]
        stacked = {}
        for part in parts:
            ws = [linear_weight(m[part]) for m in mods]
            wt = torch.stack([w.t() for w, _ in ws])                          # (N, in, out)
            b = None if ws[0][1] is None else torch.stack([b for _, b in ws]).unsqueeze(1)  # (N, 1, out)
            stacked[part] = (wt, b)
        if grad:
            self._stacked.pop(depth, None)
        else:
            self._stacked[depth] = (key, stacked)
        return stacked

    @staticmethod
    def _gemm(z, wb):
        wt, b = wb
        return torch.bmm(z, wt) if b is None else torch.baddbmm(b, z, wt)

    def _experts_batched(self, x, args, kwargs) -> torch.Tensor:
        """(N, B, T, D): per depth, HF's own layer code up to the FFN for every expert, the FFN as
        batched GEMMs over stacked weights, then the layer's tail."""
        s, tail = self._spec, BATCHED_TAILS[self._model_type]
        N = self.num_experts
        layers_by_expert = list(self.experts.values())
        hs = [x] * N
        for depth in range(self.expert_layers):
            mods = self._ffn_modules(depth)
            zs, res, partial = [None] * N, [None] * N, [None] * N
            for j in range(N):
                layer = layers_by_expert[j][depth]
                partial[j] = self._run_to_ffn(layer, hs[j], args, kwargs, self.slot(j, depth), tail, zs, res, j)
            shape = zs[0].shape                                                  # (B, T, in)
            Z = torch.stack(zs).reshape(N, -1, shape[-1])                        # (N, R, in)
            W = self._stacked_weights(depth, mods)
            if "gate" in W:                                                      # gated MLP (Llama)
                H = mods[0]["act"](self._gemm(Z, W["gate"])) * self._gemm(Z, W["up"])
            else:
                H = mods[0]["act"](self._gemm(Z, W["up"]))                       # (N, R, ff)
            F = self._gemm(H, W["down"])                                         # (N, R, D)
            if mods[0]["post"] is not None:
                F = mods[0]["post"](F)
            F = F.reshape(N, *shape[:-1], F.shape[-1])                           # (N, B, T, D)
            if tail == "residual":
                out = torch.stack(partial) + F                                   # residual + 0 + f
            else:                                                                # LN(dropout(f) + a)
                outs = []
                for j in range(N):
                    layer = layers_by_expert[j][depth]
                    parent, _, name = s.down.rpartition(".")
                    host, down = layer.get_submodule(parent), layer.get_submodule(s.down)
                    with _forward_replaced(down, lambda t: t):
                        outs.append(host(F[j], res[j]))
                out = torch.stack(outs)
            hs = list(out.unbind(0))
        return out

    def _run_to_ffn(self, layer, h, args, kwargs, slot, tail, zs, res, j):
        """Run ``layer`` with its FFN intercepted: record the FFN input in ``zs[j]`` (and BERT's
        residual in ``res[j]``); the FFN returns zeros (residual tail) so the layer output is the
        residual stream, or the residual itself (down_parent tail)."""
        s = self._spec
        ffn = layer.get_submodule(s.ffn)

        def record_ffn(z, *a, **k):
            if zs[j] is not None:
                raise RuntimeError("MoDE batched path: the FFN ran twice in one layer call")
            zs[j] = z
            return torch.zeros_like(z) if tail == "residual" else z

        if tail == "residual":
            with _forward_replaced(ffn, record_ffn):
                return self._call_layer(layer, h, args, kwargs, slot)
        host = layer.get_submodule(s.down.rpartition(".")[0])

        def record_host(hidden, residual, *a, **k):
            res[j] = residual
            return residual

        with _forward_replaced(ffn, record_ffn), _forward_replaced(host, record_host):
            return self._call_layer(layer, h, args, kwargs, slot)


def _is_cache(value: Any) -> bool:
    return bool(_HFCache) and isinstance(value, _HFCache)


def _find_cache(args: tuple, kwargs: dict):
    for v in list(args) + list(kwargs.values()):
        if _is_cache(v):
            return v
    return None
