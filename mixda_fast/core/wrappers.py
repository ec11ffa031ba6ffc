"""Models another adapter library wrapped: PEFT's ``PeftModel`` next to a patch (docs/design.md,
"Next to PEFT").

Every public function takes the model it is given or the ``PeftModel`` around it: the core
unwraps it (:func:`unwrap`) to the transformers model, which carries the patch. PEFT's own
parameters (LoRA's A and B, the ``modules_to_save`` wrappers) are not the package's:
:func:`foreign_parameters` names them, and :func:`mixda_fast.mark_trainable` leaves their
``requires_grad`` as PEFT set it unless asked to freeze them.

PEFT is optional: it is looked up in ``sys.modules`` and never imported here (no PEFT object can
exist while PEFT is not imported).
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch.nn as nn

__all__ = ["unwrap", "foreign_parameters", "foreign_state_names", "foreign_modules"]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (``get_base_model()``) or a PEFT tuner
    (``LoraModel``: ``.model``); ``model`` itself otherwise."""
    peft = sys.modules.get("peft")
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        return model.get_base_model()
    if tuners is not None and isinstance(model, getattr(tuners, "BaseTuner", ())):
        return model.model
    return model


_WRAPPERS = (("peft.tuners.tuners_utils", "BaseTunerLayer", ("base_layer",)),
             ("peft.utils.other", "AuxiliaryTrainingWrapper", ()))
"""PEFT's module classes with members of their own, and the children that are the model's: a
tuner layer's ``base_layer`` holds the host weights; everything under ``modules_to_save``'s
wrapper is PEFT's (the trainable copy, and the original it keeps frozen)."""


def _wrapper_classes() -> dict:
    """PEFT's wrapper class -> the names of its children that are the model's (see _WRAPPERS)."""
    found = {}
    for module, name, model_children in _WRAPPERS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found[cls] = model_children
    return found


def _foreign(model: nn.Module, members) -> Iterator[tuple[str, object]]:
    """(name relative to ``model``, value) of every member PEFT added, ``members(module)`` giving a
    wrapper's (name, value) pairs; what lies under the wrapped module is the model's."""
    classes = _wrapper_classes()
    if not classes:
        return
    for path, module in model.named_modules():
        model_children = next((c for cls, c in classes.items() if isinstance(module, cls)), None)
        if model_children is not None:
            for name, value in members(module):
                if name.split(".", 1)[0] not in model_children:
                    yield (f"{path}.{name}" if path else name), value


def foreign_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PEFT added to ``model`` or holds (a tuner layer's own: LoRA's ``lora_A`` /
    ``lora_B``, IA3's vectors...; both sides of a ``modules_to_save`` wrapper), each once; what a
    tuner layer wraps (``base_layer``) is the model's."""
    return list({id(p): p for _, p in _foreign(model, lambda m: m.named_parameters())}.values())


def foreign_state_names(module: nn.Module) -> set[str]:
    """The keys of ``module.state_dict()`` that PEFT added (see :func:`foreign_parameters`)."""
    return {name for name, _ in _foreign(module, lambda m: m.state_dict(keep_vars=True).items())}


def foreign_modules(model: nn.Module, within: list) -> list[tuple[str, nn.Module]]:
    """(name in ``model``, module) of every PEFT wrapper module (a tuner layer such as LoRA's
    ``Linear``, a ``modules_to_save`` wrapper) inside one of the ``within`` modules (e.g. the
    transformer layers), in ``model``'s order."""
    classes = tuple(_wrapper_classes())
    inside = {id(m) for w in within for m in w.modules()}
    return [(n, m) for n, m in model.named_modules() if classes and id(m) in inside and isinstance(m, classes)]
