"""Models another adapter library wrapped: PEFT's ``PeftModel`` next to a patch (docs/design.md,
"Next to PEFT").

Every public function takes the model it is given or the ``PeftModel`` around it: the core
unwraps it (:func:`unwrap`) to the transformers model, which carries the patch. PEFT's own
parameters (LoRA's A and B, the trainable copies of ``modules_to_save``) are not the package's:
:func:`foreign_parameters` names them, and :func:`mixda_fast.mark_trainable` leaves their
``requires_grad`` as PEFT set it unless asked to freeze them.

PEFT is optional: it is looked up in ``sys.modules`` and never imported here (no PEFT object can
exist while PEFT is not imported).
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch.nn as nn

__all__ = ["unwrap", "foreign_parameters", "foreign_state_names"]

_BASE_NAMES = ("base_layer", "original_module")
"""Where PEFT's wrappers keep the module they wrap (a tuner layer; ``modules_to_save``)."""


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


def _wrapper_classes() -> tuple:
    """PEFT's module classes that add parameters of their own around a wrapped module."""
    found = []
    for module, name in (("peft.tuners.tuners_utils", "BaseTunerLayer"),
                         ("peft.utils.other", "AuxiliaryTrainingWrapper")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _foreign(model: nn.Module, members) -> Iterator[tuple[str, object]]:
    """(name relative to ``model``, value) of every member PEFT added, ``members(module)`` giving a
    wrapper's (name, value) pairs; what lies under the wrapped module is the model's."""
    classes = _wrapper_classes()
    if not classes:
        return
    for path, module in model.named_modules():
        if isinstance(module, classes):
            for name, value in members(module):
                if name.split(".", 1)[0] not in _BASE_NAMES:
                    yield (f"{path}.{name}" if path else name), value


def foreign_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PEFT added to ``model`` (a tuner layer's own: LoRA's ``lora_A`` / ``lora_B``,
    IA3's vectors...; the trainable copies of ``modules_to_save``), each once; the wrapped
    modules' weights (``base_layer``, ``original_module``) are the model's, not PEFT's."""
    return list({id(p): p for _, p in _foreign(model, lambda m: m.named_parameters())}.values())


def foreign_state_names(module: nn.Module) -> set[str]:
    """The keys of ``module.state_dict()`` that PEFT added (see :func:`foreign_parameters`)."""
    return {name for name, _ in _foreign(module, lambda m: m.state_dict(keep_vars=True).items())}
