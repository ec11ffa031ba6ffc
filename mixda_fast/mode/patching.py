"""Adding MoDE blocks to a HuggingFace model in place, and taking them out again (DESIGN.md section 3).

:func:`mixda_fast.patch_model` with a :class:`~mixda_fast.MoDEConfig` lands here. The backbone's
layers stay exactly where they are (same modules, same names, same state-dict keys): the experts
and gates live in one new ModuleList, ``model.base_model.mode_blocks``, and two hooks per block
connect them to HuggingFace's own layer loop:

- a forward pre-hook on the block's first layer remembers the block input and the layer's
  arguments (attention mask, rotary position embeddings, cache, ...);
- a forward hook on the block's last layer (registered first, so transformers' own
  ``output_hidden_states`` hooks see the mixed result) replaces the layer's output with
  ``a_bb * backbone + sum_j a_j * expert_j``.

:func:`mixda_fast.unpatch_model` removes the hooks and the ModuleList: the model is then exactly
what it was. A failed patch leaves the model unchanged (everything is built before anything is
attached). The hooks are objects holding their block, so ``copy.deepcopy(model)`` works.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
import torch.nn as nn

from ..core.call_state import CallState
from ..core.families import FamilySpec, family_of, linear_weight
from ..core.pretrained import record_patch
from .block import MoDEBlock
from .config import MoDEConfig

__all__ = ["patch_mode", "unpatch_mode", "is_mode_patched", "mode_blocks", "mode_state", "experts_disabled",
           "gate_forced", "CONTAINER"]

logger = logging.getLogger(__name__)

_STATE = "_mixda_fast_mode_state"
CONTAINER = "mode_blocks"
"""Attribute of ``model.base_model`` that holds the MoDE blocks while the model is patched."""


@dataclass
class MoDEPatchState:
    config: MoDEConfig
    model_type: str
    spec: FamilySpec
    num_layers: int
    layer_class: str
    hidden_size: int
    hooks: list = field(default_factory=list)


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def is_mode_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE, None), MoDEPatchState)


def mode_state(model: nn.Module, fn: str = "mode_state") -> MoDEPatchState:
    if not is_mode_patched(model):
        raise ValueError(f"{fn}: model={type(model).__name__} is not patched with MoDE: call "
                         "mixda_fast.patch_model(model, mixda_fast.MoDEConfig(...)) first")
    return getattr(model, _STATE)


def mode_blocks(model: nn.Module) -> list[MoDEBlock]:
    """The model's MoDE blocks, in layer order."""
    mode_state(model, "mode_blocks")
    return list(getattr(_base(model), CONTAINER))


class _Entry:
    """Forward pre-hook of a block's first backbone layer."""

    def __init__(self, block: MoDEBlock):
        self.block = block

    def __call__(self, module, args, kwargs):
        self.block.prepare(args, kwargs)


class _Exit:
    """Forward hook of a block's last backbone layer: returns the mixed output."""

    def __init__(self, block: MoDEBlock):
        self.block = block

    def __call__(self, module, args, kwargs, output):
        return self.block.mix(output)


def _hidden_size(layer: nn.Module, spec: FamilySpec) -> int:
    weight, _ = linear_weight(layer.get_submodule(spec.down))
    return int(weight.shape[0])


def _source_index(start: int, block_size: int, k: int, expert_layers: int) -> int:
    """Backbone layer that expert layer k of a block copies (evenly spaced over the block)."""
    return start + (k * block_size) // expert_layers


def _new_layer(model: nn.Module, base: nn.Module, template: nn.Module, layer_idx: int) -> nn.Module:
    """A freshly initialised layer of the model's own class, as HuggingFace builds it."""
    cls = type(template)
    try:
        layer = cls(base.config, layer_idx=layer_idx)
    except TypeError:
        try:
            layer = cls(base.config)
        except TypeError as e:
            raise ValueError(f"patch_model: MoDEConfig.expert_init='random' cannot build a {cls.__name__} from "
                             f"the model config ({e}); use expert_init='copy'") from None
    ref = next(template.parameters())
    layer = layer.to(device=ref.device, dtype=ref.dtype)
    init = getattr(model, "_init_weights", None) or getattr(base, "_init_weights", None)
    if callable(init):
        with torch.no_grad():
            for m in layer.modules():
                init(m)
    for m in layer.modules():
        m._is_hf_initialized = True   # a later HF init pass must not overwrite trained experts
    layer.train(template.training)
    return layer


def _copy_layer(layer: nn.Module) -> nn.Module:
    """A deep copy of a backbone layer without the module hooks the original carries (a user's,
    or transformers' output-capturing ones): an expert is a new layer, not an observed one."""
    new = copy.deepcopy(layer)
    for m in new.modules():
        for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                     "_backward_pre_hooks"):
            d = getattr(m, name, None)
            if d is not None:
                d.clear()
    return new


