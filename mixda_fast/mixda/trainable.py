"""Which parameters train in each MixDA stage (docs/design.md section 2).

Reached through :func:`mixda_fast.mark_trainable`, which freezes everything first, checks the
stage and the domain, and then calls :func:`unfreeze`:

The gates train in both stages unless their softmax has one entry (residual mixing with K = 1),
which is constant and gets no gradient.

- ``"domain"`` (stage 1): domain adapters and gates; with ``domain``, only that domain's adapters
  (plus the gates).
- ``"task"`` (stage 2): gates, task adapters and the task head (domain adapters frozen).
- ``"none"``: nothing; ``"all"``: everything (the full fine-tuning baseline).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..core.model import check_trainable, head_parameters
from ..core.patch import PatchState
from .patching import mixda_modules

__all__ = ["STAGES", "unfreeze"]

STAGES = ("domain", "task", "none", "all")


def unfreeze(model: nn.Module, state: PatchState, stage: str, domain: Optional[str]) -> None:
    """``requires_grad`` on for what ``stage`` ("domain" or "task") trains; a ValueError first when
    the task head is quantized (bitsandbytes' int8 weights, torch.ao's packed ones cannot train)."""
    if stage == "task":
        check_trainable(model, "mark_trainable: stage='task': the task head", head_only=True)
    for m in mixda_modules(model).values():
        m.gate.requires_grad_(m.mixda_config.gate_width > 1)   # a one-entry softmax is constant: no gradient
        if stage == "domain":
            for name, adapter in m.adapters.items():
                adapter.requires_grad_(domain is None or name == domain)
    if stage == "task":
        for module in model.modules():
            if getattr(module, "is_task_adapter", False):
                module.requires_grad_(True)
        for p in head_parameters(model):
            p.requires_grad_(True)
