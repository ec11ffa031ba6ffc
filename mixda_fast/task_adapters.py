"""Stage-2 task adapters (MixDA, Diao et al. ACL 2023, section 3.3; docs/design.md section 2).

A task adapter is a bottleneck ``y -> y + up(swish(down(y)))`` on a sub-layer's output:

- ``"pfeiffer"``: after each layer's FFN output (Pfeiffer et al. 2021), bottleneck = hidden // 16;
- ``"houlsby"``: after the attention output projection too (Houlsby et al. 2019).

Placement. The FFN output of a layer is the output of the module at ``spec.down`` when that
module lies outside ``spec.ffn`` (BERT: ``output.dense``; after :func:`~mixda_fast.patch_model`
a pass-through whose input already is the MixDA output), else of the module at ``spec.ffn``
(GPT-2 and Llama: the whole MLP, patched or not). The attention output is ``spec.attn_out``.
The adapter runs as a forward hook on that module, so the host's dropout, residual and
LayerNorm come after it, as in the adapters library (which puts it after the dropout; the
difference is one dropout mask).

Patching and unpatching swap exactly those modules, so the hook must follow the swap: each
layer carries a forward pre-hook that re-attaches the adapter's hook to whatever module sits at
the path when the layer runs. Task adapters may therefore be added before or after
:func:`~mixda_fast.patch_model`, and :func:`~mixda_fast.unpatch_model` leaves them working at
the same place (the original module). :func:`remove_task_adapters` takes them out.

The adapter modules are registered on their layer as ``mixda_task_adapter_ffn`` /
``mixda_task_adapter_attn`` and carry ``is_task_adapter = True``, which
:func:`mixda_fast.mark_trainable` (stage ``"task"``) unfreezes. The up-projection starts at zero,
so a fresh adapter is the identity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.families import FamilySpec, family_of
from .core.io import TASK_ADAPTERS as TASK_ADAPTER_FORMAT, file_in, load_into, read_safetensors, save_tensors
from .core.model import layer_list

__all__ = ["TaskAdapter", "add_task_adapters", "remove_task_adapters", "task_adapter_modules",
           "has_task_adapters", "save_task_adapters", "load_task_adapters", "TASK_ADAPTER_KINDS",
           "TASK_ADAPTER_FORMAT"]

TASK_ADAPTER_KINDS = ("pfeiffer", "houlsby")
_NAMES = {"ffn": "mixda_task_adapter_ffn", "attn": "mixda_task_adapter_attn"}
_INFO = "_mixda_task_adapter_info"
FILE_NAME = "task_adapters.safetensors"


class TaskAdapter(nn.Module):
    """y + up(swish(down(y))): width ``d`` -> ``bottleneck`` -> ``d``; identity at init."""

    is_task_adapter = True

    def __init__(self, d: int, bottleneck: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, d, device=device, dtype=dtype)
        self._is_hf_initialized = True   # HF's init must not overwrite the zero up-projection
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(F.silu(self.down(y)))

    def extra_repr(self) -> str:
        return f"{self.down.in_features} -> {self.down.out_features} -> {self.up.out_features}, swish"


class _Site:
    """Forward hook object that applies ``adapter`` to the output of the module at ``path`` of
    ``layer``; ``attach`` moves it to whichever module sits there now. An object, not a closure
    and no stored hook handle, so ``copy.deepcopy(model)`` gives the copy working hooks."""

    def __init__(self, layer: nn.Module, path: str, adapter: TaskAdapter):
        self.layer, self.path, self.adapter = layer, path, adapter
        self.target = None

    def detach(self) -> None:
        if self.target is not None:
            for key, hook in list(self.target._forward_hooks.items()):
                if hook is self:
                    del self.target._forward_hooks[key]
        self.target = None

    def attach(self) -> None:
        target = self.layer.get_submodule(self.path)
        if target is self.target:
            return
        self.detach()
        target.register_forward_hook(self)
        self.target = target

    def __call__(self, module, args, output):
        if isinstance(output, tuple):    # no supported target returns one; be safe anyway
            return (self.adapter(output[0]),) + output[1:]
        return self.adapter(output)


class _Healer:
    """Layer forward pre-hook: re-attach every site of the layer before it runs."""

    def __init__(self, sites: list[_Site]):
        self.sites = sites

    def __call__(self, module, args):
        for site in self.sites:
            site.attach()


def _layers(model: nn.Module, fn: str) -> tuple[str, FamilySpec, nn.ModuleList]:
    model_type, spec = family_of(model)
    return model_type, spec, layer_list(model, model_type, spec, fn)


def _ffn_out_path(spec: FamilySpec) -> str:
    return spec.ffn if spec.rel(spec.down) else spec.down


def has_task_adapters(model: nn.Module) -> bool:
    return getattr(model, _INFO, None) is not None


def add_task_adapters(model: nn.Module, kind: str = "pfeiffer", reduction_factor: int = 16) -> nn.Module:
    """Add a task adapter after every layer's FFN output (``"pfeiffer"``) and also after its
    attention output (``"houlsby"``); bottleneck = hidden size // ``reduction_factor``. In place;
    returns ``model``. Works on patched and unpatched models (see the module docstring)."""
    if kind not in TASK_ADAPTER_KINDS:
        raise ValueError(f"add_task_adapters: kind={kind!r} is not accepted: expected one of "
                         f"{' | '.join(repr(k) for k in TASK_ADAPTER_KINDS)}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int):
        raise TypeError(f"add_task_adapters: reduction_factor={reduction_factor!r} is not accepted: "
                        "expected an int >= 1")
    if reduction_factor < 1:
        raise ValueError(f"add_task_adapters: reduction_factor={reduction_factor!r} is not accepted: "
                         "expected an int >= 1")
    if has_task_adapters(model):
        raise ValueError("add_task_adapters: the model already has task adapters; call "
                         "remove_task_adapters(model) first")
    model_type, spec, layers = _layers(model, "add_task_adapters")
    if kind == "houlsby" and spec.attn_out is None:
        raise ValueError(f"add_task_adapters: kind='houlsby' needs the attention output projection, "
                         f"which FamilySpec.attn_out does not give for model_type={model_type!r}; "
                         "use kind='pfeiffer' or register the family with attn_out=...")
    d = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if not isinstance(d, int):
        raise ValueError(f"add_task_adapters: cannot read the hidden size from model.config "
                         f"(hidden_size / n_embd) of model_type={model_type!r}")
    bottleneck = d // reduction_factor
    if bottleneck < 1:
        raise ValueError(f"add_task_adapters: reduction_factor={reduction_factor} is not accepted for "
                         f"hidden size {d}: the bottleneck would be 0; use a reduction_factor <= {d}")
    ref = next(model.parameters())
    where = {"ffn": _ffn_out_path(spec)}
    if kind == "houlsby":
        where["attn"] = spec.attn_out
    # Build and resolve every site first; nothing changes if a path is missing.
    plans = []
    for i, layer in enumerate(layers):
        for slot, path in where.items():
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise ValueError(f"add_task_adapters: layer {i} of model_type={model_type!r} has no "
                                 f"module {path!r}") from None
            plans.append((layer, slot, path, TaskAdapter(d, bottleneck, device=ref.device, dtype=ref.dtype)))
    by_layer: dict[int, list[_Site]] = {}
    for layer, slot, path, adapter in plans:
        layer.add_module(_NAMES[slot], adapter)
        site = _Site(layer, path, adapter)
        site.attach()
        by_layer.setdefault(id(layer), []).append(site)
    for layer in layers:
        layer.register_forward_pre_hook(_Healer(by_layer[id(layer)]))
    setattr(model, _INFO, {"kind": kind, "reduction_factor": reduction_factor, "bottleneck": bottleneck,
                           "model_type": model_type})
    return model


def remove_task_adapters(model: nn.Module) -> nn.Module:
    """Take every task adapter and its hooks out of ``model``; returns ``model``."""
    if not has_task_adapters(model):
        raise ValueError("remove_task_adapters: the model has no task adapters (add_task_adapters adds them)")
    _, _, layers = _layers(model, "remove_task_adapters")
    for layer in layers:
        for key, hook in list(layer._forward_pre_hooks.items()):
            if isinstance(hook, _Healer):
                for site in hook.sites:
                    site.detach()
                del layer._forward_pre_hooks[key]
        for name in _NAMES.values():
            if name in layer._modules:
                delattr(layer, name)
    delattr(model, _INFO)
    return model


def task_adapter_modules(model: nn.Module) -> dict[str, TaskAdapter]:
    """``{"layers.<i>.<ffn|attn>": TaskAdapter}`` in layer order (the keys of saved files)."""
    if not has_task_adapters(model):
        raise ValueError("task_adapter_modules: the model has no task adapters (add_task_adapters adds them)")
    _, _, layers = _layers(model, "task_adapter_modules")
    out = {}
    for i, layer in enumerate(layers):
        for slot, name in _NAMES.items():
            if name in layer._modules:
                out[f"layers.{i}.{slot}"] = layer._modules[name]
    return out


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """File key -> live parameter of every task adapter."""
    return {f"{key}.{pname}": p for key, mod in task_adapter_modules(model).items() for pname, p in mod.named_parameters()}


def save_task_adapters(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the task adapters to a safetensors file (kind and width in its metadata); a
    directory gets ``task_adapters.safetensors``. Temp file then rename. Returns the file."""
    path = file_in(path, "save_task_adapters", FILE_NAME, writing=True)
    metadata = {"format": TASK_ADAPTER_FORMAT, "info": json.dumps(getattr(model, _INFO), sort_keys=True)}
    return save_tensors(_tensors(model), path, metadata, "save_task_adapters")


