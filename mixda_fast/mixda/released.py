"""Checkpoints of the released MixDA code (github.com/Amano-Aki/Mixture-of-Domain-Adapters), in and out.

The released code (``src/models/transformers/modeling_roberta.py``) writes a patched RoBERTa's
adapters with ``save_knowledge_adapter``: one ``torch.save`` dict per file,

    "{i}-{j}-adapter"  layer i's j-th domain adapter (``MixtureOfDomainAdapter.state_dict()``):
                       adapter_down.0.weight (r, F), adapter_down.0.bias (r,),
                       adapter_up.weight (D, r), adapter_up.bias (D,)
    "{i}-gating"       layer i's gate (``MoeGating.state_dict()``): linear.{1,4,7,10}.weight / .bias,
                       (768, F), (768, 768), (768, 768), (K + 1, 768)

and its stage 2 (``load_knowledge_adapter(f_list)``) reads one domain per file under
``"{i}-adapter"``. Both map one to one onto a :class:`~.layer.MixDAFFN` (docs/design.md section 1):
``adapter_down.0`` -> ``adapters[domain_j].down``, ``adapter_up`` -> ``.up``, ``linear.n`` ->
``gate[n]`` (:class:`~.modules.MixDAGate` is the released ``nn.Sequential``, modules at the same
indices), i = the 0-based layer index, j = the domain's place in ``MixDAConfig.domains``. The
released layer is ``paper`` mixing (the FFN is the gate's last expert), adapters and gate reading
the intermediate activation, a sequence gate read at position -1 (``paper_gate_bug=True``).

:func:`released_config` reads the config such files need, :func:`import_released` loads them into a
patched model (every name, shape and value checked before anything is copied) and
:func:`export_released` writes them back, key for key and bit for bit.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core.io import AdapterFileNotFoundError, as_path, check_tensors, file_in, write_atomic
from ..core.patch import check_member
from .config import MixDAConfig
from .patching import mixda_modules, mixda_state

__all__ = ["import_released", "export_released", "released_config", "FILE_NAME"]

FILE_NAME = "mixda_released.pt"
"""File name used in a folder (the released code names its files ``model<date>.pt-<epoch>``)."""

_KEY = re.compile(r"(\d+)-(?:(\d+)-)?(adapter|gating)")
_FITS = {"mixing": "paper", "adapter_input": "intermediate", "gate": "sequence"}
"""The released layer: the FFN mixed in as the (K+1)-th expert, adapters and gate reading
act(W1 x), one gate softmax per sequence."""

Files = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass
class _Checkpoint:
    """One released file, parsed: layer -> domain j -> state dict, layer -> gate state dict."""
    path: Path
    adapters: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    num_domains: int = 0
    one_domain: bool = False             # "{i}-adapter" keys (what load_knowledge_adapter(f_list) reads)

    def where(self, key: Optional[str] = None) -> str:
        return f"{str(self.path)!r}" + ("" if key is None else f" key {key!r}")


def _file_name(domain: Optional[str]) -> str:
    return FILE_NAME if domain is None else f"mixda_released_{domain}.pt"


def _load(path: Path, fn: str) -> dict:
    if not path.is_file():
        raise AdapterFileNotFoundError(2, f"{fn}: path={str(path)!r} does not exist; expected a checkpoint of "
                                          "the released MixDA code (torch.save dict)", str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle, zip and weights_only errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{fn}: path={str(path)!r} is not a torch.save file of tensors that "
                         f"torch.load(weights_only=True) reads: {first}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{fn}: path={str(path)!r} holds a {type(data).__name__}; expected the released code's "
                         "dict of '{layer}-{j}-adapter' / '{layer}-gating' state dicts")
    return data


def _parse(path: Path, fn: str) -> _Checkpoint:
    """Read and parse one file; refuses unknown keys, values that are not state dicts of tensors,
    both adapter key forms in one file, and domains j that are not 0..n-1 in every layer."""
    ck = _Checkpoint(path)
    for key, value in _load(path, fn).items():
        m = _KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"{fn}: {ck.where()} has key {key!r}; expected '{{layer}}-{{j}}-adapter', "
                             "'{layer}-adapter' or '{layer}-gating' (the released save_knowledge_adapter's keys)")
        if m[2] is not None and m[3] == "gating":
            raise ValueError(f"{fn}: {ck.where()} has key {key!r}; expected '{{layer}}-gating' for a gate")
        if not isinstance(value, dict):
            raise ValueError(f"{fn}: {ck.where(key)} holds a {type(value).__name__}; expected a state dict "
                             "(parameter name -> tensor)")
        bad = next(((k, t) for k, t in value.items() if not (isinstance(k, str) and isinstance(t, torch.Tensor))), None)
        if bad is not None:
            raise ValueError(f"{fn}: {ck.where(key)} entry {bad[0]!r} is a {type(bad[1]).__name__}; expected a "
                             "tensor (a state dict maps parameter names to tensors)")
        layer = int(m[1])
        if m[3] == "gating":
            ck.gates[layer] = value
            continue
        if (m[2] is None) != ck.one_domain and ck.adapters:
            raise ValueError(f"{fn}: {ck.where()} mixes '{{layer}}-adapter' and '{{layer}}-{{j}}-adapter' keys; "
                             "expected one form")
        ck.one_domain = m[2] is None
        ck.adapters.setdefault(layer, {})[0 if m[2] is None else int(m[2])] = value
    js = {i: sorted(d) for i, d in ck.adapters.items()}
    n = max((len(j) for j in js.values()), default=0)
    for i, j in sorted(js.items()):
        if j != list(range(n)):
            raise ValueError(f"{fn}: {ck.where()} has adapters j={j} for layer {i}; expected j = 0 .. {n - 1} "
                             f"in every layer (keys '{i}-{{j}}-adapter')")
    if n == 0:
        raise ValueError(f"{fn}: {ck.where()} holds no adapters (no '{{layer}}-{{j}}-adapter' or "
                         "'{layer}-adapter' key)")
    ck.num_domains = n
    return ck


def _is_released(path: Path, fn: str) -> bool:
    """Whether ``path`` is a file that :func:`_parse` reads (the one kind of file an export replaces)."""
    try:
        return path.is_file() and bool(_parse(path, fn))
    except ValueError:
        return False


def _read(files: Files, fn: str, default: str = FILE_NAME) -> list[_Checkpoint]:
    """``files`` (one path or a list; a folder holds :data:`FILE_NAME`) parsed, in order."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else files
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f"{fn}: files={files!r} is not accepted: expected a path or a non-empty list of paths")
    return [_parse(file_in(p, fn, default), fn) for p in paths]


