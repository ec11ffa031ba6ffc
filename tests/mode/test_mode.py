"""MoDE patch: identities against the unpatched model, both executions, generation, stages."""

import copy

import pytest
import torch
import transformers as tf

import mixda_fast as mf
from mixda_fast.mode.block import MoDEBlock
from tiny_models import DECODERS, FAMILIES, batch, tiny_model

EXECUTIONS = ("batched", "loop")


def _out(model, inputs, **kw):
    with torch.no_grad():
        out = model(**inputs, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _set_execution(model, execution):
    for b in mf.mode_blocks(model):
        b.execution = execution


def _randomize_gates(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in mf.mode_blocks(model):
            b.gate.weight.copy_(torch.randn(b.gate.weight.shape, generator=g) * scale)
            b.gate.bias.copy_(torch.randn(b.gate.bias.shape, generator=g))


# ---- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(num_blocks=2.0), TypeError, "num_blocks"),
    (dict(num_blocks=True), TypeError, "num_blocks"),
    (dict(expert_layers=0), ValueError, "expert_layers"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(domains="bio"), TypeError, "domains"),
    (dict(domains=[]), ValueError, "domains"),
    (dict(domains=["a", "a"]), ValueError, "domains"),
    (dict(domains=["a.b"]), ValueError, "domains"),
    (dict(domains=["a", "b"], num_experts=3), ValueError, "num_experts"),
    (dict(expert_init="zeros"), ValueError, "expert_init"),
    (dict(execution="fast"), ValueError, "execution"),
    (dict(execution=None), TypeError, "execution"),
    (dict(freeze_experts=1), TypeError, "freeze_experts"),
])
def test_config_rejects_bad_fields(kwargs, exc, field):
    with pytest.raises(exc, match=rf"MoDEConfig\.{field}=.*expected"):
        mf.MoDEConfig(**kwargs)


def test_config_defaults_and_json_round_trip():
    cfg = mf.MoDEConfig()
    assert (cfg.num_blocks, cfg.expert_layers, cfg.num_experts, cfg.domains) == (3, 2, 1, ["expert_0"])
    cfg = mf.MoDEConfig(domains=["bio", "law"], freeze_experts=True)
    assert cfg.gate_width == 3
    assert mf.MoDEConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        mf.MoDEConfig.from_dict({"num_block": 3})


# ---- identities -------------------------------------------------------------------------------

