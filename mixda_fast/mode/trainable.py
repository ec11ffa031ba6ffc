"""Which parameters train in each MoDE stage (docs/design.md section 3).

Reached through :func:`mixda_fast.mark_trainable`, which freezes everything first (the backbone
is frozen in every stage but "all"), checks the stage and the domain, and then calls
:func:`unfreeze`:

- ``"domain"`` (stage 1): the experts and the gates; with ``domain``, only that expert (and the gates).
- ``"compose"`` (stage 2): the gates, and the experts unless ``MoDEConfig.freeze_experts``.
- ``"none"``: nothing; ``"all"``: everything (the full fine-tuning baseline).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..core.patch import PatchState
from .patching import mode_blocks

__all__ = ["MODE_STAGES", "unfreeze"]

MODE_STAGES = ("domain", "compose", "none", "all")


def unfreeze(model: nn.Module, state: PatchState, stage: str, domain: Optional[str]) -> None:
    """``requires_grad`` on for what ``stage`` ("domain" or "compose") trains."""
    train_experts = stage == "domain" or not state.config.freeze_experts
    for block in mode_blocks(model):
        block.gate.requires_grad_(True)
        for name, expert in block.experts.items():
            expert.requires_grad_(train_experts and (domain is None or name == domain))