def _unfit(cfg: MixDAConfig) -> list[str]:
    """What in ``cfg`` differs from the released layer (:data:`_FITS`), one phrase per field."""
    return [f"the model's MixDAConfig.{k}={getattr(cfg, k)!r}; the released layer is {k}={v!r}"
            for k, v in _FITS.items() if getattr(cfg, k) != v]


def _adapter_targets(adapter: nn.Module) -> dict:
    """Released name -> parameter of one domain adapter."""
    return {"adapter_down.0.weight": adapter.down.weight, "adapter_down.0.bias": adapter.down.bias,
            "adapter_up.weight": adapter.up.weight, "adapter_up.bias": adapter.up.bias}


def _gate_targets(gate: nn.Module) -> dict:
    """Released name (``MoeGating.linear``) -> parameter of the gate."""
    return {f"linear.{k}": p for k, p in gate.named_parameters()}


def released_config(files: Files, domains: Optional[Sequence[str]] = None, **overrides) -> MixDAConfig:
    """The :class:`MixDAConfig` that fits released checkpoint file(s): K (the domains of all files,
    in order), the layers, the reduction factor and the gate's width and depth read from the
    tensors; paper mixing, adapters and gate on the intermediate activation, a sequence gate at
    position -1 (``paper_gate_bug=True``: the released layer exactly). ``domains`` names the K
    domains; ``overrides`` set any other field (e.g. ``paper_gate_bug=False``)."""
    fn = "released_config"
    cks = _read(files, fn)
    K = sum(ck.num_domains for ck in cks)
    layers = sorted(cks[0].adapters)
    for ck in cks[1:]:
        if sorted(ck.adapters) != layers:
            raise ValueError(f"{fn}: {ck.where()} has adapters for layers {sorted(ck.adapters)}; "
                             f"{cks[0].where()} for {layers}; expected the same layers in every file")
    down = cks[0].adapters[layers[0]][0].get("adapter_down.0.weight")
    if down is None or down.dim() != 2 or 0 in down.shape:
        raise ValueError(f"{fn}: {cks[0].where()} has no 2-D 'adapter_down.0.weight' for layer {layers[0]}")
    r, F = down.shape
    factor = F // r
    if factor < 1 or F // factor != r:
        raise ValueError(f"{fn}: {cks[0].where()} has adapter bottleneck r={r} for intermediate size {F}; no "
                         f"MixDAConfig.reduction_factor gives it (bottleneck = {F} // reduction_factor)")
    cfg = dict(layers=layers, reduction_factor=factor, paper_gate_bug=True, **_FITS)
    gates = next((ck.gates for ck in cks if ck.gates), None)
    if gates:
        gate = next(iter(gates.values()))
        linears = [k for k in gate if re.fullmatch(r"linear\.\d+\.weight", k)]
        if "linear.1.weight" in gate and gate["linear.1.weight"].dim() == 2:
            cfg.update(gate_layers=len(linears), gate_hidden=gate["linear.1.weight"].shape[0])
    if domains is not None:
        if not isinstance(domains, (list, tuple)) or len(domains) != K:
            raise ValueError(f"{fn}: domains={domains!r} is not accepted: the files hold {K} domains; expected "
                             f"a list of {K} names")
        cfg["domains"] = list(domains)
    else:
        cfg["num_domains"] = K
    cfg.update(overrides)
    return MixDAConfig(**cfg)