def test_num_blocks_must_divide_depth_and_model_is_left_unchanged():
    model = tiny_model("llama")   # 3 layers
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"num_blocks=2 .*3 layers.*accepted values: \[1, 3\]"):
        mf.patch_model(model, mf.MoDEConfig(num_blocks=2))
    assert not mf.is_patched(model) and set(model.state_dict()) == keys
    assert not hasattr(model.base_model, "mode_blocks")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_gate_forced_on_backbone_is_exactly_the_unpatched_model(family, execution):
    model = tiny_model(family, head="lm")
    inputs = batch(family)
    before = _out(model, inputs)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=2, expert_layers=2, expert_init="random",
                                        execution=execution))
    _randomize_gates(model)
    mixed = _out(model, inputs)
    assert not torch.allclose(mixed, before, atol=1e-4)
    with mf.gate_forced(model, "backbone"):
        assert torch.equal(_out(model, inputs), before)
    with mf.experts_disabled(model):
        assert torch.equal(_out(model, inputs), before)
    assert torch.equal(_out(model, inputs), mixed)   # the context managers restore the gates


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family):
    model = tiny_model(family, head="lm")
    inputs = batch(family)
    before = _out(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1, num_experts=1, expert_init="random"))
    assert mf.is_patched(model)
    assert any(k.startswith(model.base_model_prefix + ".mode_blocks") for k in model.state_dict())
    mf.unpatch_model(model)
    assert not mf.is_patched(model)
    assert [type(m) for m in model.modules()] == types
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_out(model, inputs), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_copied_expert_sees_what_the_backbone_sees(family, execution):
    """One-layer blocks with one-layer experts copied from them: an expert fed the block input
    with the block's mask, positions, rotary embeddings and cache computes the backbone layer's
    output, so the gate forced onto any expert gives the unpatched model."""
    model = tiny_model(family, head="lm")
    inputs = batch(family)
    before = _out(model, inputs)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=2, expert_layers=1, expert_init="copy",
                                        execution=execution))
    for k in (0, 1):
        with mf.gate_forced(model, k):
            out = _out(model, inputs)
        if execution == "loop":
            assert torch.equal(out, before)
        else:  # batched GEMMs may round differently from the per-expert GEMM
            torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-5)
    _randomize_gates(model)   # any mixture of identical outputs is that output (to rounding)
    torch.testing.assert_close(_out(model, inputs), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_executions_agree_forward_and_backward(family):
    model = tiny_model(family, head="lm").train()
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1, num_experts=3, expert_layers=2, expert_init="random"))
    for m in model.modules():   # no dropout, so both executions see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    mf.mark_trainable(model, "domain")
    _randomize_gates(model)
    inputs = batch(family)
    results = {}
    for execution in EXECUTIONS + ("auto",):
        _set_execution(model, execution)
        model.zero_grad()
        logits = model(**inputs).logits
        (logits.float() ** 2).mean().backward()
        results[execution] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.requires_grad})
    lb, gb = results["loop"]
    for execution in ("batched", "auto"):
        la, ga = results[execution]
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_mixture_is_the_formula_written_out():
    """One block over all layers, float64: the model's output against the backbone and the
    experts run by hand and mixed per token with softmax(Linear(x))."""
    model = tiny_model("llama").double()
    inputs = batch("llama", pad=False)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1, num_experts=2, expert_layers=2, expert_init="random"))
    _randomize_gates(model)
    block = mf.mode_blocks(model)[0]
    seen = {}
    first = model.layers[0]
    h = first.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    last = model.layers[-1].register_forward_hook(lambda m, a, o: seen.update(mixed=o))
    for execution in EXECUTIONS:
        block.execution = execution
        with torch.no_grad():
            model(**inputs, use_cache=False)
            x, kw, mixed = seen["args"][0], seen["kwargs"], seen["mixed"]
            with mf.experts_disabled(model):
                bb = x
                for layer in model.layers:
                    bb = layer(bb, **kw)
            outs = []
            for expert in block.experts.values():
                e = x
                for layer in expert:
                    e = layer(e, **kw)
                outs.append(e)
            logits = x @ block.gate.weight.T + block.gate.bias
            a = torch.exp(logits - logits.amax(-1, keepdim=True))
            a = a / a.sum(-1, keepdim=True)
            expected = a[..., 2:3] * bb + a[..., 0:1] * outs[0] + a[..., 1:2] * outs[1]
        torch.testing.assert_close(mixed, expected, rtol=1e-10, atol=1e-10)
    h.remove(), last.remove()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_output_hidden_states_record_the_mixture_not_the_experts(family):
    model = tiny_model(family)
    model.set_attn_implementation("eager")   # sdpa returns no attention weights
    inputs = batch(family)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True, output_attentions=True)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=2, expert_layers=2, expert_init="random"))
    _randomize_gates(model)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        with mf.gate_forced(model):
            forced = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(plain.hidden_states) == 4
    assert len(out.attentions) == len(plain.attentions) == 3
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[1], plain.hidden_states[1], atol=1e-4)
    for a, b in zip(forced.hidden_states, plain.hidden_states):
        assert torch.equal(a, b)


def test_deepcopy_of_a_patched_model():
    model = tiny_model("gpt2", head="lm")
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=2, expert_init="random"))
    _randomize_gates(model)
    inputs = batch("gpt2")
    clone = copy.deepcopy(model)
    assert mf.is_patched(clone)
    assert torch.equal(_out(clone, inputs), _out(model, inputs))
    with torch.no_grad():
        mf.mode_blocks(clone)[0].gate.bias.fill_(5.0)
    assert not torch.equal(_out(clone, inputs), _out(model, inputs))
    mf.unpatch_model(clone)
    assert mf.is_patched(model) and not mf.is_patched(clone)


# ---- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", DECODERS)
def test_generate_on_a_patched_decoder(family):
    """Experts have their own KV-cache slots: cached generation (greedy and beam search) gives
    the tokens of uncached generation, and the gate forced onto the backbone gives the
    unpatched model's tokens."""
    model = tiny_model(family, head="lm")
    inputs = batch(family, B=2, T=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        plain_logits = model(**inputs).logits
        mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=2, expert_init="random"))
        _randomize_gates(model)
        with mf.gate_forced(model):
            forced = model.generate(**inputs, **kw)
        cached = model.generate(**inputs, **kw)
        uncached = model.generate(**inputs, use_cache=False, **kw)
        beams = model.generate(**inputs, num_beams=2, **kw)
        beams_uncached = model.generate(**inputs, num_beams=2, use_cache=False, **kw)
        patched_logits = model(**inputs).logits
    assert torch.equal(forced, plain)
    assert torch.equal(cached, uncached)
    assert torch.equal(beams, beams_uncached)
    # the experts change the model (the tiny Gemmas' greedy tokens can stay the same: compare logits)
    assert not torch.allclose(patched_logits, plain_logits)


