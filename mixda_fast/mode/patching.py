"""Adding MoDE blocks to a HuggingFace model in place, and taking them out again (docs/design.md section 3).

:func:`mixda_fast.patch_model` with a :class:`~mixda_fast.MoDEConfig` lands here. The backbone's
layers stay exactly where they are (same modules, same names, same state-dict keys): the experts
and gates live in one new ModuleList, ``model.base_model.mode_blocks``, and two hooks per block
connect them to HuggingFace's own layer loop:

- a forward pre-hook on the block's first layer remembers the block input and the layer's
  arguments (attention mask, rotary position embeddings, cache, ...);
- a forward hook on the block's last layer (registered first, so transformers' own
  ``output_hidden_states`` hooks see the mixed result) replaces the layer's output with
  ``a_bb * backbone + sum_j a_j * expert_j``.

:func:`mixda_fast.unpatch_model` removes the hooks and the ModuleList (every change goes through
the core's journal): the model is then exactly what it was. A failed patch leaves the model
unchanged (everything is built before anything is attached). The hooks are objects holding
their block, so ``copy.deepcopy(model)`` works.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Iterator, Union

import torch
import torch.nn as nn

from ..core.call_state import CallState
from ..core.families import FamilySpec, family_of
from ..core.model import base_model_of, layer_list
from ..core.patch import Journal, PatchState, attribute_set, is_patched, patch_state
from ..core.projections import projection_shape, quantized_modules
from ..core.wrappers import foreign_modules
from .block import MoDEBlock
from .config import MoDEConfig

__all__ = ["patch_mode", "is_mode_patched", "mode_blocks", "mode_state", "experts_disabled", "gate_forced",
           "CONTAINER"]

logger = logging.getLogger(__name__)

CONTAINER = "mode_blocks"
"""Attribute of ``model.base_model`` that holds the MoDE blocks while the model is patched."""


@dataclass
class MoDEPatchState(PatchState):
    num_layers: int = 0
    layer_class: str = ""
    hidden_size: int = 0


def is_mode_patched(model: nn.Module) -> bool:
    return is_patched(model) and patch_state(model, "is_mode_patched").method.name == "mode"


def mode_state(model: nn.Module, fn: str = "mode_state") -> MoDEPatchState:
    """The state of a MoDE patch; ``fn`` starts the error when ``model`` has none."""
    return patch_state(model, fn, "mode")


def mode_blocks(model: nn.Module) -> list[MoDEBlock]:
    """The model's MoDE blocks, in layer order."""
    mode_state(model, "mode_blocks")
    return list(getattr(base_model_of(model), CONTAINER))


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
    """D from the down projection's (out, in): a wrapped one's (PEFT) from its sizes, never a weight."""
    return projection_shape(layer.get_submodule(spec.down), "patch_model", "layer 0: down projection")[0]


def _check_plain_layers(model: nn.Module, backbone) -> None:
    """Refuse a backbone with quantized or PEFT-wrapped modules in its layers: an expert is a
    trainable whole layer, a copy of a backbone layer ("copy") or a new one built like it
    ("random"), and neither can come from an int8 / 4-bit / torch.ao layer (a copy would not
    train; the fresh layer's dtype would be the storage's) or carry another library's adapters
    (LoRA would be copied into every expert). MixDA, which only calls the host's projections,
    supports both (core/projections.py, core/wrappers.py)."""
    for found, what, supported in ((quantized_modules(model, list(backbone)), "quantized layers", "quantized base models"),
                                   (foreign_modules(model, list(backbone)), "PEFT layers in its transformer layers",
                                    "PEFT next to it")):
        if found:
            name, module = found[0]
            raise ValueError(
                f"patch_model: MoDEConfig is not accepted for a model with {what} ({len(found)} modules, first: "
                f"{name!r}, {type(module).__module__}.{type(module).__name__}): MoDE experts are trainable whole "
                "layers built from the backbone's, which cannot hold those; patch the plain float model, or use "
                f"MixDA (MixDAConfig), which supports {supported}")


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


def patch_mode(model: nn.Module, config: MoDEConfig, journal: Journal) -> MoDEPatchState:
    """The MoDE half of :func:`mixda_fast.patch_model` (type checks and the already-patched
    check are done there): builds every block, then attaches them through ``journal``."""
    model_type, spec = family_of(model)
    base = base_model_of(model)
    backbone = layer_list(model, model_type, spec, "patch_model")
    _check_plain_layers(model, backbone)
    L, B, N, Le = len(backbone), config.num_blocks, config.num_experts, config.expert_layers
    if L % B != 0:
        divisors = [b for b in range(1, L + 1) if L % b == 0]
        raise ValueError(f"MoDEConfig.num_blocks={B} is not accepted for this model: its {L} layers cannot be cut "
                         f"into {B} equal blocks (L % num_blocks = {L % B}); accepted values: {divisors}")
    if hasattr(base, CONTAINER):
        raise ValueError(f"patch_model: base_model already has an attribute {CONTAINER!r}; is it patched already?")
    n = L // B
    first = backbone[0]
    hidden = _hidden_size(first, spec)
    ref = next(first.parameters())
    std = float(getattr(base.config, "initializer_range", None) or 0.02)

    calls = CallState(base, backbone)
    blocks = []
    for i in range(B):
        start, stop = i * n, (i + 1) * n
        kind = getattr(backbone[start], "attention_type", None)
        experts = {}
        for name in config.domains:
            layers = []
            for k in range(Le):
                if config.expert_init == "copy":
                    src = _source_index(start, n, k, Le)
                    if getattr(backbone[src], "attention_type", None) != kind:
                        raise ValueError(
                            f"patch_model: MoDE block {i} mixes attention types (layer {start}: {kind!r}, layer {src}: "
                            f"{getattr(backbone[src], 'attention_type', None)!r}); expert layers receive the block's "
                            "first attention mask. Choose num_blocks / expert_layers so copied layers share a type, "
                            "or use expert_init='random'")
                    layer = _copy_layer(backbone[src])
                else:
                    layer = _new_layer(model, base, backbone[start], start)
                layers.append(layer)
            experts[name] = layers
        block = MoDEBlock(i, start, stop, experts, hidden, spec, model_type, config.execution,
                          slot_base=L + i * N * Le, gate_std=std, calls=calls, device=ref.device, dtype=ref.dtype)
        block.train(first.training)
        blocks.append(block)

    journal.add_module(base, CONTAINER, nn.ModuleList(blocks))
    for block in blocks:
        journal.hook(backbone[block.start].register_forward_pre_hook(_Entry(block), with_kwargs=True),
                     backbone[block.stop - 1].register_forward_hook(_Exit(block), with_kwargs=True, prepend=True))
    journal.hook(*calls.register(base))
    return MoDEPatchState(config=config, model_type=model_type, spec=spec, num_layers=L,
                          layer_class=type(first).__name__, hidden_size=hidden)


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
    with attribute_set(mode_blocks(model), "force_gate", _expert_index(model, expert, "gate_forced")):
        yield model


@contextlib.contextmanager
def experts_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the experts are skipped: the model is its backbone exactly (and as fast)."""
    with attribute_set(mode_blocks(model), "enabled", False):
        yield model