def import_released(model: nn.Module, files: Files, *, gates: Optional[bool] = None) -> nn.Module:
    """Load checkpoint file(s) of the released MixDA code into a MixDA-patched model; returns ``model``.

    ``files``: one path or a list. Each holds ``"{layer}-{j}-adapter"`` keys (``save_knowledge_adapter``)
    or ``"{layer}-adapter"`` keys (one domain, what ``load_knowledge_adapter(f_list)`` reads); the
    files' domains, in order, fill the model's K domains (``MixDAConfig.domains`` order), and every
    file must cover exactly the patched layers. ``gates``: load the ``"{layer}-gating"`` gates (True:
    every patched layer needs one; False: ignore them); None (default) loads them when one file is
    given and it holds gates, as the released ``load_knowledge_adapter`` does. The model must be
    patched like the released layer (``released_config(files)`` builds that config): paper mixing,
    adapter_input "intermediate", a sequence gate; ``paper_gate_bug=True`` reproduces the released
    layer on padded batches too (docs/design.md section 1). Every key, shape and value is checked
    and all mismatches are named in one ValueError before anything is copied.
    """
    fn = "import_released"
    state = mixda_state(model, fn)
    if gates is not None and not isinstance(gates, bool):
        raise TypeError(f"{fn}: gates={gates!r} is not accepted: expected None, True or False")
    cks = _read(files, fn)
    cfg, layers, modules = state.config, state.layers, mixda_modules(model)
    problems = _unfit(cfg)
    K = sum(ck.num_domains for ck in cks)
    if K != len(cfg.domains):
        problems.append(f"the files hold {K} domains ({', '.join(f'{ck.where()}: {ck.num_domains}' for ck in cks)}); "
                        f"the model has K={len(cfg.domains)} {list(cfg.domains)}")
    use_gates = (len(cks) == 1 and bool(cks[0].gates)) if gates is None else gates
    for ck in cks:
        if sorted(ck.adapters) != layers:
            problems.append(f"{ck.where()} has adapters for layers {sorted(ck.adapters)}; the model patches "
                            f"layers {layers}")
        if use_gates and ck.gates and sorted(set(ck.gates) - set(layers)):
            problems.append(f"{ck.where()} has gates for layers {sorted(set(ck.gates) - set(layers))}, which the "
                            f"model does not patch (patched: {layers})")
    if use_gates:
        for i in layers:
            holders = [ck for ck in cks if i in ck.gates]
            if len(holders) != 1:
                problems.append(f"'{i}-gating' is in {len(holders)} files; expected it in one "
                                f"(gates=True or one file with gates)")
    if problems:
        raise ValueError(f"{fn}: the files do not fit this model: " + "; ".join(problems))

    copies = []                                          # (target parameters, tensors), all checked first
    offset = 0
    for ck in cks:
        names = list(cfg.domains)[offset:offset + ck.num_domains]
        offset += ck.num_domains
        blocks = [(f"{i}-adapter" if ck.one_domain else f"{i}-{j}-adapter", ck.adapters[i][j],
                   _adapter_targets(modules[i].adapters[name])) for i in layers for j, name in enumerate(names)]
        if use_gates:
            blocks += [(f"{i}-gating", ck.gates[i], _gate_targets(modules[i].gate)) for i in layers if i in ck.gates]
        for key, tensors, targets in blocks:
            try:
                check_tensors(targets, tensors, f"{ck.where(key)}")
            except ValueError as e:
                problems.append(str(e))
            copies.append((targets, tensors))
    if problems:
        raise ValueError(f"{fn}: " + "; ".join(problems))
    with torch.no_grad():
        for targets, tensors in copies:
            for k, t in tensors.items():
                targets[k].copy_(t)
    return model


