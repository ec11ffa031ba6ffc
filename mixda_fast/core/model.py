"""What the core knows of a HuggingFace model: the transformer under the head, its layer list,
the head's parameters, parameter counts. No method is named here."""

from __future__ import annotations

import torch.nn as nn

from .families import FamilySpec
from .projections import quantized_modules
from .wrappers import unwrap

__all__ = ["base_model_of", "layer_list", "head_parameters", "gate_parameters", "count_parameters",
           "check_trainable"]


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


def check_trainable(model: nn.Module, where: str, head_only: bool = False) -> None:
    """A ValueError naming the first quantized module of ``model`` (of its task head only, with
    ``head_only``), which cannot train: a parameter that is not floating point (bitsandbytes'
    int8 and packed 4-bit weights) is named as such; torch.ao's dynamic Linear, which keeps its
    weight packed behind a method and has no parameter at all, by its module. ``where`` starts it."""
    base = base_model_of(model) if head_only else None
    if base is model:
        return                                           # no head
    skip = {id(m) for m in base.modules()} if base is not None else set()
    found = next(((name, m) for name, m in quantized_modules(model) if id(m) not in skip), None)
    if found is not None:
        name, m = found
        bad = next(((n, p) for n, p in m.named_parameters(recurse=False)
                    if not (p.is_floating_point() or p.is_complex())), None)
        what = (f"parameter {(name + '.' if name else '') + bad[0]!r} of dtype {bad[1].dtype}" if bad else
                f"module {name!r} ({type(m).__name__}, quantized)")
        raise ValueError(
            f"{where}: {what} is not accepted: expected floating-point parameters (a quantized module cannot "
            "train); keep that module unquantized (bitsandbytes: BitsAndBytesConfig(llm_int8_skip_modules=[...]); "
            "torch.ao: quantize model.base_model only, or leave the module out of quantize_dynamic)")
