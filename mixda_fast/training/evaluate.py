"""Evaluation: fact exact-match (stage 1), task accuracy and macro-F1 (stage 2), and
general-text drift (how far a trained model's hidden states moved from the base model's).

- fact exact-match: every target span of a fact masked whole (masked LM) or predicted token by
  token after its prompt (causal LM, teacher-forced: equal to greedy decoding of the span when
  every earlier token is right); a fact counts when every token of every target is the argmax.
- drift: mean over non-padding tokens of ||h - h_base|| / ||h_base|| (or 1 - cos) for the last
  hidden states, on general text;
- masked-LM loss on general text, with masks drawn from a seed (the same for every model).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..core.extras import require
from ..core.model import base_model_of
from ..core.validate import check_choice
from .data import KnowledgeCollator, TaskCollator, encode_knowledge, encode_task, encode_texts, load_knowledge, \
    load_task, load_texts
from .losses import is_causal_lm, lm_head_of
from .trainer import accuracy_and_macro_f1

__all__ = ["fact_exact_match", "predict_task", "evaluate_task", "hidden_states", "general_drift",
           "masked_lm_loss", "texts_dataset"]


def batches(ds, collator, batch_size):
    for i in range(0, len(ds), batch_size):
        yield collator([ds[j] for j in range(i, min(len(ds), i + batch_size))])


def predicted_logits(model: nn.Module, head: Optional[nn.Module], batch: dict, causal: bool):
    """(logits (N, V) at the N predicted positions, labels (B, T'), sel = labels != -100) of a
    ``KnowledgeCollator`` batch, shifted by one for causal LMs. With a separate LM ``head`` only
    the selected rows of the base model's hidden states go through it."""
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    if head is not None:
        out = base_model_of(model)(input_ids=ids, attention_mask=mask)[0]      # (B, T, D)
    else:
        out = model(input_ids=ids, attention_mask=mask).logits              # (B, T, V)
    if causal:
        out, labels = out[:, :-1], labels[:, 1:]
    sel = labels != -100
    return (head(out[sel]) if head is not None else out[sel]), labels, sel


@torch.no_grad()
def fact_exact_match(model: nn.Module, tokenizer, knowledge, *, batch_size: int = 64, max_length: int = 128,
                     causal: Optional[bool] = None) -> dict[str, float]:
    """Fraction of facts (prompt/targets records; plain text records are skipped) whose every
    target token is the model's argmax, and the token accuracy. ``knowledge``: a file or a
    :func:`~mixda_fast.training.data.load_knowledge` dataset."""
    if isinstance(knowledge, (str, os.PathLike)):
        knowledge = load_knowledge(knowledge)
    causal = is_causal_lm(model) if causal is None else causal
    facts = knowledge.filter(lambda ex: len(ex["spans"]) > 0)
    if len(facts) == 0:
        raise ValueError("fact_exact_match: no prompt/targets records to evaluate")
    ds = encode_knowledge(facts, tokenizer, causal=causal, max_length=max_length)
    collator = KnowledgeCollator(tokenizer, causal)
    head = lm_head_of(model)
    was_training = model.training
    model.eval()
    hits, tok_hits, tok_total = 0, 0, 0
    try:
        for batch in batches(ds, collator, batch_size):
            logits, labels, sel = predicted_logits(model, head, batch, causal)
            pred = logits.argmax(-1)
            correct = torch.zeros_like(labels, dtype=torch.bool)
            correct[sel] = pred == labels[sel]
            per_fact = (correct | ~sel).all(-1)
            hits += int(per_fact.sum())
            tok_hits += int(correct.sum())
            tok_total += int(sel.sum())
    finally:
        model.train(was_training)
    return {"exact_match": hits / len(ds), "token_accuracy": tok_hits / max(tok_total, 1), "facts": len(ds)}


@torch.no_grad()
def predict_task(model: nn.Module, dataset, tokenizer, task: str = "classification",
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, gold labels) of an encoded task dataset."""
    collator = TaskCollator(tokenizer, task)
    was_training = model.training
    model.eval()
    preds, golds = [], []
    try:
        for batch in batches(dataset, collator, batch_size):
            labels = batch.pop("labels")
            logits = model(**batch).logits
            preds.append(logits.argmax(-1).numpy())
            golds.append(labels.numpy())
    finally:
        model.train(was_training)
    return np.concatenate(preds), np.concatenate(golds)


def evaluate_task(model: nn.Module, tokenizer, data, *, task: str = "classification",
                  labels=None, batch_size: int = 64, max_length: int = 128) -> dict[str, float]:
    """Accuracy and macro-F1 on a task file or a :func:`load_task` dataset."""
    if isinstance(data, (str, os.PathLike)):
        data, _ = load_task(data, task, labels)
    if "input_ids" not in data.column_names:
        data = encode_task(data, tokenizer, task=task, max_length=max_length)
    preds, golds = predict_task(model, data, tokenizer, task, batch_size)
    out = accuracy_and_macro_f1(preds, golds)
    out["examples"] = len(golds)
    return out


def texts_dataset(texts):
    """A :func:`load_texts` dataset from a file, a list of strings or such a dataset."""
    if isinstance(texts, (str, os.PathLike)):
        return load_texts(texts)
    if isinstance(texts, list):
        datasets = require("datasets", "train", "the general-text measures")
        return datasets.Dataset.from_list([{"line": i + 1, "text": t} for i, t in enumerate(texts)])
    return texts


@torch.no_grad()
def hidden_states(model: nn.Module, tokenizer, texts, *, batch_size: int = 64,
                  max_length: int = 128) -> list[torch.Tensor]:
    """Last hidden states of the base transformer, one (T_i, D) tensor per text (no padding)."""
    ds = encode_texts(texts_dataset(texts), tokenizer, max_length=max_length)
    base = base_model_of(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(ds), batch_size):
            seqs = [ds[j]["input_ids"] for j in range(i, min(len(ds), i + batch_size))]
            T = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
            h = base(input_ids=ids, attention_mask=mask)[0]
            out += [h[b, :len(s)].float().clone() for b, s in enumerate(seqs)]
    finally:
        model.train(was_training)
    return out


DRIFTS = ("relative", "cosine")


def general_drift(model: nn.Module, tokenizer, texts, reference: list[torch.Tensor], *, measure: str = "relative",
                  **kw) -> float:
    """How far the last hidden states moved from ``reference`` (:func:`hidden_states` of the base
    model on the same texts), averaged over tokens: ``measure="relative"``, ||h - h_ref|| /
    ||h_ref||; ``"cosine"``, 1 - cos(h, h_ref)."""
    check_choice("general_drift: measure", measure, DRIFTS)
    hs = hidden_states(model, tokenizer, texts, **kw)
    if measure == "cosine":
        per = [1 - torch.nn.functional.cosine_similarity(h, r, dim=-1) for h, r in zip(hs, reference)]
    else:
        per = [(h - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12) for h, r in zip(hs, reference)]
    return float(torch.cat(per).mean())


@torch.no_grad()
def masked_lm_loss(model: nn.Module, tokenizer, texts, *, seed: int = 0, batch_size: int = 64,
                   max_length: int = 128) -> float:
    """Mean masked-LM cross-entropy on ``texts`` (see :func:`texts_dataset`), 15% of
    the tokens masked BERT-style with masks drawn from ``seed``: the same masks for every model,
    so the numbers compare."""
    ds = encode_texts(texts_dataset(texts), tokenizer, max_length=max_length)
    collator = KnowledgeCollator(tokenizer, causal=False, seed=seed)
    head = lm_head_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(ds), batch_size):
            batch = collator([{"input_ids": ds[j]["input_ids"], "labels": [], "random_mask": True}
                              for j in range(i, min(len(ds), i + batch_size))])
            logits, labels, sel = predicted_logits(model, head, batch, False)
            total += float(torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum"))
            count += int(sel.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
