"""A masked-LM head for a checkpoint that has none (a sentence-embedding model such as MiniLM).

Stage 1 trains the adapters against the LM head's predictions; a freshly initialised head would
make the knowledge loss measure the head, not the adapters. :func:`fit_mlm_head` fits the head on
general text with the encoder frozen, before stage 1 (the demo and ``mixda-fast stage1`` do this
when the checkpoint lacks one).
"""

from __future__ import annotations

import os

import torch

from ..core.model import head_parameters
from .data import KnowledgeCollator, encode_texts, load_texts
from .losses import lm_head_of

__all__ = ["fit_mlm_head", "missing_head_keys"]


def missing_head_keys(model, missing: list) -> list:
    """The keys of ``missing`` (from ``from_pretrained``'s loading info) that belong to the head,
    not to the base model."""
    return [k for k in missing if not k.startswith(model.base_model_prefix + ".")]


def fit_mlm_head(model, tokenizer, texts, *, steps: int, seed: int = 0, max_length: int = 32,
                 positions: int = 256, lr: float = 2e-3) -> float:
    """Fit the masked-LM head (transform + bias; the decoder is tied to the frozen word
    embeddings) on 15%-masked general text (a file or a :func:`load_texts` dataset), the encoder
    frozen. The encoder's hidden states are
    computed once, so each step costs only the head. Returns the final cross-entropy."""
    texts = load_texts(texts) if isinstance(texts, (str, os.PathLike)) else texts
    ds = encode_texts(texts, tokenizer, max_length=max_length)
    collator = KnowledgeCollator(tokenizer, causal=False, seed=seed)
    feats, labels = [], []
    base, head = model.base_model, lm_head_of(model)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ds), 64):
            b = collator([{"input_ids": ds[j]["input_ids"], "labels": [], "random_mask": True}
                          for j in range(i, min(len(ds), i + 64))])
            h = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            sel = b["labels"] != -100
            feats.append(h[sel])
            labels.append(b["labels"][sel])
    feats, labels = torch.cat(feats), torch.cat(labels)
    params = head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    head.train()
    for _ in range(steps):
        idx = torch.randint(len(feats), (min(positions, len(feats)),), generator=g)
        loss = torch.nn.functional.cross_entropy(head(feats[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return float(loss.detach())
