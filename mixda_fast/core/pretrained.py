"""Restoring a patched model that transformers' ``model.save_pretrained`` wrote (the whole model;
an adapter folder of :func:`mixda_fast.save_pretrained` is read by :func:`mixda_fast.from_pretrained`).

``patch_model`` records the method and its config in ``model.config.mixda_fast``, which
``model.save_pretrained`` writes into ``config.json``; each method keeps the base weights under the
names a plain ``Model.from_pretrained(d)`` expects (MixDA: :mod:`mixda_fast.mixda.state_dict_names`;
MoDE adds a module and renames nothing). :func:`load_patched` loads the base model, applies the
recorded patch through the method registry and loads the patch's tensors from the same
checkpoint, each checked before any is copied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from .adapter_folder import CONFIG_NAME as ADAPTER_CONFIG
from .io import check_tensors
from .patch import CONFIG_KEY, method_named, methods, patching

__all__ = ["load_patched"]


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a ``model.save_pretrained`` folder (one file or shards)."""
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
                                f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} (save with model.save_pretrained)")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _patch_config(record, where: str):
    method = method_named(record.get("method")) if isinstance(record, dict) else None
    if method is None or not isinstance(record.get("config"), dict):
        names = " | ".join(repr(m.name) for m in methods())
        raise ValueError(f"load_patched: {where} {CONFIG_KEY}={record!r} is not accepted: expected "
                         f"{{'method': {names}, 'config': {{...}}}} as patch_model writes it")
    return method.config_class.from_dict(record["config"])


def load_patched(model_class, path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Rebuild a patched model that ``model.save_pretrained`` wrote: ``model_class.from_pretrained(path,
    **kwargs)`` loads the base model, the patch recorded in ``config.json`` is applied, and the
    adapters, gates (MixDA) or experts (MoDE) are loaded from the same checkpoint, each checked
    (present, same shape, finite) before any is copied.

    ``model_class``: a transformers model class (``BertForMaskedLM``, ``AutoModelForCausalLM``...).
    An adapter folder (``adapter_config.json`` and no ``config.json``: :func:`mixda_fast.save_pretrained`,
    a stage folder) is refused, pointing to :func:`mixda_fast.from_pretrained`.
    """
    if not callable(getattr(model_class, "from_pretrained", None)):
        raise TypeError(f"load_patched: model_class={model_class!r} is not accepted: expected a transformers "
                        "model class with from_pretrained (e.g. transformers.AutoModelForCausalLM)")
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise FileNotFoundError(f"load_patched: path={path!r} is not accepted: expected the folder "
                                "model.save_pretrained wrote")
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"load_patched: path={str(folder)!r} is not accepted: it is an adapter folder ({ADAPTER_CONFIG}, "
                         "the patch alone); load it onto the base model with mixda_fast.from_pretrained(base_model, "
                         "path), or pass a folder that model.save_pretrained wrote")
    import transformers

    hf_config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(folder)
    config = _patch_config(getattr(hf_config, CONFIG_KEY, None), str(folder / "config.json"))
    files = _checkpoint_files(folder)
    model = model_class.from_pretrained(folder, config=hf_config, **kwargs)
    base_keys = set(model.state_dict())
    with patching(model, config):
        targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in base_keys}
        tensors = _read_checked(files, targets)
        with torch.no_grad():
            for k, t in tensors.items():
                targets[k].copy_(t)
    return model


def _read_checked(files: dict[str, Path], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named in ``targets``, checked (present, shape, finite)."""
    from safetensors import safe_open

    out = {}
    for file in {files[k] for k in targets if k in files}:
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in targets if files.get(k) == file})
    folder = next(iter(files.values())).parent if files else "the checkpoint"
    check_tensors(targets, out, f"load_patched: {folder}")
    return out
