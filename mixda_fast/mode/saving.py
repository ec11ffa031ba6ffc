"""Saving, loading and composing MoDE experts: one safetensors file, the config in its metadata.

Stage 1 trains one expert per domain and saves it with :func:`save_experts` (``domain=...``): the
file holds that expert's layers in every block and its two gate rows (expert, backbone). Stage 2
builds an (N+1)-way model from N such files with :func:`compose_experts`. ``domain=None`` saves
or loads the whole patch (every expert and the full gates). Loading checks the family, the layer
class, the depth, the width, the blocks and the expert depth strictly and says what differs, and
every tensor (gate rows included) by name, shape and finiteness before any is copied; files are
written with :func:`mixda_fast.core.io.save_tensors` (atomic; never over another kind of file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from ..core.io import EXPERTS as FORMAT, check_tensors, file_in, load_into, read_safetensors, save_tensors
from ..core.patch import check_member, is_patched, patching
from .config import MoDEConfig
from .patching import mode_blocks, mode_state

__all__ = ["save_experts", "load_experts", "compose_experts", "read_expert_metadata", "patch_tensors",
           "describe_patch", "FORMAT", "FILE_NAME"]

FILE_NAME = "mode_experts.safetensors"
"""The whole-patch file a folder gets (``domain=None``)."""


def _file_name(domain: Optional[str]) -> str:
    return FILE_NAME if domain is None else f"mode_expert_{domain}.safetensors"


def _expert_tensors(model: nn.Module, domain: Optional[str]) -> dict[str, torch.Tensor]:
    """File key -> live tensor for the expert layers the file holds (gates are handled apart)."""
    out = {}
    for i, block in enumerate(mode_blocks(model)):
        for name, expert in block.experts.items():
            if domain is not None and name != domain:
                continue
            prefix = f"blocks.{i}.experts.{name}." if domain is None else f"blocks.{i}.expert."
            for key, t in expert.state_dict(keep_vars=True).items():
                out[prefix + key] = t
    return out


def patch_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live tensor of every expert and the full (N+1)-way gates (``blocks.<i>.experts.<name>.*``,
    ``blocks.<i>.gate.*``): the whole-patch file's keys, and an adapter folder's."""
    out = _expert_tensors(model, None)
    for i, block in enumerate(mode_blocks(model)):
        out[f"blocks.{i}.gate.weight"] = block.gate.weight
        out[f"blocks.{i}.gate.bias"] = block.gate.bias
    return out


def describe_patch(model: nn.Module) -> dict:
    """The blocks ([start, stop) layer ranges), the layer class, depth and width of the patch,
    recorded in an adapter folder's ``adapter_config.json``."""
    state = mode_state(model, "describe_patch")
    return {"blocks": [[b.start, b.stop] for b in mode_blocks(model)], "layer_class": state.layer_class,
            "num_layers": state.num_layers, "hidden_size": state.hidden_size}


def _metadata(model: nn.Module, kind: str, domain: Optional[str]) -> dict[str, str]:
    state = mode_state(model)
    return {"format": FORMAT, "kind": kind, "model_type": state.model_type, "layer_class": state.layer_class,
            "num_layers": str(state.num_layers), "hidden_size": str(state.hidden_size),
            "config": state.config.to_json(), "domain": domain or ""}


def save_experts(model: nn.Module, path: Union[str, os.PathLike], domain: Optional[str] = None) -> Path:
    """Write the MoDE experts of a patched model to ``path``.

    ``domain=None``: every expert and the full (N+1)-way gates; ``domain="name"``: that expert's
    layers in every block and its gate rows (expert row, backbone row) -- what stage 1 produces
    and :func:`compose_experts` reads. ``path`` is a file, or an existing directory (then
    ``mode_experts.safetensors`` or ``mode_expert_<domain>.safetensors`` inside it). Returns the
    file written.
    """
    path = file_in(path, "save_experts", _file_name(domain), writing=True)
    check_member(model, domain, "save_experts", "mode")
    if domain is None:
        tensors = patch_tensors(model)
    else:
        tensors = _expert_tensors(model, domain)
        names = mode_state(model).config.domains
        rows = [names.index(domain), len(names)]
        for i, block in enumerate(mode_blocks(model)):
            tensors[f"blocks.{i}.gate.weight"] = block.gate.weight.detach()[rows]
            tensors[f"blocks.{i}.gate.bias"] = block.gate.bias.detach()[rows]
    return save_tensors(tensors, path, _metadata(model, "all" if domain is None else "expert", domain),
                            "save_experts")


