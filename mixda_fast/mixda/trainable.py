"""Which parameters train in each MixDA stage (DESIGN.md section 2), as one named function."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .patching import base_model_of, mixda_modules

__all__ = ["mark_trainable", "count_parameters", "STAGES"]

STAGES = ("domain", "task", "none", "all")


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the task head: outside the base transformer and not tied to it (an LM head
    tied to the word embeddings is not a head to train)."""
    base = base_model_of(model)
    if base is model:
        return []
    in_base = {id(p) for p in base.parameters()}
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    return [p for p in model.parameters() if id(p) not in in_base and p.data_ptr() not in base_ptrs]


def mark_trainable(model: nn.Module, stage: str, domain: Optional[str] = None) -> nn.Module:
    """Set ``requires_grad`` for a training stage; everything else is frozen.

    - ``"domain"``: domain adapters and gates (stage 1); with ``domain``, only that domain's
      adapters (plus the gates).
    - ``"task"``: gates, task adapters and the task head (stage 2; domain adapters frozen).
    - ``"none"``: nothing trains (inference). ``"all"``: everything (full fine-tuning baseline).
    Returns ``model``. A MoDE-patched model has the stages "domain" (experts + gates), "compose"
    (gates, + experts unless ``MoDEConfig.freeze_experts``), "none" and "all"
    (:mod:`mixda_fast.mode.trainable`).
    """
    from ..mode.patching import is_mode_patched

    if isinstance(model, nn.Module) and is_mode_patched(model):
        from ..mode.trainable import mark_trainable_mode

        return mark_trainable_mode(model, stage, domain)
    if stage not in STAGES:
        raise ValueError(f"mark_trainable: stage={stage!r} is not accepted: expected one of "
                         f"{' | '.join(repr(s) for s in STAGES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"mark_trainable: model={type(model).__name__} is not accepted: expected a torch.nn.Module")
    mods = mixda_modules(model) if stage in ("domain", "task") else {}
    if domain is not None:
        if stage != "domain":
            raise ValueError(f"mark_trainable: domain={domain!r} is only accepted with stage='domain', "
                             f"got stage={stage!r}")
        names = next(iter(mods.values())).mixda_config.domains
        if domain not in names:
            raise ValueError(f"mark_trainable: domain={domain!r} is not accepted: the model's domains are {list(names)}")
    for p in model.parameters():
        p.requires_grad_(stage == "all")
    for m in mods.values():
        m.gate.requires_grad_(True)
        if stage == "domain":
            for name, adapter in m.adapters.items():
                adapter.requires_grad_(domain is None or name == domain)
    if stage == "task":
        for module in model.modules():
            if getattr(module, "is_task_adapter", False):
                module.requires_grad_(True)
        for p in _head_parameters(model):
            p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
