"""Patched-model identities against the unpatched model, on tiny models of every family."""

import copy

import pytest
import torch
import transformers as tf

import mixda_fast as mf
from mixda_fast.core.call_state import Frame
from mixda_fast.mixda.layer import MixDAFFN
from mixda_fast.training.runs import minilm_path
from tiny_models import DECODERS, ENCODERS, FAMILIES, batch, tiny_model


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize_adapters(model, seed=0):
    """Give the adapters non-zero up-projections so the patch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mf.mixda_modules(model).values():
            for p in m.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for p in m.gate.parameters():     # small enough that the softmax is not one-hot
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_mixing_at_init_is_the_unpatched_model(family):
    model = tiny_model(family)
    inputs = batch(family)
    before = _out(model, inputs)
    mf.patch_model(model, mf.MixDAConfig(num_domains=3, mixing="residual", gate="token"))
    assert len(mf.mixda_modules(model)) == 3
    assert torch.equal(_out(model, inputs), before)
    mf.unpatch_model(model)
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, mixing="residual", layers=[-1]))
    assert torch.equal(_out(model, inputs), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family):
    model = tiny_model(family, head="lm")
    inputs = batch(family)
    before = _out(model, inputs)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, layers=[0, 2]))
    _randomize_adapters(model)
    assert not torch.allclose(_out(model, inputs), before)
    mf.unpatch_model(model)
    assert not mf.is_patched(model)
    assert [type(m) for m in model.modules()] == modules_before
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    assert torch.equal(_out(model, inputs), before)


@pytest.mark.parametrize("family,gate", [(f, "token") for f in FAMILIES] + [(f, "sequence") for f in ENCODERS])
def test_paper_mixing_matches_the_formula_written_out(family, gate):
    """A patched layer's output against a per-row loop of y = g_{K+1} f + sum_k g_k a_k in float64."""
    model = tiny_model(family).double()
    mf.patch_model(model, mf.MixDAConfig(num_domains=3, gate=gate, layers=[1]))
    _randomize_adapters(model)
    layer = mf.mixda_modules(model)[1].double()
    x = torch.randn(2, 5, layer.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        h = layer.host_intermediate(x)
        f = layer.host.down(h)
        ads = list(layer.adapters.values())
        expected = torch.empty_like(f)
        for b in range(2):
            for t in range(5):
                gl = layer.gate(h[b, t] if gate == "token" else h[b, -1])
                g = torch.exp(gl - gl.max()) / torch.exp(gl - gl.max()).sum()
                y = g[3] * f[b, t]
                for k, a in enumerate(ads):
                    y = y + g[k] * (a.up.weight @ torch.nn.functional.gelu(a.down.weight @ h[b, t] + a.down.bias) + a.up.bias)
                expected[b, t] = y
        expected = layer.host.post(expected)
        for form in ("folded", "paper"):
            layer.formulation = form
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("mixing", ["paper", "residual"])
def test_formulations_agree_on_a_whole_model(family, mixing):
    model = tiny_model(family)
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, mixing=mixing, adapter_init="normal"))
    inputs = batch(family)
    outs = {}
    for form in ("folded", "paper"):
        for m in mf.mixda_modules(model).values():
            m.formulation = form
        outs[form] = _out(model, inputs)
    torch.testing.assert_close(outs["folded"], outs["paper"], rtol=1e-5, atol=1e-5)