def load_task_adapters(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a file from :func:`save_task_adapters`; adds the adapters first when the model has
    none (with the file's kind and width). Raises ValueError naming what differs (names,
    shapes, non-finite values); on error the model is left as it was."""
    path = file_in(path, "load_task_adapters", FILE_NAME)
    meta, tensors = read_safetensors(path, TASK_ADAPTER_FORMAT, "load_task_adapters")
    info = json.loads(meta["info"])
    model_type, _ = family_of(model)
    if info.get("model_type") != model_type:
        raise ValueError(f"load_task_adapters: {str(path)!r} was saved from model_type="
                         f"{info.get('model_type')!r}; this model is {model_type!r}")
    added = not has_task_adapters(model)
    if added:
        add_task_adapters(model, info["kind"], info["reduction_factor"])
    try:
        have = getattr(model, _INFO)
        for key in ("kind", "reduction_factor"):
            if have[key] != info[key]:
                raise ValueError(f"load_task_adapters: {str(path)!r} has {key}={info[key]!r}; the model's task "
                                 f"adapters have {key}={have[key]!r}")
        load_into(_tensors(model), tensors, f"load_task_adapters: {str(path)!r}")
    except BaseException:
        if added:                      # a failed load leaves the model as it was
            remove_task_adapters(model)
        raise
    return model