def patch_mode(model: nn.Module, config: MoDEConfig) -> nn.Module:
    """The MoDE half of :func:`mixda_fast.patch_model` (type checks and the already-patched
    check are done there)."""
    model_type, spec = family_of(model)
    base = _base(model)
    try:
        layer_list = base.get_submodule(spec.layers)
    except AttributeError as e:
        raise ValueError(f"patch_model: family {model_type!r} expects the layers at base_model.{spec.layers}, "
                         f"which this model does not have ({e})") from None
    L, B, N, Le = len(layer_list), config.num_blocks, config.num_experts, config.expert_layers
    if L % B != 0:
        divisors = [b for b in range(1, L + 1) if L % b == 0]
        raise ValueError(f"MoDEConfig.num_blocks={B} is not accepted for this model: its {L} layers cannot be cut "
                         f"into {B} equal blocks (L % num_blocks = {L % B}); accepted values: {divisors}")
    if hasattr(base, CONTAINER):
        raise ValueError(f"patch_model: base_model already has an attribute {CONTAINER!r}; is it patched already?")
    n = L // B
    first = layer_list[0]
    hidden = _hidden_size(first, spec)
    ref = next(first.parameters())
    std = float(getattr(base.config, "initializer_range", None) or 0.02)

    calls = CallState(base, layer_list)
    blocks = []
    for i in range(B):
        start, stop = i * n, (i + 1) * n
        kind = getattr(layer_list[start], "attention_type", None)
        experts = {}
        for name in config.domains:
            layers = []
            for k in range(Le):
                if config.expert_init == "copy":
                    src = _source_index(start, n, k, Le)
                    if getattr(layer_list[src], "attention_type", None) != kind:
                        raise ValueError(
                            f"patch_model: MoDE block {i} mixes attention types (layer {start}: {kind!r}, layer {src}: "
                            f"{getattr(layer_list[src], 'attention_type', None)!r}); expert layers receive the block's "
                            "first attention mask. Choose num_blocks / expert_layers so copied layers share a type, "
                            "or use expert_init='random'")
                    layer = _copy_layer(layer_list[src])
                else:
                    layer = _new_layer(model, base, layer_list[start], start)
                layers.append(layer)
            experts[name] = layers
        block = MoDEBlock(i, start, stop, experts, hidden, spec, model_type, config.execution,
                          slot_base=L + i * N * Le, gate_std=std, calls=calls, device=ref.device, dtype=ref.dtype)
        block.train(first.training)
        blocks.append(block)

    state = MoDEPatchState(config=config, model_type=model_type, spec=spec, num_layers=L,
                           layer_class=type(first).__name__, hidden_size=hidden)
    try:
        base.add_module(CONTAINER, nn.ModuleList(blocks))
        for block in blocks:
            state.hooks.append(layer_list[block.start].register_forward_pre_hook(_Entry(block), with_kwargs=True))
            state.hooks.append(layer_list[block.stop - 1].register_forward_hook(
                _Exit(block), with_kwargs=True, prepend=True))
        state.hooks += calls.register(base)
        state.hooks.append(record_patch(model, "mode", config.to_dict()))
        setattr(model, _STATE, state)
    except BaseException:
        _undo(model, state)
        raise
    return model


def _undo(model: nn.Module, state: MoDEPatchState) -> None:
    for handle in reversed(state.hooks):
        handle.remove()
    state.hooks.clear()
    base = _base(model)
    if CONTAINER in base._modules:
        del base._modules[CONTAINER]


def unpatch_mode(model: nn.Module) -> nn.Module:
    state = mode_state(model, "unpatch_model")
    _undo(model, state)
    delattr(model, _STATE)
    return model


def _expert_index(model: nn.Module, expert: Union[int, str], fn: str) -> int:
    names = mode_state(model, fn).config.domains
    if expert == "backbone":
        return len(names)
    if isinstance(expert, str):
        if expert not in names:
            raise ValueError(f"{fn}: expert={expert!r} is not accepted: expected 'backbone' or one of {list(names)}")
        return names.index(expert)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert <= len(names):
        raise ValueError(f"{fn}: expert={expert!r} is not accepted: expected 'backbone', an expert name "
                         f"{list(names)} or an index 0..{len(names)} ({len(names)} = the backbone)")
    return expert


@contextlib.contextmanager
def gate_forced(model: nn.Module, expert: Union[int, str] = "backbone") -> Iterator[nn.Module]:
    """Inside the block every gate is exactly one-hot on ``expert`` ("backbone", a name or an
    index; the experts still run and are mixed with weights exactly 0 and 1): with "backbone" the
    model computes exactly what the unpatched model computes."""
    k = _expert_index(model, expert, "gate_forced")
    blocks = mode_blocks(model)
    before = [b.force_gate for b in blocks]
    for b in blocks:
        b.force_gate = k
    try:
        yield model
    finally:
        for b, v in zip(blocks, before):
            b.force_gate = v


@contextlib.contextmanager
def experts_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the experts are skipped: the model is its backbone exactly (and as fast)."""
    blocks = mode_blocks(model)
    before = [b.enabled for b in blocks]
    for b in blocks:
        b.enabled = False
    try:
        yield model
    finally:
        for b, v in zip(blocks, before):
            b.enabled = v