def _gate_outputs(model, inputs):
    seen = []
    hooks = [m.gate.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
             for m in mf.mixda_modules(model).values()]
    out = _out(model, inputs)
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("family", ENCODERS)
def test_sequence_gate_reads_last_real_token_alone_or_padded(family):
    model = tiny_model(family)
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, adapter_init="normal"))
    _randomize_adapters(model)
    padded = batch(family, B=3, T=9)
    row = 2   # has padding
    keep = padded["attention_mask"][row].bool()
    alone = {"input_ids": padded["input_ids"][row][keep][None], "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
    if family in DECODERS:   # left padding: positions as generate() computes them
        for d in (padded, alone):
            d["position_ids"] = (d["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    g_batch, _ = _gate_outputs(model, padded)
    g_alone, out_alone = _gate_outputs(model, alone)
    for gb, ga in zip(g_batch, g_alone):
        assert ga.shape[0] == 1          # batch size 1 keeps its batch dim (the released code squeezed it)
        torch.testing.assert_close(gb[row], ga[0], rtol=1e-5, atol=1e-5)
    assert out_alone.shape[0] == 1


@pytest.mark.parametrize("bug", [False, True])
def test_sequence_gate_input_position(bug):
    """Last non-padding token with a mask (right or left padding); position -1 without a mask,
    or always with paper_gate_bug=True (the released code)."""
    model = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(num_domains=2, paper_gate_bug=bug))
    layer = mf.mixda_modules(model)[0]
    seen = []
    layer.gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(3, 5, layer.hidden_size)
    h = layer.host_intermediate(x)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    layer._calls.run_in(Frame(mask), layer, x)
    layer(x)
    assert torch.equal(seen[0], h[:, -1] if bug else h[[0, 1, 2], [2, 4, 3]])
    assert torch.equal(seen[1], h[:, -1])


@pytest.mark.parametrize("family", DECODERS)
def test_generate_on_patched_decoder(family):
    model = tiny_model(family, head="lm")
    inputs = batch(family, B=2, T=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        mf.patch_model(model, mf.MixDAConfig(num_domains=2, mixing="residual", gate="token"))
        same = model.generate(**inputs, **kw)
        mf.unpatch_model(model)
        mf.patch_model(model, mf.MixDAConfig(num_domains=2))
        _randomize_adapters(model)
        other = model.generate(**inputs, **kw)
    assert torch.equal(plain, same)
    assert other.shape == plain.shape


def test_trainer_step_changes_only_what_mark_trainable_says(tmp_path):
    from datasets import Dataset

    model = tiny_model("bert", head="cls")
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, layers=[0, -1], gate_dropout=0.0))
    data = batch("bert", B=8, T=9)
    ds = Dataset.from_dict({"input_ids": data["input_ids"].tolist(),
                            "attention_mask": data["attention_mask"].tolist(),
                            "labels": [i % 3 for i in range(8)]})
    for stage in ("domain", "task"):
        mf.mark_trainable(model, stage)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if stage == "domain":
            assert trainable and all(".adapters." in n or ".gate." in n for n in trainable)
            assert any(".adapters." in n for n in trainable)
        else:
            assert trainable == {n for n in trainable if ".gate." in n or n.startswith("classifier.")}
            assert any(n.startswith("classifier.") for n in trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = tf.TrainingArguments(output_dir=str(tmp_path / stage), max_steps=1, per_device_train_batch_size=8,
                                    learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                    disable_tqdm=True)
        tf.Trainer(model=model, args=args, train_dataset=ds).train()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= trainable
        frozen = set(before) - trainable
        assert all(torch.equal(model.get_parameter(n), before[n]) for n in frozen)


def test_mark_trainable_per_domain_and_none_and_all():
    model = tiny_model("llama")
    mf.patch_model(model, mf.MixDAConfig(domains=["bio", "law"]))
    mf.mark_trainable(model, "domain", domain="law")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.law." in n for n in names) and not any(".adapters.bio." in n for n in names)
    mf.mark_trainable(model, "none")
    assert mf.count_parameters(model)[0] == 0
    mf.mark_trainable(model, "all")
    trainable, total = mf.count_parameters(model)
    assert trainable == total > 0


@pytest.mark.parametrize("family", ["roberta", "gpt2", "qwen2"])
def test_save_load_round_trip(tmp_path, family):
    cfg = mf.MixDAConfig(domains=["bio", "law"], layers=[0, 2], adapter_init="normal")
    src = mf.patch_model(tiny_model(family), cfg)
    _randomize_adapters(src, seed=3)
    inputs = batch(family)
    path = mf.save_adapters(src, tmp_path / "all.safetensors")
    dst = mf.patch_model(tiny_model(family), mf.MixDAConfig(domains=["bio", "law"], layers=[0, 2]))
    assert not torch.equal(_out(dst, inputs), _out(src, inputs))
    mf.load_adapters(dst, path)
    assert torch.equal(_out(dst, inputs), _out(src, inputs))
    assert not list(tmp_path.glob("*.tmp"))
    # one domain, saved on its own, loaded into another slot
    one = mf.save_adapters(src, tmp_path, domain="law")
    assert one.name == "mixda_adapter_law.safetensors"
    mf.load_adapters(dst, one, domain="bio")
    a, b = mf.mixda_modules(dst)[2].adapters, mf.mixda_modules(src)[2].adapters
    assert torch.equal(a["bio"].up.weight, b["law"].up.weight)
    # one domain out of a whole-patch file
    mf.load_adapters(dst, path, domain="bio")
    assert torch.equal(a["bio"].up.weight, b["bio"].up.weight)


@pytest.mark.parametrize("formulation", ["folded", "paper"])
def test_compile_fullgraph_over_a_patched_layer(formulation):
    model = tiny_model("llama")
    mf.patch_model(model, mf.MixDAConfig(num_domains=3, adapter_init="normal"))
    layer = mf.mixda_modules(model)[1]
    layer.formulation = formulation
    x = torch.randn(2, 7, layer.hidden_size)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formulation", ["folded", "paper"])
def test_sequence_gate_layer_compiled_alone_reads_its_calls_mask(formulation):
    """A layer compiled on its own (the base model's hooks not traced) reads the mask of the
    eager call it runs in (a graph break), not position -1."""
    model = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(num_domains=3, adapter_init="normal"))
    layer = mf.mixda_modules(model)[1]
    layer.formulation = formulation
    x = torch.randn(3, 5, layer.hidden_size)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    eager = layer._calls.run_in(Frame(mask), layer, x)
    torch.testing.assert_close(layer._calls.run_in(Frame(mask), compiled, x), eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), eager)           # the mask changes the answer


