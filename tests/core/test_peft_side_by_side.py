"""MixDA next to PEFT LoRA in one model: either order of patching, trainable flags that compose,
each library saving its own part, merge_and_unload, LoRA on the FFN's own projections."""

import copy
import json

import pytest
import torch

import mixda_fast as mf
from tiny_models import batch, randomize_patch, tiny_model

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

ATTENTION = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
FFN = {"bert": r".*\.(intermediate\.dense|layer\.\d+\.output\.dense)", "llama": ["gate_proj", "up_proj", "down_proj"]}
MIXDA = dict(num_domains=2, layers=[0, 2], gate_hidden=16)


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _lora(model, targets):
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets))


def _randomize_lora(model, seed=1):
    """Non-zero B matrices: LoRA at init (B = 0) changes nothing and would hide a LoRA that never ran."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _lora_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _both(family, order, targets, mixing="paper"):
    """(base model, LoRA + MixDA model) patched in ``order``; the base is an untouched copy."""
    base = tiny_model(family)
    model = copy.deepcopy(base)
    config = mf.MixDAConfig(mixing=mixing, **MIXDA)
    if order == "mixda_first":
        pm = _lora(mf.patch_model(model, config), targets)
    else:
        pm = _lora(model, targets)
        assert mf.patch_model(pm if order == "peft_first" else pm.get_base_model(), config) is not None
    return base, pm


ORDERS = ["mixda_first", "peft_first", "peft_first_inner"]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("order", ORDERS)
def test_mixda_on_ffn_and_lora_on_attention_in_either_order(family, order, one_thread):
    inputs = batch(family)
    base, pm = _both(family, order, ATTENTION[family], mixing="residual")
    before = _out(base, inputs)
    assert mf.is_patched(pm) and mf.is_patched(pm.get_base_model())
    assert sorted(mf.mixda_modules(pm)) == [0, 2] and len(_lora_layers(pm)) == 6
    assert torch.equal(_out(pm, inputs), before)                 # LoRA B = 0, adapters zero_up, residual
    randomize_patch(pm)
    _randomize_lora(pm)
    both = _out(pm, inputs)
    with pm.disable_adapter():
        mixda_only = _out(pm, inputs)
        with mf.adapters_disabled(pm):
            assert torch.equal(_out(pm, inputs), before)        # both off: the base model bit for bit
    with mf.adapters_disabled(pm):
        lora_only = _out(pm, inputs)
    assert not torch.allclose(both, mixda_only) and not torch.allclose(both, lora_only)
    assert not torch.allclose(mixda_only, before) and not torch.allclose(lora_only, before)
    mf.unpatch_model(pm)                                        # takes MixDA out, leaves LoRA
    assert not mf.is_patched(pm) and len(_lora_layers(pm)) == 6
    assert torch.equal(_out(pm, inputs), lora_only)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_functions_accept_a_peft_model_and_mark_trainable_keeps_loras_flags(tmp_path):
    _, pm = _both("bert", "peft_first", ATTENTION["bert"])
    lora = {n for n in _trainable(pm) if "lora_" in n}
    assert len(lora) == 12                                      # get_peft_model: LoRA trains
    inner = pm.get_base_model()
    assert mf.mixda_modules(pm) == mf.mixda_modules(inner)
    mixda = {n for n, _ in pm.named_parameters() if ".adapters." in n or ".gate." in n}

    assert mf.mark_trainable(pm, "domain") is pm
    assert _trainable(pm) == mixda | lora                       # LoRA's flags kept, the base frozen
    mf.mark_trainable(pm, "none")
    assert _trainable(pm) == lora
    mf.mark_trainable(pm, "domain", others="freeze")
    assert _trainable(pm) == mixda
    mf.mark_trainable(pm, "domain")                             # "keep" never switches LoRA back on
    assert _trainable(pm) == mixda
    with pytest.raises(ValueError, match=r"^mark_trainable: others='drop' is not accepted: expected 'keep' \| 'freeze'$"):
        mf.mark_trainable(pm, "all", others="drop")
    assert _trainable(pm) == mixda                              # refused before anything changed
    mf.mark_trainable(pm, "all", others="freeze")
    assert _trainable(pm) == {n for n, _ in pm.named_parameters()}

    randomize_patch(pm)
    path = mf.save_adapters(pm, tmp_path / "a.safetensors")
    other = copy.deepcopy(pm)
    patch_params = lambda model: [p for m in mf.mixda_modules(model).values()  # noqa: E731
                                  for p in [*m.adapters.parameters(), *m.gate.parameters()]]
    with torch.no_grad():
        for p in patch_params(other):
            p.zero_()
    mf.load_adapters(other, path)
    assert all(torch.equal(a, b) for a, b in zip(patch_params(pm), patch_params(other), strict=True))
    mf.unpatch_model(pm)
    assert not mf.is_patched(inner)


def test_mark_trainable_leaves_peft_modules_to_save_alone():
    model = tiny_model("bert", head="cls")
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=ATTENTION["bert"]))
    mf.patch_model(pm, mf.MixDAConfig(**MIXDA))
    peft_own = {n for n in _trainable(pm) if "lora_" in n or "modules_to_save" in n}
    assert any("modules_to_save" in n for n in peft_own)
    mf.mark_trainable(pm, "task")
    assert peft_own <= _trainable(pm)
    assert not any("original_module" in n for n in _trainable(pm))   # the head PEFT shadows stays frozen
    assert any(".gate." in n for n in _trainable(pm))
    frozen = _trainable(mf.mark_trainable(pm, "task", others="freeze"))    # PEFT's own frozen, the head it wraps too
    assert frozen and not any("lora_" in n or "modules_to_save" in n or "original_module" in n for n in frozen)
    assert any(".gate." in n for n in frozen)


def _reload(family, order, targets, lora_dir, mixda_file):
    model = tiny_model(family)
    config = mf.MixDAConfig(**MIXDA)
    if order == "mixda_first":
        mf.load_adapters(mf.patch_model(model, config), mixda_file)
        return peft.PeftModel.from_pretrained(model, lora_dir)
    pm = peft.PeftModel.from_pretrained(model, lora_dir)
    mf.load_adapters(mf.patch_model(pm, config), mixda_file)
    return pm


@pytest.mark.parametrize("family,targets,build,reload", [("bert", "attention", "mixda_first", "peft_first"),
                                                          ("bert", "attention", "peft_first", "mixda_first"),
                                                          ("llama", "attention", "peft_first", "peft_first"),
                                                          ("llama", "ffn", "peft_first", "mixda_first"),
                                                          ("llama", "ffn", "mixda_first", "mixda_first")])
def test_each_library_saves_and_reloads_its_own_part(family, targets, build, reload, tmp_path, one_thread):
    """PEFT's file holds LoRA alone, save_adapters' file MixDA alone; reloaded, the model computes
    the same bit for bit. LoRA inside a patched FFN is saved under the patched module names
    (``mlp.host_ffn.up_proj``), so MixDA is patched before PEFT loads it."""
    from safetensors import safe_open

    inputs = batch(family)
    on_ffn = targets == "ffn"
    targets = (FFN if on_ffn else ATTENTION)[family]
    _, pm = _both(family, build, targets)
    randomize_patch(pm)
    _randomize_lora(pm)
    want = _out(pm, inputs)
    pm.save_pretrained(tmp_path / "lora")
    mixda_file = mf.save_adapters(pm, tmp_path / "mixda.safetensors")
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), framework="pt") as f:
        lora_keys = list(f.keys())
    with safe_open(str(mixda_file), framework="pt") as f:
        mixda_keys = list(f.keys())
    assert len(lora_keys) == 2 * len(_lora_layers(pm))
    assert all("lora_" in k and ".adapters." not in k and ".gate." not in k for k in lora_keys)
    assert any("host_ffn" in k for k in lora_keys) == on_ffn
    assert mixda_keys and not any("lora" in k for k in mixda_keys)
    again = _reload(family, reload, targets, tmp_path / "lora", mixda_file)
    assert torch.equal(_out(again, inputs), want)


@pytest.mark.parametrize("family,targets", [("bert", "attention"), ("llama", "attention"), ("llama", "ffn"),
                                            ("bert", "ffn")])
def test_merge_and_unload_merges_lora_and_leaves_mixda_working(family, targets, one_thread):
    inputs = batch(family)
    _, pm = _both(family, "peft_first", (ATTENTION if targets == "attention" else FFN)[family])
    randomize_patch(pm)
    _randomize_lora(pm)
    want = _out(pm, inputs)
    with mf.adapters_disabled(pm):
        want_off = _out(pm, inputs)
    merged = pm.merge_and_unload()
    assert merged is pm.get_base_model() and not _lora_layers(merged) and mf.is_patched(merged)
    got = _out(merged, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)     # merging changes the rounding only
    with mf.adapters_disabled(merged):
        off = _out(merged, inputs)
    torch.testing.assert_close(off, want_off, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, off, atol=1e-3)                  # MixDA still acts


@pytest.mark.parametrize("family,order", [("bert", "peft_first"), ("llama", "peft_first"),
                                          ("llama", "peft_first_inner"), ("llama", "mixda_first")])
def test_lora_on_the_ffn_projections_is_served(family, order, one_thread):
    """LoRA wraps W1 / W2 (and Llama's gate projection): the patched FFN calls them as modules."""
    inputs = batch(family)
    targets = FFN[family]
    plain = _randomize_lora(_lora(tiny_model(family), targets))    # the PEFT model without MixDA
    config = mf.MixDAConfig(mixing="residual", **MIXDA)
    if order == "mixda_first":
        pm = _lora(mf.patch_model(tiny_model(family), config), targets)
        live = dict(pm.named_parameters())
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "lora_" in n:
                    live[n if n in live else n.replace(".mlp.", ".mlp.host_ffn.")].copy_(p)
    else:
        pm = copy.deepcopy(plain)
        mf.patch_model(pm if order == "peft_first" else pm.get_base_model(), config)
    wrapped = [n for n in _lora_layers(pm) if "attention" not in n]
    assert len(wrapped) == (6 if family == "bert" else 9)
    assert not mf.mixda_modules(pm)[0].host.fusable()
    assert torch.equal(_out(pm, inputs), _out(plain, inputs))      # adapters zero_up, residual mixing

    randomize_patch(pm)
    mf.mark_trainable(pm, "domain")                                # both sets train
    out = pm(**inputs)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
    for n, p in pm.named_parameters():
        if "lora_" in n and "attention" not in n or ".adapters." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    with mf.adapters_disabled(pm):
        assert torch.equal(_out(pm, inputs), _out(plain, inputs))
    folded = _out(pm, inputs)
    for m in mf.mixda_modules(pm).values():
        m.formulation = "paper"                                    # the eager form, an independent path
    torch.testing.assert_close(_out(pm, inputs), folded, rtol=1e-5, atol=1e-5)
    mixda_alone = copy.deepcopy(pm.get_base_model())
    with pm.disable_adapter():                                     # LoRA off: MixDA on the host alone
        lora_off = _out(pm, inputs)
    for name, module in list(mixda_alone.named_modules()):         # the same, LoRA layers taken out
        if isinstance(module, BaseTunerLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(mixda_alone.get_submodule(parent), leaf, module.get_base_layer())
    assert mf.mixda_modules(mixda_alone)[0].host.fusable()         # exact Linear again: the fused ops
    torch.testing.assert_close(lora_off, _out(mixda_alone, inputs), rtol=1e-5, atol=1e-5)


def test_readme_peft_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    """The README's "Using with PEFT" code, on tiny BERTs: the reloaded model computes the same."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = text.split("## Using with PEFT", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "merge_and_unload" in code and "PeftModel.from_pretrained" in code
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    inputs = batch("bert")
    scope = {"model": tiny_model("bert"), "fresh_model": tiny_model("bert")}
    trained = code.replace("...", "randomize_patch(model); _randomize_lora(model); want = _out(model, inputs)", 1)
    exec(trained, {**globals(), "inputs": inputs}, scope)
    torch.testing.assert_close(_out(scope["merged"], inputs), scope["want"], rtol=1e-5, atol=1e-5)
    assert mf.is_patched(scope["merged"]) and not _lora_layers(scope["merged"])


def test_a_layer_pickled_with_the_old_base_layer_name_loads_as_host_ffn():
    """The host FFN was ``base_layer`` before PEFT's duck typing made it ``host_ffn``: an old
    pickle (its ``_modules`` key) still loads and computes the same."""
    import pickle

    model = randomize_patch(mf.patch_model(tiny_model("llama"), mf.MixDAConfig(**MIXDA)))
    layer = mf.mixda_modules(model)[0]
    x = torch.randn(2, 3, layer.hidden_size)
    old = copy.copy(layer)
    old._modules = {("base_layer" if k == "host_ffn" else k): v for k, v in layer._modules.items()}
    assert not hasattr(old, "host_ffn")
    loaded = pickle.loads(pickle.dumps(old))
    assert "base_layer" not in loaded._modules and not hasattr(loaded, "base_layer")
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))


@pytest.mark.parametrize("targets", ["attention", "ffn"])
def test_mode_refuses_peft_layers_in_the_transformer_layers_and_changes_nothing(targets):
    """MoDE experts are copies of whole layers: LoRA inside them would be copied into every expert
    (attention) or hide the FFN's projection (FFN). One line, before anything is built; MixDA
    patches the same model."""
    pm = _lora(tiny_model("llama"), ATTENTION["llama"] if targets == "attention" else FFN["llama"])
    inputs = batch("llama")
    ref = _out(pm, inputs)
    modules = {n: id(m) for n, m in pm.named_modules()}
    with pytest.raises(ValueError) as e:
        mf.patch_model(pm, mf.MoDEConfig(domains=["a"], num_blocks=1))
    first = _lora_layers(pm.get_base_model())[0]
    msg = str(e.value)
    assert msg.startswith("patch_model: MoDEConfig is not accepted for a model with PEFT layers in its transformer "
                          "layers (") and f"first: {first!r}, peft.tuners.lora." in msg and "use MixDA" in msg, msg
    assert "\n" not in msg and not mf.is_patched(pm)
    assert {n: id(m) for n, m in pm.named_modules()} == modules and torch.equal(_out(pm, inputs), ref)
    mf.patch_model(pm, mf.MixDAConfig(**MIXDA))
    assert mf.is_patched(pm)


def test_an_adapter_folder_saved_from_a_peft_model_holds_mixda_alone_and_names_the_base(tmp_path, one_thread):
    """mixda_fast.save_pretrained / from_pretrained take the PeftModel too: the folder records the
    transformers model inside it (its class on the card), holds no LoRA tensor, and rebuilds the
    MixDA part exactly next to PEFT's own reload of LoRA."""
    from mixda_fast.core.adapter_folder import CONFIG_NAME, WEIGHTS_NAME
    from safetensors import safe_open

    inputs = batch("bert")
    _, pm = _both("bert", "peft_first", ATTENTION["bert"])
    randomize_patch(pm)
    _randomize_lora(pm)
    want = _out(pm, inputs)
    mf.save_pretrained(pm, tmp_path / "mixda")
    pm.save_pretrained(tmp_path / "lora")
    record = json.loads((tmp_path / "mixda" / CONFIG_NAME).read_text())
    assert record["base_model_class"] == "BertModel"
    assert "transformers.BertModel.from_pretrained" in (tmp_path / "mixda" / "README.md").read_text()
    with safe_open(str(tmp_path / "mixda" / WEIGHTS_NAME), framework="pt") as f:
        assert f.keys() and not any("lora" in k for k in f.keys())
    again = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path / "lora")
    assert mf.from_pretrained(again, tmp_path / "mixda") is again and mf.is_patched(again.get_base_model())
    assert torch.equal(_out(again, inputs), want)


@pytest.mark.parametrize("others", ["keep", "freeze"])
def test_a_refused_stage_next_to_peft_restores_every_flag_and_a_granted_one_keeps_loras(others):
    """mark_trainable's two rules together: a stage refused for a quantized task head (an int8
    weight stands for bitsandbytes' here) leaves every flag as it was, LoRA's included, with
    either ``others``; once the head is float the stage trains it and LoRA is kept or frozen."""
    pm = _lora(tiny_model("bert", head="cls"), ATTENTION["bert"])
    mf.patch_model(pm, mf.MixDAConfig(**MIXDA))
    mf.mark_trainable(pm, "domain")
    head = pm.get_base_model().classifier
    float_weight = head.weight
    head.weight = torch.nn.Parameter(torch.zeros(head.weight.shape, dtype=torch.int8), requires_grad=False)
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    assert any(f for n, f in flags.items() if "lora_" in n) and any(f for n, f in flags.items() if ".adapters." in n)
    for stage in ("task", "all"):
        with pytest.raises(ValueError, match=r"mark_trainable: stage='(task|all)'.*'classifier.weight' of dtype "
                                             r"torch.int8 is not accepted"):
            mf.mark_trainable(pm, stage, others=others)
        assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags, stage
    head.weight = float_weight
    trained = _trainable(mf.mark_trainable(pm, "task", others=others))
    lora = {n for n, _ in pm.named_parameters() if "lora_" in n}
    assert {n for n in trained if "classifier" in n} and any(".gate." in n for n in trained)
    assert not any(".adapters." in n for n in trained)
    assert (lora <= trained) if others == "keep" else not (lora & trained)
