"""save_pretrained of a patched model round-trips: a plain from_pretrained gets every base
weight under its original name, mixda_fast.load_patched rebuilds the whole patched model, and
state_dict / load_state_dict of a patched model are inverses."""

import json

import pytest
import torch
import transformers as tf

import mixda_fast as mf
from mixda_fast.core.patch import CONFIG_KEY
from tiny_models import DECODERS, batch, randomize_patch, tiny_model

CASES = [("bert", "mixda"), ("roberta", "mixda"), ("gpt2", "mixda"), ("llama", "mixda"), ("bert", "mode"),
         ("llama", "mode"), ("distilbert", "mixda"), ("qwen3", "mixda"), ("gemma", "mixda"), ("gemma2", "mixda"),
         ("gemma3", "mixda"), ("distilbert", "mode"), ("gemma3", "mode")]


def _config(method):
    if method == "mixda":
        return mf.MixDAConfig(domains=["bio", "law"], gate_hidden=16, adapter_init="normal", layers=[0, 2])
    return mf.MoDEConfig(num_blocks=1, num_experts=2, expert_layers=1)


def _patched(family, method):
    model = tiny_model(family, head="lm")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    mf.patch_model(model, _config(method))
    return randomize_patch(model, seed=3), original


def _logits(model, family):
    with torch.no_grad():
        return model(**batch(family)).logits


def _lm_class(family):
    return tf.AutoModelForCausalLM if family in DECODERS else tf.AutoModelForMaskedLM


@pytest.mark.parametrize("family,method", CASES)
def test_plain_from_pretrained_gets_every_base_weight(tmp_path, family, method):
    model, original = _patched(family, method)
    plain_out = tiny_model(family, head="lm")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert saved["method"] == method
    if method == "mixda":
        assert saved["config"] == mf.mixda.patching.patch_config(model).to_dict()
    plain, info = _lm_class(family).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]                                          # nothing initialised at random
    assert plain.state_dict().keys() == original.keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(_logits(plain.eval(), family), _logits(plain_out, family))


@pytest.mark.parametrize("family,method", CASES)
def test_load_patched_restores_the_whole_patched_model(tmp_path, family, method):
    model, _ = _patched(family, method)
    want = _logits(model, family)
    model.save_pretrained(tmp_path)
    again = mf.load_patched(_lm_class(family), tmp_path).eval()
    assert mf.is_patched(again)
    assert again.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert torch.equal(_logits(again, family), want)


@pytest.mark.parametrize("family,method", CASES)
def test_state_dict_and_load_state_dict_are_inverses(family, method):
    model, original = _patched(family, method)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(original) <= set(state)                   # base weights under their original names
    fresh = tiny_model(family, head="lm", seed=9)
    mf.patch_model(fresh, _config(method))
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(_logits(fresh, family), _logits(model, family))


@pytest.mark.parametrize("method", ["mixda", "mode"])
def test_unpatch_takes_the_record_out_of_the_config(method):
    model, _ = _patched("bert", method)
    assert getattr(model.config, CONFIG_KEY)["method"] == method
    mf.unpatch_model(model)
    assert not hasattr(model.config, CONFIG_KEY)
    assert CONFIG_KEY not in model.config.to_dict()


def test_load_patched_refuses_a_checkpoint_without_its_adapters(tmp_path):
    model, _ = _patched("bert", "mixda")
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if ".adapters.law." not in k}
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapters\.law"):
        mf.load_patched(tf.AutoModelForMaskedLM, tmp_path)


def test_load_patched_refuses_non_finite_adapters(tmp_path):
    model, _ = _patched("llama", "mixda")
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if ".adapters.bio.up.weight" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="non-finite"):
        mf.load_patched(tf.AutoModelForCausalLM, tmp_path)


def test_load_patched_refuses_a_plain_checkpoint(tmp_path):
    tiny_model("bert", head="lm").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=CONFIG_KEY):
        mf.load_patched(tf.AutoModelForMaskedLM, tmp_path)


@pytest.mark.parametrize("family,method", [("bert", "mixda"), ("llama", "mode")])
def test_deepcopy_and_torch_save_of_the_whole_model(tmp_path, family, method):
    """Copies compute what the original does, and each gets its own per-call state."""
    import copy

    model, _ = _patched(family, method)
    want = _logits(model, family)
    torch.save(model, tmp_path / "model.pt")
    for other in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert mf.is_patched(other)
        assert torch.equal(_logits(other, family), want)
        calls = [m for m in other.modules() if hasattr(m, "_calls")][0]._calls
        assert calls is not [m for m in model.modules() if hasattr(m, "_calls")][0]._calls