def _resolve(path, fn: str, domain: Optional[str] = None) -> Path:
    return file_in(path, fn, _file_name(domain), existing=(_file_name(domain), _file_name(None)))


def _read(path: Path, fn: str, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    meta, data = read_safetensors(path, FORMAT, fn, tensors)
    if meta.get("kind") not in ("all", "expert"):
        raise ValueError(f"{fn}: path={str(path)!r} has kind={meta.get('kind')!r}; expected 'all' or 'expert'")
    return meta, data


def read_expert_metadata(path: Union[str, os.PathLike]) -> dict:
    """The metadata of a MoDE expert file, with ``config`` parsed into a :class:`MoDEConfig`."""
    path = _resolve(path, "read_expert_metadata")
    meta, _ = _read(path, "read_expert_metadata", tensors=False)
    meta = dict(meta)
    meta["config"] = MoDEConfig.from_json(meta["config"], source=str(path))
    return meta


def _structure(meta: dict) -> dict:
    cfg = MoDEConfig.from_json(meta["config"])
    return {"family (model_type)": meta.get("model_type"), "layer class": meta.get("layer_class"),
            "num_layers": meta.get("num_layers"), "hidden_size": meta.get("hidden_size"),
            "num_blocks": cfg.num_blocks, "expert_layers": cfg.expert_layers}


def _check_fits(model: nn.Module, meta: dict, where: str) -> None:
    mine = _structure(_metadata(model, "all", None))
    theirs = _structure(meta)
    diffs = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
    if diffs:
        lines = "; ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{where} does not fit this model: {lines}")


def load_experts(model: nn.Module, path: Union[str, os.PathLike], domain: Optional[str] = None,
                 gate: bool = True) -> nn.Module:
    """Load a file written by :func:`save_experts` into a MoDE-patched model; returns ``model``.

    A whole-patch file restores every expert and the gates (the expert names must match), or
    with ``domain`` only that expert. A one-expert file is loaded into the slot ``domain``
    (default: the name it was saved under); with ``gate=True`` its gate row goes to that slot's
    row, and, when the model has one expert, its backbone row too (the stage-1 model exactly).
    Raises ValueError naming what differs; on error nothing is changed.
    """
    state = mode_state(model, "load_experts")
    check_member(model, domain, "load_experts", "mode")
    path = _resolve(path, "load_experts", domain)
    meta, tensors = _read(path, "load_experts")
    where = f"load_experts: {str(path)!r}"
    _check_fits(model, meta, where)
    names = list(state.config.domains)
    saved = MoDEConfig.from_json(meta["config"], source=str(path))
    blocks = mode_blocks(model)
    gate_tensors = {k: v for k, v in tensors.items() if ".gate." in k}
    tensors = {k: v for k, v in tensors.items() if ".gate." not in k}
    file_rows = len(saved.domains) + 1 if meta["kind"] == "all" else 2     # experts + backbone
    check_tensors({f"blocks.{i}.gate.{p}": torch.empty((file_rows, *t.shape[1:]), dtype=t.dtype, device="meta")
                   for i, b in enumerate(blocks) for p, t in (("weight", b.gate.weight), ("bias", b.gate.bias))},
                  gate_tensors, where)
    rows = []                           # the model's gate rows set from the file's first len(rows) rows
    if meta["kind"] == "all":
        if domain is None:
            if list(saved.domains) != names:
                raise ValueError(f"{where} holds experts {list(saved.domains)}; the model has {names}")
            targets = _expert_tensors(model, None)
            rows = list(range(len(names) + 1))
        else:
            if domain not in saved.domains:
                raise ValueError(f"{where} holds experts {list(saved.domains)}; domain={domain!r} is not among them")
            prefix = f".experts.{domain}."
            tensors = {k.replace(prefix, ".expert."): v for k, v in tensors.items() if prefix in k}
            targets = {k.replace(prefix, ".expert."): v for k, v in _expert_tensors(model, domain).items()}
    else:
        if domain is None:
            domain = meta.get("domain")
            check_member(model, domain, f"{where} holds expert {domain!r};", "mode")
        targets = {k.replace(f".experts.{domain}.", ".expert."): v
                   for k, v in _expert_tensors(model, domain).items()}
        if gate:
            rows = [names.index(domain), len(names)] if len(names) == 1 else [names.index(domain)]
    load_into(targets, tensors, where)
    with torch.no_grad():
        for i, block in enumerate(blocks if rows else ()):
            block.gate.weight[rows] = gate_tensors[f"blocks.{i}.gate.weight"][: len(rows)].to(block.gate.weight)
            block.gate.bias[rows] = gate_tensors[f"blocks.{i}.gate.bias"][: len(rows)].to(block.gate.bias)
    for block in blocks:
        block._stacked.clear()
    return model


