"""Injecting MixDA layers into a HuggingFace model in place, and taking them out again.

PEFT's shape: ``patch_model`` swaps each chosen layer's FFN module for a
:class:`~mixda_fast.mixda.layer.MixDAFFN` that keeps the original as ``base_layer``; ``unpatch_model``
puts every original module back, so the model computes exactly what it did before. A failed patch
leaves the model as it was: every new module is built before the first swap, and a swap that
fails is rolled back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import torch.nn as nn

from ..core.call_state import CallState
from .config import MixDAConfig
from ..core.families import FamilySpec, family_of, is_causal
from .layer import FFNOutputBypass, MixDAFFN
from ..core.pretrained import record_patch, register_name_hooks

__all__ = ["patch_model", "unpatch_model", "mixda_modules", "is_patched", "adapters_disabled",
           "base_model_of"]

_STATE = "_mixda_fast_state"


@dataclass
class _PatchState:
    config: MixDAConfig
    model_type: str
    spec: FamilySpec
    layers: list[int]
    calls: CallState
    # (parent module, attribute name, original module) for every swap, in order
    swaps: list = field(default_factory=list)
    hooks: list = field(default_factory=list)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformer under any task head (``model.base_model`` for HF models)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` carries a MixDA or a MoDE patch."""
    from ..mode.patching import is_mode_patched

    return isinstance(getattr(model, _STATE, None), _PatchState) or is_mode_patched(model)


def _state(model: nn.Module, fn: str) -> _PatchState:
    state = getattr(model, _STATE, None)
    if not isinstance(state, _PatchState):
        if is_patched(model):
            raise ValueError(f"{fn}: model={type(model).__name__} is patched with MoDE, not MixDA; use the MoDE "
                             "functions (mixda_fast.mode_blocks, save_experts, ...)")
        raise ValueError(f"{fn}: model={type(model).__name__} is not patched: call "
                         "mixda_fast.patch_model(model, config) first")
    return state


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


def patch_model(model: nn.Module, config) -> nn.Module:
    """Add MixDA domain adapters and a gate to the FFNs that ``config.layers`` chooses, in place;
    with a :class:`~mixda_fast.MoDEConfig`, add MoDE expert blocks instead (mixda_fast.mode).

    ``config.gate=None`` becomes "token" for causal LMs and "sequence" for encoders in a copy of
    the config (:func:`patch_config`); "sequence" on a causal LM is refused (it would let every
    position see later tokens). Returns ``model``. The base weights keep their values (freeze them
    with :func:`mixda_fast.mark_trainable`; W2 is packed with the adapters,
    ``MixDAFFN.pack_adapters``, until :func:`unpatch_model`). ``model.config.mixda_fast`` records
    the patch for ``save_pretrained`` (:func:`mixda_fast.load_patched`). Raises TypeError/ValueError
    naming the argument on bad input, and then the model is exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model={type(model).__name__} is not accepted: expected a torch.nn.Module "
                        "(a HuggingFace PreTrainedModel)")
    from ..mode.config import MoDEConfig

    if not isinstance(config, (MixDAConfig, MoDEConfig)):
        raise TypeError(f"patch_model: config={config!r} is not accepted: expected a mixda_fast.MixDAConfig "
                        "or a mixda_fast.MoDEConfig")
    if is_patched(model):
        raise ValueError("patch_model: model is already patched; call mixda_fast.unpatch_model(model) "
                         "before patching it again")
    if isinstance(config, MoDEConfig):
        from ..mode.patching import patch_mode

        return patch_mode(model, config)
    model_type, spec = family_of(model)
    base = base_model_of(model)
    try:
        layer_list = base.get_submodule(spec.layers)
    except AttributeError as e:
        raise ValueError(f"patch_model: family {model_type!r} expects the layers at "
                         f"base_model.{spec.layers}, which this model does not have ({e})") from None
    layers = _resolve_layers(config.layers, len(layer_list))
    config = _resolved(config, model, spec, model_type)
    calls = CallState(base, layer_list)

    # Build everything first: nothing in the model changes until every module exists.
    plans = []
    for i in layers:
        layer = layer_list[i]
        ffn_parent, ffn_name = _split_parent(layer, spec.ffn)
        base_ffn = getattr(ffn_parent, ffn_name)
        if isinstance(base_ffn, MixDAFFN):
            raise ValueError(f"patch_model: layer {i} already holds a MixDAFFN")
        moved = None
        if not spec.rel(spec.down):
            down_parent, down_name = _split_parent(layer, spec.down)
            moved = (down_parent, down_name, getattr(down_parent, down_name))
        new = MixDAFFN(base_ffn, spec, config, moved[2] if moved else None, calls, i)
        new.train(base_ffn.training)     # a model patched in eval mode stays in eval mode
        plans.append((ffn_parent, ffn_name, base_ffn, new, moved))

    state = _PatchState(config=config, model_type=model_type, spec=spec, layers=layers, calls=calls)
    try:
        for ffn_parent, ffn_name, base_ffn, new, moved in plans:
            setattr(ffn_parent, ffn_name, new)
            state.swaps.append((ffn_parent, ffn_name, base_ffn))
            if moved:
                setattr(moved[0], moved[1], FFNOutputBypass())
                state.swaps.append(moved)
        state.hooks = calls.register(base)
        state.hooks += register_name_hooks([layer_list[i] for i in layers], spec)
        for _, _, _, new, _ in plans:
            new.pack_for_forward()       # now, not in a forward: threads may share the model
        state.hooks.append(record_patch(model, "mixda", config.to_dict()))
        setattr(model, _STATE, state)
    except BaseException:
        _undo(state)
        for _, _, _, new, _ in plans:
            new.release_host_weights()
        raise
    return model


def _undo(state: _PatchState) -> None:
    for handle in reversed(state.hooks):
        handle.remove()
    for parent, name, original in reversed(state.swaps):
        setattr(parent, name, original)
    state.swaps.clear()
    state.hooks.clear()


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put every original module back and drop the adapters; the model computes exactly what it
    computed before :func:`patch_model`. Returns ``model``."""
    from ..mode.patching import is_mode_patched, unpatch_mode

    if is_mode_patched(model):
        return unpatch_mode(model)
    state = _state(model, "unpatch_model")
    for m in mixda_modules(model).values():
        m.release_host_weights()            # W2 / b2 packed with the adapters get their own storage
    _undo(state)
    delattr(model, _STATE)
    return model


def mixda_modules(model: nn.Module) -> dict[int, MixDAFFN]:
    """The patched FFNs of ``model``, keyed by 0-based layer index."""
    state = _state(model, "mixda_modules")
    base = base_model_of(model)
    layer_list = base.get_submodule(state.spec.layers)
    return {i: layer_list[i].get_submodule(state.spec.ffn) for i in state.layers}


def patch_config(model: nn.Module) -> MixDAConfig:
    return _state(model, "patch_config").config


def patch_state(model: nn.Module) -> _PatchState:
    return _state(model, "patch_state")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every patched FFN is its host FFN exactly (for the old-knowledge loss)."""
    mods = list(mixda_modules(model).values())
    before = [m.adapters_enabled for m in mods]
    for m in mods:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapters_enabled = b
