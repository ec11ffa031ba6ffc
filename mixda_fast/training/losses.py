"""The stage-1 losses (docs/design.md section 2): L = lambda * L_knowledge + L_old.

- ``knowledge_loss``: masked-LM cross-entropy on the labelled (masked) positions, or causal-LM
  cross-entropy on the labelled next tokens. The LM head runs on the labelled positions only
  (the vocabulary projection of every other position is work thrown away); the result equals
  the model's own ``loss`` (a test checks it).
- ``old_knowledge_loss``: the distance between each patched layer's output y and the same
  layer's output with its adapters switched off, f (detached), over non-padding tokens, averaged
  over layers: the paper's squared norm (default), the released code's MSE, or the norm relative
  to ||f|| (``OLD_LOSSES``). Both come from one forward that collects each patched layer's (y, f) pairs
  (``CallState.collecting``; f is computed anyway).
  The released code compared a tensor with itself, so its L_old was always 0.
- ``Stage1Model``: the HF model plus both losses in one ``forward``, so that ``Trainer`` (and the
  DDP wrapper accelerate puts around it) sees one module and one forward per step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.call_state import StopForward
from ..core.model import base_model_of
from ..core.validate import check_choice
from ..core.patch import is_patched
from ..mixda.patching import mixda_state

__all__ = ["lm_head_of", "knowledge_loss", "old_knowledge_loss", "OLD_LOSSES", "ModelObjective", "Stage1Model", "is_causal_lm"]


def is_causal_lm(model: nn.Module) -> bool:
    """True for causal LMs (GPT-2, Llama, ... ``*ForCausalLM``), False for masked LMs (BERT,
    RoBERTa ``*ForMaskedLM``); other heads go by whether the family has a masked-LM class."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    name = type(model).__name__
    if name in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values():
        return False
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return True
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def lm_head_of(model: nn.Module) -> Optional[nn.Module]:
    """The module that maps the base model's last hidden states to vocabulary logits (BERT:
    ``cls``, RoBERTa/GPT-2/Llama: ``lm_head``), or None when it cannot be found."""
    base = base_model_of(model)
    get = getattr(model, "get_output_embeddings", None)
    out_emb = get() if callable(get) else None
    if base is model or out_emb is None:
        return None
    for child in model.children():
        if child is base:
            continue
        if child is out_emb or any(m is out_emb for m in child.modules()):
            return child
    return None


def knowledge_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100 (causal: labels are the
    tokens to predict; position t predicts label t + 1, as HF shifts them). 0 with no labels."""
    head = lm_head_of(model)
    if head is None:        # unknown layout: the model's own loss (logits at every position)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = base_model_of(model)(input_ids=input_ids, attention_mask=attention_mask)[0]   # (B, T, D)
    if causal:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    sel = labels != -100
    if not bool(sel.any()):
        return hidden.sum() * 0.0
    logits = head(hidden[sel])                                   # (N, V)
    return F.cross_entropy(logits.float(), labels[sel])


OLD_LOSSES = ("mse", "paper", "relative")
"""Forms of L_old, per patched layer l with output y (adapters on) and f (adapters off), per real
token t, averaged over tokens and layers:

- "mse": mean_d (y - f)^2, the released code's ``F.mse_loss``: the paper's norm divided by the
  width d (384 on MiniLM), so it is tiny next to the knowledge loss;
- "paper": ||y - f||^2 summed over d, the paper's L_S = (1/L) sum_l ||F_l - K_l||^2;
- "relative": ||y - f||^2 / ||f||^2, scale-free: the squared relative change of the FFN output,
  comparable across layers and models whatever the magnitude of their FFN outputs."""


def old_knowledge_loss(captures: list, attention_mask: Optional[torch.Tensor], form: str = "paper") -> torch.Tensor:
    """L_old (:data:`OLD_LOSSES`) over the (y, f) pairs of the patched layers, each (B, T, D), f
    detached; ``attention_mask``: (B, T), 1 = real token (padding does not count)."""
    if not captures:
        raise ValueError("old_knowledge_loss: captures is empty: no patched layer ran (is the model patched, "
                         "with adapters enabled?)")
    check_choice("old_knowledge_loss: form", form, OLD_LOSSES)
    total = 0.0
    for y, f in captures:
        f = f.detach().float()
        se = (y.float() - f).pow(2)                                       # (B, T, D)
        if form == "mse":
            per_token = se.mean(-1)                                       # (B, T)
        elif form == "paper":
            per_token = se.sum(-1)
        else:
            per_token = se.sum(-1) / f.pow(2).sum(-1).clamp_min(1e-12)
        if attention_mask is not None and attention_mask.shape == per_token.shape:
            m = attention_mask.to(per_token.dtype)
            total = total + (per_token * m).sum() / m.sum().clamp_min(1.0)
        else:
            total = total + per_token.mean()
    return total / len(captures)


class ModelObjective(nn.Module):
    """A model and its training objective as one module for ``Trainer`` (which calls
    ``forward`` for the loss). Activation checkpointing (``TrainingArguments(
    gradient_checkpointing=True)``, the CLI's ``--gradient-checkpointing``) is the wrapped
    model's: ``Trainer`` asks this module for it."""

    def __init__(self, model: nn.Module, causal: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.causal = is_causal_lm(model) if causal is None else causal

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                   **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.model.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_activation_checkpointing", False))


class Stage1Model(ModelObjective):
    """Wraps a patched (masked or causal) LM for stage 1; ``forward`` returns
    ``{"loss_knowledge", "loss_old"}`` and ``Trainer.compute_loss`` weighs them. ``old_loss``
    picks the form of L_old (:data:`OLD_LOSSES`).

    The general-text pass for L_old stops right after the last patched layer: nothing above it
    changes L_old, so the remaining layers are not run (same loss, less work). An unpatched model
    (the LoRA and full fine-tuning baselines of the demo) gets L_knowledge only."""

    def __init__(self, model: nn.Module, causal: Optional[bool] = None, old_loss: str = "paper"):
        super().__init__(model, causal)
        self.old_form = check_choice("Stage1Model: old_loss", old_loss, OLD_LOSSES)

    def forward(self, input_ids, attention_mask, labels, old_input_ids=None, old_attention_mask=None):
        lk = knowledge_loss(self.model, input_ids, attention_mask, labels, self.causal)
        if old_input_ids is None:
            return {"loss_knowledge": lk, "loss_old": lk.new_zeros(())}
        return {"loss_knowledge": lk, "loss_old": self.old_loss(old_input_ids, old_attention_mask)}

    def old_loss(self, input_ids, attention_mask) -> torch.Tensor:
        if not is_patched(self.model):
            raise ValueError("Stage1Model: L_old needs a patched model (mixda_fast.patch_model); this one is not, "
                             "so pass no general text (old_input_ids)")
        state = mixda_state(self.model, "Stage1Model")
        captures: list = []
        with state.calls.collecting(captures, stop_after=max(state.layers)):
            try:
                base_model_of(self.model)(input_ids=input_ids, attention_mask=attention_mask)
            except StopForward:
                pass
        return old_knowledge_loss(captures, attention_mask, self.old_form)
