"""Causal language models stay causal when patched: position t never sees a token after t,
and generate() gives the same tokens and scores with and without the KV cache."""

import dataclasses

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

import mixda_fast as mf
from mixda_fast.mixda.patching import patch_config
from tiny_models import CONFIGS, DECODERS, ENCODERS, VOCAB, batch, randomize_patch, tiny_model


def _patched_lm(family, K=2, seed=0, **kw):
    model = tiny_model(family, head="lm", seed=seed)
    mf.patch_model(model, mf.MixDAConfig(num_domains=K, adapter_init="normal", **kw))
    randomize_patch(model, std=0.5, seed=seed)
    return model.eval()


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(DECODERS), K=st.integers(1, 3), t=st.integers(1, 7),
       padded=st.booleans(), formulation=st.sampled_from(["fused", "folded", "paper"]),
       mixing=st.sampled_from(["paper", "residual"]))
def test_positions_before_t_ignore_a_change_at_t(family, K, t, padded, formulation, mixing):
    """For every decoder family, the logits at positions < t are bit-identical when only token t
    changes (non-zero adapters and gate; left padding as generate() uses)."""
    model = _patched_lm(family, K=K, mixing=mixing)
    for m in mf.mixda_modules(model).values():
        m.formulation = formulation
    inputs = batch(family, B=2, T=8, pad=padded)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][:, t] = (other["input_ids"][:, t] + 7) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**other).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])              # the change is seen from t on


@pytest.mark.parametrize("family", DECODERS)
def test_default_gate_of_a_causal_lm_is_the_token_gate(family):
    config = mf.MixDAConfig(num_domains=2)
    model = mf.patch_model(tiny_model(family, head="lm"), config)
    assert patch_config(model).gate == "token"
    assert config.gate is None                              # the user's config object is left as it was
    assert all(m.mixda_config.gate == "token" for m in mf.mixda_modules(model).values())


@pytest.mark.parametrize("family", ENCODERS)
def test_default_gate_of_an_encoder_is_the_sequence_gate(family):
    model = mf.patch_model(tiny_model(family), mf.MixDAConfig(num_domains=2))
    assert patch_config(model).gate == "sequence"


@pytest.mark.parametrize("family", DECODERS + ("bert-decoder",))
@pytest.mark.parametrize("paper_gate_bug", [False, True])
def test_sequence_gate_on_a_causal_lm_is_refused(family, paper_gate_bug):
    if family == "bert-decoder":
        config = CONFIGS["bert"]()
        config.is_decoder = True
        model = tf.BertLMHeadModel(config)
    else:
        model = tiny_model(family, head="lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"MixDAConfig\.gate='sequence' is not accepted .*causal"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=2, gate="sequence", paper_gate_bug=paper_gate_bug))
    assert not mf.is_patched(model)
    assert not hasattr(model.config, "mixda_fast")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _generate(model, inputs, use_cache):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=use_cache,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_and_without_the_kv_cache_agree(family, padded):
    """Same tokens, same scores (to float rounding: the cached step multiplies 1-row matrices),
    with left padding too; and the scores are the patched model's own (not the unpatched one's)."""
    model = _patched_lm(family)
    inputs = batch(family, B=3, T=7, pad=padded)
    seq_cache, scores_cache = _generate(model, inputs, True)
    seq_full, scores_full = _generate(model, inputs, False)
    assert torch.equal(seq_cache, seq_full)
    torch.testing.assert_close(scores_cache, scores_full, rtol=1e-5, atol=1e-5)
    with mf.adapters_disabled(model):
        _, scores_plain = _generate(model, inputs, True)
    assert not torch.allclose(scores_plain, scores_cache, atol=1e-3)


def test_patch_config_is_resolved_and_saved_with_the_adapters(tmp_path):
    """The gate chosen at patch time is what the adapter file records, so a file from a causal
    LM never loads into a model with a sequence gate."""
    model = _patched_lm("llama")
    path = mf.save_adapters(model, tmp_path)
    other = mf.patch_model(tiny_model("llama", head="lm"), mf.MixDAConfig(num_domains=2, adapter_init="normal"))
    mf.load_adapters(other, path)
    assert dataclasses.asdict(patch_config(other)) == dataclasses.asdict(patch_config(model))
