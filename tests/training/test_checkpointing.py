"""Gradient checkpointing is exact: the recomputed forward sees the state of the call it
recomputes (the attention mask the sequence gate read), in both of torch's checkpoint modes."""

import pytest
import torch

import mixda_fast as mf
from mixda_fast.core.call_state import FrameCheckpoint
from mixda_fast.training import losses
from tiny_models import batch, randomize_patch, tiny_model


def _patched(family, config):
    model = tiny_model(family, head="lm")
    mf.patch_model(model, config)
    randomize_patch(model)
    mf.mark_trainable(model, "domain")
    return model.train()                       # dropout on: the recompute must replay it too


def _grads(model, inputs, checkpointing, use_reentrant=None, seed=0):
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want):
    assert got.keys() == want.keys() and got
    for n, g in want.items():
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_mixda_gradients_equal_the_unchecked_step(family, use_reentrant):
    model = _patched(family, mf.MixDAConfig(num_domains=2, gate_hidden=16, adapter_init="normal"))
    inputs = batch(family, B=3, T=9)                           # padded: the sequence gate reads the mask
    want = _grads(model, inputs, checkpointing=False)
    got = _grads(model, inputs, checkpointing=True, use_reentrant=use_reentrant)
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in _layers(model))
    _assert_same(got, want)


def _layers(model):
    base = model.base_model
    return base.encoder.layer if hasattr(base, "encoder") else (base.h if hasattr(base, "h") else base.layers)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_mode_gradients_equal_the_unchecked_step(family, use_reentrant):
    model = _patched(family, mf.MoDEConfig(num_blocks=1, num_experts=2, expert_layers=1))
    inputs = batch(family, B=3, T=9)
    want = _grads(model, inputs, checkpointing=False)
    _assert_same(_grads(model, inputs, checkpointing=True, use_reentrant=use_reentrant), want)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_stage1_losses_with_checkpointing_equal_the_unchecked_step(family):
    """Both stage-1 losses, through the wrapper Trainer checkpoints (L_old's pass stops early
    and collects pairs: it runs unchecked inside a checkpointed model)."""
    model = _patched(family, mf.MixDAConfig(num_domains=1, gate_hidden=16, adapter_init="normal"))
    wrapper = losses.Stage1Model(model)
    inputs = batch(family, B=3, T=9)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    old = batch(family, B=2, T=7, seed=5)

    def step(checkpointing):
        if checkpointing:
            wrapper.activation_checkpointing_enable({"use_reentrant": False})
        else:
            wrapper.activation_checkpointing_disable()
        assert wrapper.is_activation_checkpointing == checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = wrapper(labels=labels, old_input_ids=old["input_ids"], old_attention_mask=old["attention_mask"],
                      **inputs)
        (out["loss_knowledge"] + out["loss_old"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = step(False)
    _assert_same(step(True), want)


def test_checkpointing_enabled_before_the_patch_is_exact_too():
    model = tiny_model("bert", head="lm")
    with pytest.warns(FutureWarning):                      # the name most users still call
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, gate_hidden=16, adapter_init="normal"))
    randomize_patch(model)
    mf.mark_trainable(model, "domain")
    model.train()
    inputs = batch("bert", B=3, T=9)
    got = _grads(model, inputs, checkpointing=True, use_reentrant=False)
    _assert_same(got, _grads(model, inputs, checkpointing=False))
    model.activation_checkpointing_enable()
    model(**inputs)
    layers = list(_layers(model))
    assert all(isinstance(layer._gradient_checkpointing_func, FrameCheckpoint) for layer in layers)
    mf.unpatch_model(model)                      # the unpatched model keeps nothing of ours
    assert not any(isinstance(layer._gradient_checkpointing_func, FrameCheckpoint) for layer in layers)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cli_gradient_checkpointing_trains_the_same_adapters(tmp_path, family):
    """`mixda-fast stage1 --gradient-checkpointing` (Trainer's activation checkpointing, through
    the stage-1 wrapper) gives the adapters of the same run without it."""
    from safetensors.torch import load_file

    from mixda_fast.cli import main
    from training_helpers import save_checkpoint, write_data

    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", family)
    args = ["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general), "--domain", "d",
            "--layers", "1", "--gate-hidden", "16", "--max-steps", "3", "--batch-size", "8", "--no-progress",
            "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert main([*args, "--output", str(tmp_path / "gc"), "--gradient-checkpointing"]) == 0
    want = load_file(str(next((tmp_path / "plain").glob("mixda_adapter_*.safetensors"))))
    got = load_file(str(next((tmp_path / "gc").glob("mixda_adapter_*.safetensors"))))
    assert got.keys() == want.keys() and got
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if ".up." in k)   # it trained
