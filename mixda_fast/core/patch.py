"""Patching a model with a method and taking it out again: the method registry and the journal.

The core knows no method (the shape of PEFT's ``tuners`` registry). A method package
(:mod:`mixda_fast.mixda`, :mod:`mixda_fast.mode`) calls :func:`register_method` with its config
class; :func:`patch_model`, :func:`unpatch_model` and :func:`mark_trainable` look the method up
by the config's type (or by the state a patch left on the model) and never name one.

A method's ``patch`` builds every new module first and then changes the model only through a
:class:`Journal` (module swaps, added modules, hooks, clean-up callbacks). If anything fails, the
journal is undone in reverse and the model is exactly as it was; :func:`unpatch_model` undoes the
same journal. ``model.config.mixda_fast`` records the method and its config for
transformers' ``model.save_pretrained`` (:func:`mixda_fast.load_patched`).

Every function here accepts a PEFT ``PeftModel`` for the model it wraps (:mod:`.wrappers`): the
patch lives on the transformers model inside it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from .families import FamilySpec
from .validate import check_choice
from .wrappers import foreign_parameters, unwrap
from .model import check_trainable
from .projections import without_backward

__all__ = ["Method", "PatchState", "Journal", "register_method", "methods", "method_named", "patch_model",
           "unpatch_model", "patching", "mark_trainable", "MARK_OTHERS", "is_patched", "patch_state", "check_member", "attribute_set", "CONFIG_KEY", "STATE_ATTR"]

STATE_ATTR = "_mixda_fast_state"
"""Attribute of a patched model that holds its :class:`PatchState`."""
CONFIG_KEY = "mixda_fast"
"""Attribute of ``model.config`` (a key of ``config.json``): {"method": name, "config": {...}}."""


@dataclass(frozen=True)
class Method:
    """What the core needs to know of a method."""

    name: str
    """Recorded in ``config.json`` ("mixda", "mode")."""
    title: str
    """For messages ("MixDA", "MoDE")."""
    config_class: type
    patch: Callable[[nn.Module, Any, "Journal"], "PatchState"]
    """Builds the patch and applies it through the journal; returns the state (config resolved)."""
    stages: tuple[str, ...]
    """The stages :func:`mark_trainable` accepts for a model patched with this method."""
    unfreeze: Callable[[nn.Module, "PatchState", str, Optional[str]], None]
    """Turns ``requires_grad`` on for what a stage trains (everything else is already frozen)."""
    functions: str = ""
    """The method's own functions, named when a call meant for another method gets this one."""
    stage_note: str = ""
    """Added to the bad-stage message (e.g. " for a MoDE-patched model")."""
    members: str = "domains"
    """What ``config.domains`` names, for messages ("domains", "experts")."""
    tensors: Optional[Callable[[nn.Module], dict]] = None
    """Name -> live tensor of everything the patch adds (every member and the gates), under
    names that do not depend on the task head: what an adapter folder's
    ``adapter_model.safetensors`` holds (:mod:`.adapter_folder`); loading copies into them."""
    describe: Optional[Callable[[nn.Module], dict]] = None
    """What the patch covers, as JSON (MixDA: the patched layers; MoDE: the blocks, the layer
    class, depth and width): recorded in ``adapter_config.json``, and a rebuilt patch must match it."""
    legacy_file: str = ""
    """The whole-patch file of the method's own format (``save_adapters`` / ``save_experts``
    with no domain) that :func:`~.adapter_folder.from_pretrained` also reads from a folder."""
    legacy_format: str = ""
    """The ``format`` in that file's metadata (:mod:`.io`)."""
    load_legacy: Optional[Callable[[nn.Module, Any], Any]] = None
    """``load_legacy(model, path)`` loads such a file into a model patched with its config."""

    def __deepcopy__(self, memo) -> "Method":
        return self                     # one per method: a copied model's state keeps it


@dataclass
class PatchState:
    """What a patch left on the model; a method subclasses it with its own fields."""

    config: Any
    model_type: str
    spec: FamilySpec
    method: Optional[Method] = None          # set by patch_model
    journal: Optional["Journal"] = None      # set by patch_model


class _Swap:
    def __init__(self, parent: nn.Module, name: str, original: nn.Module):
        self.parent, self.name, self.original = parent, name, original

    def remove(self) -> None:
        setattr(self.parent, self.name, self.original)


class _Added:
    def __init__(self, parent: nn.Module, name: str):
        self.parent, self.name = parent, name

    def remove(self) -> None:
        self.parent._modules.pop(self.name, None)