def test_real_minilm_checkpoint():
    path = minilm_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path).eval()
    inputs = dict(tok(["Adapters learn a domain.", "A longer sentence about proteins and the law."],
                      padding=True, return_tensors="pt"))
    before = _out(model, inputs)
    mf.patch_model(model, mf.MixDAConfig(domains=["bio", "law"], mixing="residual"))
    assert len(mf.mixda_modules(model)) == model.config.num_hidden_layers
    assert torch.equal(_out(model, inputs), before)
    _randomize_adapters(model)
    assert not torch.allclose(_out(model, inputs), before)
    mf.unpatch_model(model)
    assert torch.equal(_out(model, inputs), before)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hf_weight_init_leaves_adapters_alone(family):
    model = tiny_model(family)
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, layers=[0]))
    layer = mf.mixda_modules(model)[0]
    before = {n: p.clone() for n, p in layer.named_parameters() if "host_ffn" not in n}
    model.initialize_weights()
    model.apply(model._initialize_weights)
    assert all(torch.equal(layer.get_parameter(n), p) for n, p in before.items())
    assert all(torch.count_nonzero(a.up.weight) == 0 for a in layer.adapters.values())


def test_mlp_bypass_keeps_parameters_registered_once():
    model = tiny_model("bert")
    n_before = sum(1 for _ in model.named_parameters())
    mf.patch_model(model, mf.MixDAConfig(num_domains=1, layers=[0]))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, MixDAFFN)
    assert "encoder.layer.0.intermediate.down_proj.weight" in names
    assert sum(1 for n in names if ".adapters." not in n and ".gate." not in n) == n_before
    clone = copy.deepcopy(model)
    assert mf.is_patched(clone)
