"""Which parameters train in each MoDE stage (DESIGN.md section 3).

Reached through :func:`mixda_fast.mark_trainable` when the model carries a MoDE patch:

- ``"domain"`` (stage 1): the experts and the gates; with ``domain``, only that expert (and the gates).
- ``"compose"`` (stage 2): the gates, and the experts unless ``MoDEConfig.freeze_experts``.
- ``"none"``: nothing; ``"all"``: everything (the full fine-tuning baseline).

The backbone is frozen in every stage but "all".
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .patching import mode_blocks, mode_state

__all__ = ["MODE_STAGES", "mark_trainable_mode"]

MODE_STAGES = ("domain", "compose", "none", "all")


def mark_trainable_mode(model: nn.Module, stage: str, domain: Optional[str] = None) -> nn.Module:
    if stage not in MODE_STAGES:
        raise ValueError(f"mark_trainable: stage={stage!r} is not accepted for a MoDE-patched model: expected one "
                         f"of {' | '.join(repr(s) for s in MODE_STAGES)}")
    config = mode_state(model, "mark_trainable").config
    if domain is not None:
        if stage != "domain":
            raise ValueError(f"mark_trainable: domain={domain!r} is only accepted with stage='domain', "
                             f"got stage={stage!r}")
        if domain not in config.domains:
            raise ValueError(f"mark_trainable: domain={domain!r} is not accepted: the model's experts are "
                             f"{list(config.domains)}")
    for p in model.parameters():
        p.requires_grad_(stage == "all")
    if stage in ("domain", "compose"):
        train_experts = stage == "domain" or not config.freeze_experts
        for block in mode_blocks(model):
            block.gate.requires_grad_(True)
            for name, expert in block.experts.items():
                expert.requires_grad_(train_experts and (domain is None or name == domain))
    return model