class Journal:
    """Every change a patch makes to a model, in order, each an object whose ``remove()`` undoes
    it. Entries are data (modules, hook handles), not closures, so ``copy.deepcopy(model)`` gives
    the copy a journal of its own modules."""

    def __init__(self) -> None:
        self.entries: list = []

    def swap(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        """``parent.<name> = module``; undone by putting the original back."""
        self.entries.append(_Swap(parent, name, getattr(parent, name)))
        setattr(parent, name, module)

    def add_module(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        """A new child ``parent.<name>``; undone by removing it."""
        parent.add_module(name, module)
        self.entries.append(_Added(parent, name))

    def hook(self, *handles) -> None:
        """Objects whose ``remove()`` undoes a change: hook handles, clean-up actions."""
        self.entries.extend(handles)

    def undo(self) -> None:
        """Undo every change, the latest first."""
        while self.entries:
            self.entries.pop().remove()


_METHODS: dict[type, Method] = {}


def register_method(method: Method) -> None:
    """Make ``patch_model(model, method.config_class(...))`` patch with ``method``."""
    _METHODS[method.config_class] = method


def methods() -> list[Method]:
    return list(_METHODS.values())


def method_named(name: str) -> Optional[Method]:
    return next((m for m in _METHODS.values() if m.name == name), None)


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the model a PeftModel wraps) carries a patch of any method."""
    return isinstance(getattr(unwrap(model), STATE_ATTR, None), PatchState)


def patch_state(model: nn.Module, fn: str, method: Optional[str] = None) -> PatchState:
    """The model's patch state; ``method`` (a name) requires that method. ``fn`` starts errors."""
    state = getattr(unwrap(model), STATE_ATTR, None)
    wanted = method_named(method) if method else None
    if not isinstance(state, PatchState):
        how = f"mixda_fast.{wanted.config_class.__name__}(...)" if wanted else "config"
        raise ValueError(f"{fn}: model={type(model).__name__} is not patched{f' with {wanted.title}' if wanted else ''}: "
                         f"call mixda_fast.patch_model(model, {how}) first")
    if wanted is not None and state.method.name != wanted.name:
        have = state.method
        raise ValueError(f"{fn}: model={type(model).__name__} is patched with {have.title}, not {wanted.title}; "
                         f"use the {have.title} functions ({have.functions})")
    return state


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


def _record_patch(model: nn.Module, journal: Journal, method: str, config: dict) -> None:
    """Write the patch into ``model.config`` (when the model has a HF config) until undone."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        journal.hook(_Record(hf_config, {"method": method, "config": config}))


def check_member(model: nn.Module, name, fn: str, method: str) -> None:
    """Refuse ``name`` unless it names a member (domain, expert) of the model's ``method``
    patch; None passes."""
    if name is None:
        return
    state = patch_state(model, fn, method)
    if not isinstance(name, str) or name not in state.config.domains:
        raise ValueError(f"{fn}: domain={name!r} is not accepted: the model's {state.method.members} are "
                         f"{list(state.config.domains)}")


@contextlib.contextmanager
def attribute_set(objects: list, name: str, value) -> Iterator[None]:
    """Inside the block ``obj.<name>`` is ``value`` for every object; the old values come back
    after it, also on error."""
    before = [getattr(o, name) for o in objects]
    for o in objects:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, v in zip(objects, before):
            setattr(o, name, v)


def _accepted_configs() -> str:
    return " or ".join(f"a mixda_fast.{m.config_class.__name__}" for m in _METHODS.values())


def patch_model(model: nn.Module, config) -> nn.Module:
    """Patch ``model`` in place with the method of ``config`` (a :class:`~mixda_fast.MixDAConfig`:
    domain adapters and gates on the FFNs; a :class:`~mixda_fast.MoDEConfig`: expert blocks).

    Returns ``model``. The base weights keep their values (freeze them with
    :func:`mark_trainable`). ``model.config.mixda_fast`` records the patch for
    ``model.save_pretrained`` (:func:`mixda_fast.load_patched`). A PEFT ``PeftModel`` is accepted: its
    transformers model is patched, and the PeftModel is returned. Raises TypeError/ValueError naming the
    argument on bad input, and then the model is exactly as it was. See each method's ``patch``
    (:func:`mixda_fast.mixda.patching.patch_mixda`, :func:`mixda_fast.mode.patching.patch_mode`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model={type(model).__name__} is not accepted: expected a torch.nn.Module "
                        "(a HuggingFace PreTrainedModel)")
    method = _METHODS.get(type(config))
    if method is None:
        raise TypeError(f"patch_model: config={config!r} is not accepted: expected {_accepted_configs()}")
    if is_patched(model):
        raise ValueError("patch_model: model is already patched; call mixda_fast.unpatch_model(model) "
                         "before patching it again")
    target = unwrap(model)                   # a PeftModel: the transformers model inside it
    journal = Journal()
    try:
        state = method.patch(target, config, journal)
        state.method, state.journal = method, journal
        _record_patch(target, journal, method.name, state.config.to_dict())
        setattr(target, STATE_ATTR, state)
    except BaseException:
        journal.undo()
        raise
    return model


@contextlib.contextmanager
def patching(model: nn.Module, config) -> Iterator[nn.Module]:
    """:func:`patch_model`, for a block that loads what the patch needs (its tensors from a file):
    when the block raises, the patch is undone and the model is exactly as it was before."""
    patch_model(model, config)
    try:
        yield model
    except BaseException:
        unpatch_model(model)
        raise


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo the patch: every original module is back and every hook removed, so the model
    computes exactly what it computed before :func:`patch_model`. Returns ``model``."""
    state = patch_state(model, "unpatch_model")
    state.journal.undo()
    delattr(unwrap(model), STATE_ATTR)
    return model


MARK_OTHERS = ("keep", "freeze")
"""What :func:`mark_trainable` does with parameters another adapter library added (PEFT's)."""


def mark_trainable(model: nn.Module, stage: str, domain: Optional[str] = None, others: str = "keep") -> nn.Module:
    """Set ``requires_grad`` for a training stage; everything else is frozen. Returns ``model``.

    Every method has ``"none"`` (nothing trains) and ``"all"`` (everything: the full fine-tuning
    baseline), which an unpatched model accepts too. MixDA adds ``"domain"`` (domain adapters and
    gates; with ``domain``, only that domain's adapters and the gates) and ``"task"`` (gates, task
    adapters and the task head); MoDE adds ``"domain"`` (experts and gates; with ``domain`` only
    that expert) and ``"compose"`` (gates, and the experts unless ``MoDEConfig.freeze_experts``).

    ``model`` may be a PEFT ``PeftModel``. ``others`` says what happens to the parameters PEFT
    added (LoRA's A and B, ``modules_to_save`` wrappers; :func:`~.wrappers.foreign_parameters`):
    ``"keep"`` (default) leaves their ``requires_grad`` exactly as it was, in every stage, so
    ``get_peft_model`` then ``mark_trainable(model, "domain")`` trains LoRA and the domain
    adapters together; ``"freeze"`` freezes them in every stage but ``"all"`` (a task head inside
    PEFT's ``modules_to_save`` wrapper included: "task" then trains no head).
    The host model's own weights (under PEFT's ``base_layer`` too) are frozen either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mark_trainable: model={type(model).__name__} is not accepted: expected a torch.nn.Module")
    check_choice("mark_trainable: others", others, MARK_OTHERS)
    target = unwrap(model)
    state = getattr(target, STATE_ATTR, None)
    method = state.method if isinstance(state, PatchState) else None
    stages = method.stages if method else tuple(dict.fromkeys(s for m in _METHODS.values() for s in m.stages))
    if stage not in stages:
        raise ValueError(f"mark_trainable: stage={stage!r} is not accepted{method.stage_note if method else ''}: "
                         f"expected one of {' | '.join(repr(s) for s in stages)}")
    if domain is not None and stage != "domain":
        raise ValueError(f"mark_trainable: domain={domain!r} is only accepted with stage='domain', got stage={stage!r}")
    if stage not in ("none", "all"):
        state = patch_state(target, "mark_trainable")
        check_member(target, domain, "mark_trainable", method.name)
    if stage == "all":
        check_trainable(target, "mark_trainable: stage='all'")
    blocked = without_backward(target) if stage != "none" else []
    if blocked:
        warnings.warn(
            f"mark_trainable: {len(blocked)} modules (first: {blocked[0]!r}) are torch.ao dynamic quantized "
            "Linear, which has no backward in PyTorch: no gradient passes through them, so a loss reaches the "
            "trainable parameters only around them (not at all through a quantized head). Train on the float "
            "model and load the adapters into the quantized one (README 'Quantized base models')", stacklevel=2)
    # PEFT's parameters end as they were ("keep") or frozen ("freeze"; "all" trains them), whatever the
    # stage unfroze: a PEFT modules_to_save wrapper around the task head holds head parameters too
    kept = [(p, p.requires_grad if others == "keep" else stage == "all") for p in foreign_parameters(target)]
    before = [(p, p.requires_grad) for p in target.parameters()]
    try:
        for p in target.parameters():
            p.requires_grad_(stage == "all")
        if method is not None and stage not in ("none", "all"):
            method.unfreeze(target, state, stage, domain)
    except Exception:                    # a method's refusal (a quantized head) leaves the flags as they were
        for p, flag in before:
            p.requires_grad_(flag)
        raise
    for p, flag in kept:
        p.requires_grad_(flag)
    return model