def export_released(model: nn.Module, path: Union[str, os.PathLike], *, domain: Optional[str] = None) -> Path:
    """Write a MixDA-patched model's adapters and gates in the released code's layout; returns the file.

    ``domain=None``: one file as ``save_knowledge_adapter`` writes it, ``"{layer}-{j}-adapter"`` (j
    in domain order) and ``"{layer}-gating"`` per patched layer, in layer order; ``domain="name"``:
    that domain's adapters under ``"{layer}-adapter"``, what the released stage 2
    (``load_knowledge_adapter(f_list)``) reads, one file per domain. Tensors are CPU copies in the
    model's dtype; :func:`import_released` of the file restores them bit for bit. ``path``: a file
    or an existing folder (then ``mixda_released.pt`` / ``mixda_released_<domain>.pt`` inside it);
    an existing file is replaced only when it is a released checkpoint. Written atomically.
    """
    fn = "export_released"
    as_path(path, fn)
    state = mixda_state(model, fn)
    check_member(model, domain, fn, "mixda")
    path = file_in(path, fn, _file_name(domain), writing=True)
    if path.exists() and not _is_released(path, fn):
        raise ValueError(f"{fn}: path={str(path)!r} is not accepted: it exists and is not a released MixDA "
                         "checkpoint; expected a new file name, an existing folder or such a file to replace")
    cfg = state.config
    if _unfit(cfg):
        raise ValueError(f"{fn}: the model is not patched like the released layer: " + "; ".join(_unfit(cfg)))

    def detached(targets: dict) -> OrderedDict:   # own storage: adapters' down weights are views of a packed buffer
        return OrderedDict((k, p.detach().to("cpu", copy=True).contiguous()) for k, p in targets.items())

    out = {}
    for i, m in mixda_modules(model).items():
        if domain is not None:
            out[f"{i}-adapter"] = detached(_adapter_targets(m.adapters[domain]))
            continue
        for j, name in enumerate(cfg.domains):
            out[f"{i}-{j}-adapter"] = detached(_adapter_targets(m.adapters[name]))
        out[f"{i}-gating"] = detached(_gate_targets(m.gate))
    return write_atomic(path, lambda f: torch.save(out, f))