def compose_experts(model: nn.Module, paths: Sequence[Union[str, os.PathLike]], *,
                    domains: Optional[Sequence[str]] = None, freeze_experts: Optional[bool] = None,
                    execution: Optional[str] = None, gate_init: str = "saved") -> nn.Module:
    """Stage 2: patch an unpatched ``model`` with the N experts saved (one per file, by
    :func:`save_experts` with ``domain=...``) in ``paths``, behind fresh (N+1)-way gates.

    The blocks and expert depth come from the files (which must agree with each other and with
    the model); ``domains`` renames the experts (default: the names they were saved under, which
    must then be unique). ``gate_init="saved"``: gate row j is expert j's row of its own stage-1
    gate and the backbone row the mean of the files' backbone rows (with one file: the stage-1
    model exactly); ``"uniform"``: all zeros (equal weights). Returns ``model``; on error the
    model is left unpatched.
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f"compose_experts: paths={paths!r} is not accepted: expected a non-empty list of expert files")
    if gate_init not in ("saved", "uniform"):
        raise ValueError(f"compose_experts: gate_init={gate_init!r} is not accepted: expected 'saved' | 'uniform'")
    if is_patched(model):
        raise ValueError("compose_experts: model is already patched; pass an unpatched model")
    files = [_resolve(p, "compose_experts") for p in paths]
    metas = []
    for f in files:
        meta, _ = _read(f, "compose_experts", tensors=False)
        if meta["kind"] != "expert":
            raise ValueError(f"compose_experts: {str(f)!r} holds a whole MoDE patch (kind='all'); expected one expert "
                             "per file, saved with mixda_fast.save_experts(model, path, domain=...)")
        metas.append(meta)
    first = _structure(metas[0])
    for f, meta in zip(files[1:], metas[1:]):
        other = _structure(meta)
        diffs = {k: (other[k], first[k]) for k in first if other[k] != first[k]}
        if diffs:
            lines = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(f"compose_experts: {str(f)!r} does not fit {str(files[0])!r}: {lines}")
    names = list(domains) if domains is not None else [m["domain"] for m in metas]
    if len(names) != len(files):
        raise ValueError(f"compose_experts: domains={list(names)!r} is not accepted: expected {len(files)} names, "
                         "one per file")
    if len(set(names)) != len(names):
        raise ValueError(f"compose_experts: the files' expert names {names} are not unique; pass domains=[...]")
    saved = MoDEConfig.from_json(metas[0]["config"])
    config = MoDEConfig(num_blocks=saved.num_blocks, domains=names, expert_layers=saved.expert_layers,
                        expert_init="copy",
                        freeze_experts=saved.freeze_experts if freeze_experts is None else freeze_experts,
                        execution=saved.execution if execution is None else execution, extra=dict(saved.extra))
    with patching(model, config):
        for f, name in zip(files, names):
            load_experts(model, f, domain=name, gate=False)     # checks every tensor, the gate rows too
        gates = [_read(f, "compose_experts")[1] for f in files] if gate_init == "saved" else []
        with torch.no_grad():
            for i, block in enumerate(mode_blocks(model)):
                block.gate.weight.zero_()
                block.gate.bias.zero_()
                if gate_init == "uniform":
                    continue
                bb_w, bb_b = [], []
                for j, g in enumerate(gates):
                    w, b = g[f"blocks.{i}.gate.weight"], g[f"blocks.{i}.gate.bias"]
                    block.gate.weight[j] = w[0].to(block.gate.weight)
                    block.gate.bias[j] = b[0].to(block.gate.bias)
                    bb_w.append(w[1].float())
                    bb_b.append(b[1].float())
                block.gate.weight[-1] = torch.stack(bb_w).mean(0).to(block.gate.weight)
                block.gate.bias[-1] = torch.stack(bb_b).mean(0).to(block.gate.bias)
    return model
