"""The general-text measures of the quality benchmark: drift (relative and 1 - cos) and the
masked-LM loss with seeded masks, each against a direct computation."""

import pytest
import torch

from mixda_fast.training.evaluate import general_drift, hidden_states, masked_lm_loss
from training_helpers import general_lines, tiny, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_drift_is_zero_for_the_base_model_and_matches_its_definition():
    tok, model = word_tokenizer(), tiny("bert").eval()
    texts = general_lines(6)
    ref = hidden_states(model, tok, texts)
    assert general_drift(model, tok, texts, ref) == 0.0
    assert general_drift(model, tok, texts, ref, measure="cosine") == pytest.approx(0.0, abs=1e-6)
    moved = [h + 0.5 * torch.randn_like(h) for h in ref]
    h = torch.cat(ref).double()
    r = torch.cat(moved).double()
    rel = ((h - r).norm(dim=-1) / r.norm(dim=-1)).mean()
    cos = (1 - (h * r).sum(-1) / (h.norm(dim=-1) * r.norm(dim=-1))).mean()
    assert general_drift(model, tok, texts, moved) == pytest.approx(float(rel), rel=1e-5)
    assert general_drift(model, tok, texts, moved, measure="cosine") == pytest.approx(float(cos), rel=1e-4)
    with pytest.raises(ValueError, match=r"general_drift: measure='l2' .*'relative'.*'cosine'"):
        general_drift(model, tok, texts, ref, measure="l2")


def test_masked_lm_loss_uses_seeded_masks_and_is_the_mean_cross_entropy():
    from mixda_fast.training.data import KnowledgeCollator, encode_texts
    from mixda_fast.training.evaluate import texts_dataset

    tok, model = word_tokenizer(), tiny("bert").eval()
    texts = general_lines(10)
    a = masked_lm_loss(model, tok, texts, seed=3, batch_size=4)
    assert a == masked_lm_loss(model, tok, texts, seed=3, batch_size=4)
    ds = encode_texts(texts_dataset(texts), tok)
    collator = KnowledgeCollator(tok, causal=False, seed=3)
    total, count = 0.0, 0
    for i in range(0, len(ds), 4):
        b = collator([{"input_ids": ds[j]["input_ids"], "labels": [], "random_mask": True}
                      for j in range(i, min(len(ds), i + 4))])
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
        sel = b["labels"] != -100
        total += float(torch.nn.functional.cross_entropy(logits[sel], b["labels"][sel], reduction="sum"))
        count += int(sel.sum())
    assert a == pytest.approx(total / count, rel=1e-5)
