"""What the baselines need to be trained like MixDA: PEFT LoRA on every attention and FFN
projection of a BERT-style encoder (at a rank chosen for a parameter budget), and stage 1 of the
baselines (LoRA, full fine-tuning): the same Trainer, data and masked-LM loss as MixDA's stage 1,
without L_old (an unpatched model has no FFN output to hold)."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch.nn as nn

from ..core.extras import require
from .data import KnowledgeCollator, Stage1Collator, encode_knowledge, load_knowledge
from .losses import Stage1Model
from .trainer import MixDATrainer, StageResult, StepTimer, training_arguments

__all__ = ["LORA_TARGETS", "lora_config", "lora_rank_for", "train_masked_lm"]

LORA_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                r"intermediate\.dense|output\.dense)")


def lora_config(rank: int, task_type: Optional[str] = None, modules_to_save=None, extra: str = "demo"):
    """``peft.LoraConfig`` of rank ``rank`` (alpha 2 * rank, no dropout) on :data:`LORA_TARGETS`."""
    peft = require("peft", extra, "the LoRA baseline")
    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           task_type=task_type, modules_to_save=modules_to_save)


def lora_params_per_rank(model: nn.Module) -> int:
    """Trainable parameters of rank-1 LoRA on :data:`LORA_TARGETS` of every layer."""
    c = model.config
    d, ff = c.hidden_size, c.intermediate_size
    return c.num_hidden_layers * (4 * 2 * d + 2 * (d + ff))


def lora_rank_for(model: nn.Module, trainable: int, extra: int = 0) -> int:
    """The LoRA rank (on q, k, v, attention output, FFN up and down of every layer) whose
    trainable parameters (+ ``extra``, e.g. a classifier) come closest to ``trainable``."""
    return max(1, round((trainable - extra) / lora_params_per_rank(model)))


def train_masked_lm(model: nn.Module, tokenizer, knowledge, output_dir: Union[str, os.PathLike], *,
                    max_length: int = 128, training_args: Optional[dict] = None) -> StageResult:
    """Train whatever of ``model`` (a masked LM) requires grad on the masked-LM loss of
    ``knowledge`` (a file or a :func:`load_knowledge` dataset), with MixDA's stage-1 Trainer."""
    if isinstance(knowledge, (str, os.PathLike)):
        knowledge = load_knowledge(knowledge)
    ds = encode_knowledge(knowledge, tokenizer, causal=False, max_length=max_length)
    args = training_arguments(str(output_dir), **(training_args or {}))
    timer = StepTimer()
    trainer = MixDATrainer(model=Stage1Model(model, causal=False), args=args, train_dataset=ds,
                           data_collator=Stage1Collator(KnowledgeCollator(tokenizer, False, seed=args.seed)),
                           callbacks=[timer], old_weight=0.0)
    trainer.train()
    model.eval()
    return StageResult(model=model, trainer=trainer, timer=timer, output_dir=output_dir)
