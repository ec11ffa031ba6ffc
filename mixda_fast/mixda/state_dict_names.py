"""State-dict names of a MixDA-patched model: the host's own.

A patched FFN keeps the host's FFN as ``base_layer`` (and BERT's second projection as
``down_proj``), so its parameters' names differ from the model's. State-dict hooks on each
patched layer give the state dict the *original* names for the host's weights (and take them
back on ``load_state_dict``): ``patched.save_pretrained(d)`` writes every base weight under the
name a plain ``Model.from_pretrained(d)`` expects. Adapters and gates keep their module names
(``...mlp.adapters.<domain>...``, ``...mlp.gate...``).
"""

from __future__ import annotations

import functools

import torch.nn as nn

from ..core.families import FamilySpec

__all__ = ["register_name_hooks"]


def _move(state_dict: dict, old: str, new: str, names) -> None:
    for name in names:
        if old + name in state_dict and new + name not in state_dict:
            state_dict[new + name] = state_dict.pop(old + name)


def _pairs(spec: FamilySpec, layer: nn.Module) -> list:
    """(patched prefix, original prefix, module) of one patched transformer layer: the host
    FFN's keys under ``<ffn>.base_layer.`` are saved as ``<ffn>.``, and a moved second
    projection's under ``<ffn>.down_proj.`` as its own path (BERT: ``output.dense.``)."""
    ffn = layer.get_submodule(spec.ffn)
    pairs = [(f"{spec.ffn}.base_layer.", f"{spec.ffn}.", ffn.base_layer)]
    if ffn.down_proj is not None:
        pairs.append((f"{spec.ffn}.down_proj.", f"{spec.down}.", ffn.down_proj))
    return pairs


def _saved(spec: FamilySpec, layer, state_dict, prefix, local_metadata) -> None:
    for patched, original, module in _pairs(spec, layer):
        _move(state_dict, prefix + patched, prefix + original, list(module.state_dict()))


def _loading(spec: FamilySpec, layer, state_dict, prefix, local_metadata, strict, missing, unexpected,
             errors) -> None:
    for patched, original, module in _pairs(spec, layer):
        _move(state_dict, prefix + original, prefix + patched, list(module.state_dict()))


def register_name_hooks(layers: list, spec: FamilySpec) -> list:
    """State-dict post-hooks and load pre-hooks on the patched layers (handles to remove)."""
    handles = []
    for layer in layers:
        handles.append(layer.register_state_dict_post_hook(functools.partial(_saved, spec)))
        handles.append(layer.register_load_state_dict_pre_hook(functools.partial(_loading, spec)))
    return handles
