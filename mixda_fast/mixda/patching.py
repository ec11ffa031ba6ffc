"""Injecting MixDA layers into a HuggingFace model in place (the MixDA half of
:func:`mixda_fast.patch_model`), and what a patched model offers.

PEFT's shape: :func:`patch_mixda` swaps each chosen layer's FFN module for a
:class:`~mixda_fast.mixda.layer.MixDAFFN` that keeps the original as ``host_ffn``; every change
goes through the core's journal, so ``unpatch_model`` (or a failed patch) puts every original
module back and the model computes exactly what it did before. Every new module is built before
the first swap.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch.nn as nn

from ..core.call_state import CallState
from ..core.families import FamilySpec, family_of, is_causal
from ..core.model import base_model_of, layer_list
from ..core.patch import Journal, PatchState, attribute_set, patch_state
from ..core.projections import floating_dtype
from .config import MixDAConfig
from .forcing import KeywordHook
from .layer import FFNOutputBypass, MixDAFFN
from .state_dict_names import register_name_hooks

__all__ = ["patch_mixda", "mixda_modules", "mixda_state", "patch_config", "adapters_disabled"]


@dataclass
class MixDAPatchState(PatchState):
    layers: list[int] = field(default_factory=list)
    calls: Optional[CallState] = None


def mixda_state(model: nn.Module, fn: str = "mixda_state") -> MixDAPatchState:
    """The state of a MixDA patch; ``fn`` starts the error when ``model`` has none."""
    return patch_state(model, fn, "mixda")


def patch_config(model: nn.Module) -> MixDAConfig:
    """The config the model was patched with, ``gate`` resolved."""
    return mixda_state(model, "patch_config").config


def _resolve_layers(requested, n_layers: int) -> list[int]:
    if requested is None:
        return list(range(n_layers))
    out = []
    for i in requested:
        if not -n_layers <= i < n_layers:
            raise ValueError(f"MixDAConfig.layers={list(requested)!r} is not accepted for this model: "
                             f"index {i} is out of range; the model has {n_layers} layers, accepted "
                             f"indices are {-n_layers} .. {n_layers - 1}")
        out.append(i % n_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"MixDAConfig.layers={list(requested)!r} is not accepted: it names a layer "
                         f"twice (as 0-based indices: {out})")
    return sorted(out)


def _split_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _resolved(config: MixDAConfig, model: nn.Module, spec: FamilySpec, model_type: str) -> MixDAConfig:
    """A copy of ``config`` with ``gate`` decided for this model: "token" for causal LMs,
    "sequence" for encoders. "sequence" on a causal LM is refused: the gate reads the sequence's
    last token, so every position would see the tokens after it."""
    causal = is_causal(model, spec)
    if config.gate == "sequence" and causal:
        raise ValueError(
            f"MixDAConfig.gate='sequence' is not accepted for model_type={model_type!r}, a causal LM: the "
            "sequence gate reads the last token, so every position would see later tokens; expected "
            "gate='token' (or None, which picks it)")
    if config.gate is not None:
        return dataclasses.replace(config)
    return dataclasses.replace(config, gate="token" if causal else "sequence")


class _ReleaseHostWeights:
    """Journal entry: W2 / b2 packed with the adapters get their own storage back."""

    def __init__(self, modules: list[MixDAFFN]):
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            m.release_host_weights()


def patch_mixda(model: nn.Module, config: MixDAConfig, journal: Journal) -> MixDAPatchState:
    """Add MixDA domain adapters and a gate to the FFNs that ``config.layers`` chooses.

    ``config.gate=None`` becomes "token" for causal LMs and "sequence" for encoders in a copy of
    the config (:func:`patch_config`); "sequence" on a causal LM is refused (it would let every
    position see later tokens). W2 is packed with the adapters (``MixDAFFN.pack_adapters``) until
    the patch is undone.
    """
    model_type, spec = family_of(model)
    host_layers = layer_list(model, model_type, spec, "patch_model")
    layers = _resolve_layers(config.layers, len(host_layers))
    config = _resolved(config, model, spec, model_type)
    base = base_model_of(model)
    calls = CallState(base, host_layers)
    dtype = floating_dtype(model)        # the adapters' dtype where a quantized W2 does not say its own

    # Build everything first: nothing in the model changes until every module exists.
    plans = []
    for i in layers:
        layer = host_layers[i]
        ffn_parent, ffn_name = _split_parent(layer, spec.ffn)
        base_ffn = getattr(ffn_parent, ffn_name)
        if isinstance(base_ffn, MixDAFFN):
            raise ValueError(f"patch_model: layer {i} already holds a MixDAFFN")
        moved = None
        if not spec.rel(spec.down):
            down_parent, down_name = _split_parent(layer, spec.down)
            moved = (down_parent, down_name, getattr(down_parent, down_name))
        new = MixDAFFN(base_ffn, spec, config, moved[2] if moved else None, calls, i, dtype)
        new.train(base_ffn.training)     # a model patched in eval mode stays in eval mode
        plans.append((ffn_parent, ffn_name, new, moved))

    journal.hook(_ReleaseHostWeights([new for _, _, new, _ in plans]))     # undone last
    for ffn_parent, ffn_name, new, moved in plans:
        journal.swap(ffn_parent, ffn_name, new)
        if moved:
            journal.swap(moved[0], moved[1], FFNOutputBypass())
    journal.hook(*calls.register(base))
    keyword = KeywordHook(calls, config.domains, config.gate_width, layers)     # model(..., mixda_domains=)
    journal.hook(model.register_forward_pre_hook(keyword, with_kwargs=True, prepend=True),
                 model.register_forward_hook(keyword.leave, with_kwargs=True, always_call=True))
    journal.hook(*register_name_hooks([host_layers[i] for i in layers], spec))
    for _, _, new, _ in plans:
        new.pack_for_forward()           # now, not in a forward: threads may share the model
    return MixDAPatchState(config=config, model_type=model_type, spec=spec, layers=layers, calls=calls)


def mixda_modules(model: nn.Module) -> dict[int, MixDAFFN]:
    """The patched FFNs of ``model``, keyed by 0-based layer index."""
    state = mixda_state(model, "mixda_modules")
    layers = layer_list(model, state.model_type, state.spec, "mixda_modules")
    return {i: layers[i].get_submodule(state.spec.ffn) for i in state.layers}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every patched FFN is its host FFN exactly (for the old-knowledge loss)."""
    with attribute_set(list(mixda_modules(model).values()), "adapters_enabled", False):
        yield model
