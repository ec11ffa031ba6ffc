"""Saving and loading MixDA adapters: one safetensors file, the config in its metadata.

A file holds either everything trainable in the patch (every domain adapter and the gates;
``domain=None``) or one domain's adapters (``domain="name"``: what stage 1 produces, loaded
into any slot by stage 2). Loading checks the family, the layers, the widths and K strictly and
says what differs, and every tensor's name, shape and finiteness is checked before any is copied.
Files are written with :func:`mixda_fast.core.io.save_tensors` (atomic, and never over a file
that is not an adapter file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..core.io import ADAPTERS as FORMAT, AdapterFileNotFoundError, file_in, load_into, read_safetensors, save_tensors
from .config import MixDAConfig
from ..core.patch import check_member
from .patching import mixda_modules, mixda_state

__all__ = ["save_adapters", "load_adapters", "patch_tensors", "describe_patch", "AdapterFileNotFoundError", "FORMAT",
           "FILE_NAME"]

_STRUCTURAL = ("reduction_factor", "adapter_input", "gate", "gate_hidden", "gate_layers", "mixing")


FILE_NAME = "mixda_adapters.safetensors"
"""The whole-patch file a folder gets (``domain=None``)."""


def _file_name(domain: Optional[str]) -> str:
    return FILE_NAME if domain is None else f"mixda_adapter_{domain}.safetensors"


def _tensors(model: nn.Module, domain: Optional[str]) -> dict[str, torch.Tensor]:
    """File key -> live parameter, for everything the file (kind all/domain) holds."""
    out = {}
    for i, m in mixda_modules(model).items():
        if domain is None:
            for key, p in m.adapters.named_parameters():
                out[f"layers.{i}.adapters.{key}"] = p
            for key, p in m.gate.named_parameters():
                out[f"layers.{i}.gate.{key}"] = p
        else:
            for key, p in m.adapters[domain].named_parameters():
                out[f"layers.{i}.adapter.{key}"] = p
    return out


def patch_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live parameter of every domain adapter and gate (``layers.<i>.adapters.<domain>.*``,
    ``layers.<i>.gate.*``): the whole-patch file's keys, and an adapter folder's."""
    return _tensors(model, None)


def describe_patch(model: nn.Module) -> dict:
    """The patched layers, recorded in an adapter folder's ``adapter_config.json``."""
    return {"layers": list(mixda_state(model, "describe_patch").layers)}


def save_adapters(model: nn.Module, path: Union[str, os.PathLike], domain: Optional[str] = None) -> Path:
    """Write the adapters (and gates, with ``domain=None``) of a patched model to ``path``.

    ``path`` is a file, or an existing directory (then ``mixda_adapters.safetensors`` or
    ``mixda_adapter_<domain>.safetensors`` inside it). Returns the file written.
    """
    path = file_in(path, "save_adapters", _file_name(domain), writing=True)
    state = mixda_state(model, "save_adapters")
    check_member(model, domain, "save_adapters", "mixda")
    metadata = {"format": FORMAT, "kind": "all" if domain is None else "domain",
                "model_type": state.model_type, "config": state.config.to_json(),
                "layers": json.dumps(state.layers), "domain": domain or ""}
    return save_tensors(_tensors(model, domain), path, metadata, "save_adapters")



def load_adapters(model: nn.Module, path: Union[str, os.PathLike], domain: Optional[str] = None) -> nn.Module:
    """Load a file written by :func:`save_adapters` into a patched model; returns ``model``.

    A whole-patch file (``domain=None`` at save) restores every adapter and the gates, or with
    ``domain`` only that domain's adapters. A one-domain file is loaded into the slot named
    ``domain`` (default: the name it was saved under). Raises ValueError naming what differs
    (family, layers, widths, K, domain names, shapes, non-finite values); on error nothing is
    changed.
    """
    path = file_in(path, "load_adapters", _file_name(domain), existing=(_file_name(None), _file_name(domain)))
    state = mixda_state(model, "load_adapters")
    check_member(model, domain, "load_adapters", "mixda")
    meta, tensors = read_safetensors(path, FORMAT, "load_adapters")
    where = f"load_adapters: {str(path)!r}"
    if meta.get("model_type") != state.model_type:
        raise ValueError(f"{where} was saved from family model_type={meta.get('model_type')!r}; "
                         f"this model is {state.model_type!r}")
    saved = MixDAConfig.from_json(meta["config"], source=str(path))
    cfg = state.config
    diffs = {k: (getattr(saved, k), getattr(cfg, k)) for k in _STRUCTURAL if getattr(saved, k) != getattr(cfg, k)}
    saved_layers = json.loads(meta.get("layers", "null"))
    if saved_layers != state.layers:
        diffs["layers"] = (saved_layers, state.layers)
    kind = meta.get("kind")
    if kind == "all":
        if domain is None and list(saved.domains) != list(cfg.domains):
            diffs["domains (K)"] = (list(saved.domains), list(cfg.domains))
        if domain is not None and domain not in saved.domains:
            raise ValueError(f"{where} holds domains {list(saved.domains)}; domain={domain!r} is not among them")
    elif kind == "domain":
        diffs.pop("gate", None), diffs.pop("gate_hidden", None), diffs.pop("gate_layers", None)
        diffs.pop("mixing", None)
        if domain is None:
            domain = meta.get("domain")
            check_member(model, domain, f"{where} holds domain {domain!r};", "mixda")
    else:
        raise ValueError(f"{where} has kind={kind!r}; expected 'all' or 'domain'")
    if diffs:
        lines = "; ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{where} does not fit this model: {lines}")

    if kind == "all" and domain is not None:   # one domain out of a whole-patch file
        prefix = ".adapters." + domain + "."
        tensors = {k.replace(prefix, ".adapter."): v for k, v in tensors.items() if prefix in k}
    targets = _tensors(model, None if kind == "all" and domain is None else domain)
    load_into(targets, tensors, where)
    return model