def test_a_cache_filled_without_expert_slots_is_refused():
    model = tiny_model("llama", head="lm")
    inputs = batch("llama", B=1, T=4, pad=False)
    with torch.no_grad():
        past = model(**inputs, use_cache=True).past_key_values
        mf.patch_model(model, mf.MoDEConfig(num_blocks=3))
        with pytest.raises(ValueError, match="no slots for the MoDE experts"):
            model(input_ids=inputs["input_ids"][:, -1:], past_key_values=past, use_cache=True)


# ---- stages -----------------------------------------------------------------------------------

def test_trainable_parameters_per_stage():
    model = tiny_model("llama", head="lm")
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, domains=["bio", "law"]))

    def names():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    expert_names = {n for n, _ in model.named_parameters() if ".experts." in n}
    gate_names = {n for n, _ in model.named_parameters() if ".gate." in n}
    assert len(gate_names) == 6 and expert_names
    mf.mark_trainable(model, "domain")
    assert names() == expert_names | gate_names
    mf.mark_trainable(model, "domain", domain="law")
    assert names() == {n for n in expert_names if ".experts.law." in n} | gate_names
    mf.mark_trainable(model, "compose")
    assert names() == expert_names | gate_names
    mf.mode_blocks(model)   # freeze_experts lives in the config the model was patched with
    mf.mode.patching.mode_state(model).config.freeze_experts = True
    mf.mark_trainable(model, "compose")
    assert names() == gate_names
    mf.mark_trainable(model, "none")
    assert mf.count_parameters(model)[0] == 0
    mf.mark_trainable(model, "all")
    trainable, total = mf.count_parameters(model)
    assert trainable == total
    with pytest.raises(ValueError, match="stage='task' is not accepted for a MoDE-patched model"):
        mf.mark_trainable(model, "task")
    with pytest.raises(ValueError, match="domain='med' is not accepted"):
        mf.mark_trainable(model, "domain", domain="med")


def test_trainer_step_changes_only_experts_and_gates(tmp_path):
    from datasets import Dataset

    model = tiny_model("gpt2", head="lm")
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, num_experts=1, expert_layers=1))
    mf.mark_trainable(model, "domain")
    data = batch("gpt2", B=8, T=9, pad=False)
    ds = Dataset.from_dict({"input_ids": data["input_ids"].tolist(), "labels": data["input_ids"].tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                disable_tqdm=True)
    tf.Trainer(model=model, args=args, train_dataset=ds).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".gate." in n for n in changed) and any(".experts." in n for n in changed)


# ---- bad input --------------------------------------------------------------------------------

def test_second_patch_of_either_kind_is_refused():
    model = tiny_model("bert")
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1))
    with pytest.raises(ValueError, match="already patched"):
        mf.patch_model(model, mf.MoDEConfig(num_blocks=3))
    with pytest.raises(ValueError, match="already patched"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=1))
    with pytest.raises(ValueError, match="patched with MoDE, not MixDA"):
        mf.mixda_modules(model)
    mf.unpatch_model(model)
    mf.patch_model(model, mf.MixDAConfig(num_domains=1))
    with pytest.raises(ValueError, match="already patched"):
        mf.patch_model(model, mf.MoDEConfig(num_blocks=1))
    with pytest.raises(ValueError, match="patched with MixDA, not MoDE"):
        mf.mode_blocks(model)
    with pytest.raises(TypeError, match="MixDAConfig or a mixda_fast.MoDEConfig"):
        mf.patch_model(tiny_model("bert"), {"num_blocks": 3})


def test_force_gate_out_of_range_and_unknown_expert():
    model = mf.patch_model(tiny_model("llama"), mf.MoDEConfig(num_blocks=3, domains=["bio"]))
    with pytest.raises(ValueError, match="expert='law' is not accepted"):
        with mf.gate_forced(model, "law"):
            pass
    block = mf.mode_blocks(model)[0]
    assert isinstance(block, MoDEBlock)
    block.force_gate = 5
    with pytest.raises(ValueError, match=r"force_gate=5 is not accepted: expected None or an index 0..1"):
        _out(model, batch("llama"))
