"""State-dict names of a MixDA-patched model: the host's own.

A patched FFN keeps the host's FFN as ``host_ffn`` (and BERT's second projection as
``down_proj``), so its parameters' names differ from the model's. State-dict hooks on each
patched layer give the state dict the *original* names for the host's weights (and take them
back on ``load_state_dict``): ``patched.save_pretrained(d)`` writes every base weight under the
name a plain ``Model.from_pretrained(d)`` expects. Adapters and gates keep their module names
(``...mlp.adapters.<domain>...``, ``...mlp.gate...``).

What PEFT added inside the host (LoRA on a projection of a patched FFN) keeps its live name
(``...mlp.host_ffn.up_proj.lora_A...``): PEFT picks the keys it saves by its layers' module names,
so a renamed key would be left out of ``PeftModel.save_pretrained``.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from ..core.families import FamilySpec
from ..core.wrappers import foreign_state_names

__all__ = ["register_name_hooks"]


def _host_names(module: nn.Module) -> list[str]:
    """The keys of ``module.state_dict()`` that are the host's (not PEFT's)."""
    foreign = foreign_state_names(module)
    return [name for name in module.state_dict() if name not in foreign]


def _move(state_dict: dict, old: str, new: str, names) -> None:
    for name in names:
        if old + name in state_dict and new + name not in state_dict:
            state_dict[new + name] = state_dict.pop(old + name)


def _pairs(spec: FamilySpec, layer: nn.Module) -> list:
    """(patched prefix, original prefix, module) of one patched transformer layer: the host
    FFN's keys under ``<ffn>.host_ffn.`` are saved as ``<ffn>.``, and a moved second
    projection's under ``<ffn>.down_proj.`` as its own path (BERT: ``output.dense.``)."""
    ffn = layer.get_submodule(spec.ffn)
    pairs = [(f"{spec.ffn}.host_ffn.", f"{spec.ffn}.", ffn.host_ffn)]
    if ffn.down_proj is not None:
        pairs.append((f"{spec.ffn}.down_proj.", f"{spec.down}.", ffn.down_proj))
    return pairs


def _saved(spec: FamilySpec, layer, state_dict, prefix, local_metadata) -> None:
    for patched, original, module in _pairs(spec, layer):
        _move(state_dict, prefix + patched, prefix + original, _host_names(module))


def _loading(spec: FamilySpec, layer, state_dict, prefix, local_metadata, strict, missing, unexpected,
             errors) -> None:
    for patched, original, module in _pairs(spec, layer):
        _move(state_dict, prefix + original, prefix + patched, _host_names(module))


def register_name_hooks(layers: list, spec: FamilySpec) -> list:
    """State-dict post-hooks and load pre-hooks on the patched layers (handles to remove)."""
    handles = []
    for layer in layers:
        handles.append(layer.register_state_dict_post_hook(functools.partial(_saved, spec)))
        handles.append(layer.register_load_state_dict_pre_hook(functools.partial(_loading, spec)))
    return handles
