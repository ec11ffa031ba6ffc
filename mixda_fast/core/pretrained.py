"""``save_pretrained`` of a patched model, and restoring it.

A patched FFN keeps the host's FFN as ``base_layer`` (and BERT's second projection as
``down_proj``), so its parameters' names differ from the model's. State-dict hooks on each
patched layer give the state dict the *original* names for the host's weights (and take them
back on ``load_state_dict``), so that

- ``patched.save_pretrained(d)`` writes every base weight under the name a plain
  ``Model.from_pretrained(d)`` expects: the unpatched class loads the base model exactly and
  reports the adapter and gate tensors as unused weights;
- ``model.config.mixda_fast`` (saved in ``config.json``) records the method and its config, and
  :func:`load_patched` rebuilds the whole patched model from the folder.

Adapters, gates and MoDE experts keep their module names (``...mlp.adapters.<domain>...``,
``...mlp.gate...``, ``...mode_blocks...``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from .families import FamilySpec

__all__ = ["load_patched", "CONFIG_KEY"]

CONFIG_KEY = "mixda_fast"
"""Attribute of ``model.config`` (a key of ``config.json``): {"method": "mixda" | "mode", "config": {...}}."""


class _Record:
    """``model.config.mixda_fast`` for the time a patch lives; ``remove()`` restores what was there."""

    def __init__(self, config, value: dict):
        self.config = config
        self.previous = config.__dict__.get(CONFIG_KEY, self)
        setattr(config, CONFIG_KEY, value)

    def remove(self) -> None:
        if self.previous is self:
            self.config.__dict__.pop(CONFIG_KEY, None)
        else:
            setattr(self.config, CONFIG_KEY, self.previous)


class _NoRecord:
    def remove(self) -> None:
        pass


def record_patch(model: nn.Module, method: str, config: dict):
    """Write the patch into ``model.config`` (a handle whose ``remove()`` takes it out)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        return _NoRecord()
    return _Record(hf_config, {"method": method, "config": config})


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


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a ``save_pretrained`` folder (one file or shards)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from safetensors import safe_open

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {str(k): folder / str(v) for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"load_patched: {index} is not accepted: expected a safetensors index with a "
                             f"weight_map ({e})") from None
    single = folder / SAFE_WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"load_patched: path={str(folder)!r} is not accepted: it holds neither "
                                f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} (save with save_pretrained)")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _patch_config(record, where: str):
    from ..mixda.config import MixDAConfig
    from ..mode.config import MoDEConfig

    classes = {"mixda": MixDAConfig, "mode": MoDEConfig}
    if not isinstance(record, dict) or record.get("method") not in classes or not isinstance(record.get("config"), dict):
        raise ValueError(f"load_patched: {where} {CONFIG_KEY}={record!r} is not accepted: expected "
                         "{'method': 'mixda' | 'mode', 'config': {...}} as patch_model writes it")
    return classes[record["method"]].from_dict(record["config"])


def load_patched(model_class, path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Rebuild a patched model that ``save_pretrained`` wrote: ``model_class.from_pretrained(path,
    **kwargs)`` loads the base model, the patch recorded in ``config.json`` is applied, and the
    adapters, gates (MixDA) or experts (MoDE) are loaded from the same checkpoint, each checked
    (present, same shape, finite) before any is copied.

    ``model_class``: a transformers model class (``BertForMaskedLM``, ``AutoModelForCausalLM``...).
    """
    from ..mixda.patching import patch_model, unpatch_model

    if not callable(getattr(model_class, "from_pretrained", None)):
        raise TypeError(f"load_patched: model_class={model_class!r} is not accepted: expected a transformers "
                        "model class with from_pretrained (e.g. transformers.AutoModelForCausalLM)")
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise FileNotFoundError(f"load_patched: path={path!r} is not accepted: expected the folder "
                                "save_pretrained wrote")
    folder = Path(path)
    import transformers

    hf_config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(folder)
    config = _patch_config(getattr(hf_config, CONFIG_KEY, None), str(folder / "config.json"))
    files = _checkpoint_files(folder)
    model = model_class.from_pretrained(folder, config=hf_config, **kwargs)
    base_keys = set(model.state_dict())
    patch_model(model, config)
    try:
        targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in base_keys}
        tensors = _read_checked(files, targets)
        with torch.no_grad():
            for k, t in tensors.items():
                targets[k].copy_(t)
    except BaseException:
        unpatch_model(model)
        raise
    return model


def _read_checked(files: dict[str, Path], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named in ``targets``, checked (present, shape, finite)."""
    from safetensors import safe_open

    from .io import check_tensors

    out = {}
    for file in {files[k] for k in targets if k in files}:
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in targets if files.get(k) == file})
    folder = next(iter(files.values())).parent if files else "the checkpoint"
    check_tensors(targets, out, f"load_patched: {folder}")
    return out
