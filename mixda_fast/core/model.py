"""What the core knows of a HuggingFace model: the transformer under the head, its layer list,
the head's parameters, parameter counts. No method is named here."""

from __future__ import annotations

import torch.nn as nn

from .families import FamilySpec
from .projections import is_quantized
from .wrappers import unwrap

__all__ = ["base_model_of", "layer_list", "head_parameters", "gate_parameters", "count_parameters",
           "check_trainable", "check_head_trainable"]


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformer under any task head (``model.base_model`` for HF models), also inside a
    PEFT ``PeftModel`` (whose own ``base_model`` is PEFT's tuner)."""
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def layer_list(model: nn.Module, model_type: str, spec: FamilySpec, fn: str) -> nn.ModuleList:
    """The transformer layers at ``base_model.<spec.layers>``; ``fn`` starts the error."""
    try:
        return base_model_of(model).get_submodule(spec.layers)
    except AttributeError as e:
        raise ValueError(f"{fn}: family {model_type!r} expects the layers at base_model.{spec.layers}, "
                         f"which this model does not have ({e})") from None


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the task head: outside the base transformer and not tied to it (an LM head
    tied to the word embeddings is not a head to train)."""
    base = base_model_of(model)
    if base is model:
        return []
    in_base = {id(p) for p in base.parameters()}
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    return [p for p in model.parameters() if id(p) not in in_base and p.data_ptr() not in base_ptrs]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the modules a method marks as gates (class or instance attribute
    ``is_gate = True``: MixDA's gate MLPs, MoDE's block gates)."""
    return [p for m in model.modules() if getattr(m, "is_gate", False) for p in m.parameters()]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_trainable(model: nn.Module, params, where: str) -> None:
    """A ValueError naming the first of ``params`` that cannot require grad: an integer tensor, the
    storage of a quantized module (bitsandbytes' int8 and packed 4-bit weights). ``where`` starts it."""
    bad = next((p for p in params if not (p.is_floating_point() or p.is_complex())), None)
    if bad is not None:
        name = next((n for n, p in model.named_parameters() if p is bad), "?")
        raise ValueError(
            f"{where}: parameter {name!r} of dtype {bad.dtype} is not accepted: expected floating-point "
            "parameters (a quantized module cannot train); keep that module unquantized (bitsandbytes: "
            "BitsAndBytesConfig(llm_int8_skip_modules=[...]); torch.ao: leave it out of quantize_dynamic)")


def check_head_trainable(model: nn.Module, where: str) -> None:
    """A ValueError when the task head cannot train: a parameter that is not floating point
    (bitsandbytes, :func:`check_trainable`), or a quantized module with no parameter at all
    (torch.ao's dynamic Linear keeps its weight packed behind a method: nothing would train)."""
    check_trainable(model, head_parameters(model), where)
    base = base_model_of(model)
    if base is model:
        return
    in_base = {id(m) for m in base.modules()}
    name = next((n for n, m in model.named_modules() if id(m) not in in_base and is_quantized(m)), None)
    if name is not None:
        raise ValueError(
            f"{where}: module {name!r} ({type(model.get_submodule(name)).__name__}) is quantized and is not "
            "accepted: expected a float task head (a quantized module cannot train); keep it unquantized "
            "(torch.ao: quantize only model.base_model; bitsandbytes: llm_int8_skip_modules=[...])")
