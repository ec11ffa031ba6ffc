"""MixDA on quantized base models: bitsandbytes 8-bit and 4-bit (loaded through transformers'
BitsAndBytesConfig, on the CPU) and torch.ao dynamic int8 (quantize_dynamic({nn.Linear}, qint8)).

The adapters and gates are built in the dtype the host computes in (not int8) with sizes from
in_features / out_features (a 4-bit weight is a packed (n, 1) uint8 tensor); a quantized
projection is called as a module, never read, and nothing packs or releases its storage. With the
adapters off, or zero-initialised with residual mixing, the patched model is the quantized model
bit for bit; unpatch_model gives it back exactly; stage 1 and a stage-2 step train only what they
should; adapters trained on a quantized base reload into a fresh one exactly.

The tiny models are 64 wide: bitsandbytes' CPU 4-bit inference kernel (AVX512-BF16 machines) needs
in_features >= its 64-wide quantization block.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import transformers as tf

import mixda_fast as mf
from mixda_fast.core.projections import is_exact
from mixda_fast.training import losses
from quantized_models import BNB_MISSING, D, F_PLAIN, KINDS, quantized, quantized_config
from tiny_models import batch, randomize_patch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch.ao's dynamic Linear registers no autograd kernel (README "Quantized base models")
              pytest.mark.filterwarnings("ignore:quantized..linear_dynamic"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
              pytest.mark.filterwarnings("ignore:.*quantize_per_tensor"),
              pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated")]

FAMILIES = ("bert", "gpt2", "llama")      # moved W2 (BERT), Conv1D (GPT-2), gated (Llama)
FORMULATIONS = mf.MixDAFFN.FORMULATIONS     # "fused" falls back to "folded" where W2 is quantized


def _down(model, family):
    return {"bert": lambda b, i: b.encoder.layer[i].output.dense, "gpt2": lambda b, i: b.h[i].mlp.c_proj,
            "llama": lambda b, i: b.layers[i].mlp.down_proj}[family](model.base_model, 1)


def _storage(module):
    """What the patch must leave alone: W2's tensors by name, (data pointer, value). Read without
    state_dict(), which makes bitsandbytes 4-bit undo its CPU repacking in place; torch.ao keeps
    its weight packed behind a method (the packed object's id stands for the pointer)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    if not tensors:
        return {"weight()": (id(module._packed_params._packed_params), module.weight().int_repr())}
    return {n: (t.data_ptr(), t.detach().clone()) for n, t in tensors.items()}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_patch_is_exact_on_a_quantized_base(tmp_path, kind, family):
    model = quantized(kind, family, tmp_path)
    inputs = batch(family)
    down = _down(model, family)
    assert not is_exact(down) or (kind, family) == ("ao", "gpt2")   # quantize_dynamic leaves Conv1D
    ref = _logits(model, inputs)          # (bitsandbytes 4-bit repacks its weights for the CPU here)
    stored = _storage(down)
    modules = dict(model.named_modules())

    mf.patch_model(model, mf.MixDAConfig(domains=["a", "b"], mixing="residual", gate_hidden=16))
    F = 4 * D if family == "gpt2" else F_PLAIN
    for m in mf.mixda_modules(model).values():
        assert (m.hidden_size, m.intermediate_size) == (D, F)           # never the packed weight's shape
        for n, p in list(m.adapters.named_parameters()) + list(m.gate.named_parameters()):
            assert p.dtype == torch.float32 and p.device.type == "cpu", n
        assert m.adapters["a"].down.weight.shape == (F // 16, F) and m.adapters["a"].up.weight.shape == (D, F // 16)
        host = m.host
        assert host.fusable() == all(is_exact(p) for p in (host.first, host.down, host.up) if p is not None)
    assert stored.keys() == _storage(down).keys()
    for n, (ptr, t) in _storage(down).items():        # W2 neither packed with the adapters nor copied
        assert ptr == stored[n][0] and torch.equal(t, stored[n][1]), n

    for formulation in FORMULATIONS:                  # zero-init adapters + residual mixing: exact
        for m in mf.mixda_modules(model).values():
            m.formulation = formulation
        assert torch.equal(_logits(model, inputs), ref), formulation
    randomize_patch(model)
    outs = {}
    for formulation in FORMULATIONS:
        for m in mf.mixda_modules(model).values():
            m.formulation = formulation
        outs[formulation] = _logits(model, inputs)
    assert not torch.allclose(outs["fused"], ref, atol=1e-3)
    torch.testing.assert_close(outs["fused"], outs["folded"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["paper"], outs["folded"], atol=1e-5, rtol=1e-5)
    with mf.adapters_disabled(model):
        assert torch.equal(_logits(model, inputs), ref)

    mf.unpatch_model(model)
    assert {n: id(m) for n, m in model.named_modules()} == {n: id(m) for n, m in modules.items()}
    assert torch.equal(_logits(model, inputs), ref)
    for n, (ptr, t) in _storage(down).items():
        assert ptr == stored[n][0] and torch.equal(t, stored[n][1]), n


def _no_backward_warning(kind):
    """torch.ao's dynamic Linear has no backward: mark_trainable says so (README)."""
    return pytest.warns(UserWarning, match="torch.ao dynamic quantized Linear, which has no backward") \
        if kind == "ao" else contextlib.nullcontext()


def _step(model, loss):
    """backward + one SGD step over the parameters that require grad; returns their names."""
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    return trainable


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_stage1_stage2_and_saved_adapters_on_a_quantized_base(tmp_path, kind, family):
    """Stage 1 (knowledge + L_old) and a stage-2 step train only adapters / gates (and the task
    head and task adapters); the stage-1 adapters reload into a fresh quantized model exactly."""
    config = mf.MixDAConfig(domains=["d"], layers=[1], gate_hidden=16)
    model = quantized(kind, family, tmp_path)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    mf.patch_model(model, config)
    with _no_backward_warning(kind):
        mf.mark_trainable(model, "domain")
    inputs = batch(family)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    wrapper = losses.Stage1Model(model).train()
    out = wrapper(inputs["input_ids"], inputs["attention_mask"], labels,
                  inputs["input_ids"], inputs["attention_mask"])
    assert out["loss_old"].item() >= 0 and torch.isfinite(out["loss_knowledge"])
    with torch.no_grad():                         # a non-zero up projection: L_old then reaches every adapter part
        mf.mixda_modules(model)[1].adapters["d"].up.weight.normal_(0, 0.1)
    out = wrapper(inputs["input_ids"], inputs["attention_mask"], labels,
                  inputs["input_ids"], inputs["attention_mask"])
    trainable = _step(model, 0.5 * out["loss_knowledge"] + out["loss_old"])
    assert trainable and all(".adapters." in n or ".gate." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if ".adapters." in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(t, frozen[n]) for n, t in model.state_dict().items() if n in frozen)

    model.eval()
    saved = mf.save_adapters(model, tmp_path / "stage1.safetensors", domain="d")
    want = _logits(model, inputs)
    again = quantized(kind, family, tmp_path)
    mf.patch_model(again, config)
    mf.load_adapters(again, saved)
    for a, b in zip(mf.mixda_modules(again)[1].adapters.parameters(), mf.mixda_modules(model)[1].adapters.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    mf.load_adapters(again, mf.save_adapters(model, tmp_path / "all.safetensors"))   # gates too
    assert torch.equal(_logits(again, inputs), want)
    mf.save_pretrained(model, tmp_path / "folder")                # the adapter folder, too
    rebuilt = mf.from_pretrained(quantized(kind, family, tmp_path), tmp_path / "folder")
    assert torch.equal(_logits(rebuilt, inputs), want)

    cls = quantized(kind, family, tmp_path, head="cls")       # stage 2: head and task adapters train
    mf.patch_model(cls, config)
    mf.load_adapters(cls, saved)
    mf.add_task_adapters(cls, "houlsby", reduction_factor=4)
    # torch.ao leaves GPT-2's Conv1D float: with the head kept float too, nothing is quantized there
    with _no_backward_warning("float" if (kind, family) == ("ao", "gpt2") else kind):
        mf.mark_trainable(cls, "task")
    cls.train()
    domain = {n: p.detach().clone() for n, p in cls.named_parameters() if ".adapters." in n}
    trainable = _step(cls, cls(**inputs, labels=torch.tensor([0, 1, 2])).loss)
    assert trainable and not any(".adapters." in n for n in trainable)
    assert any(".gate." in n for n in trainable) and any("task_adapter" in n for n in trainable)
    assert all(torch.equal(p, domain[n]) for n, p in cls.named_parameters() if n in domain)


@pytest.mark.skipif(bool(BNB_MISSING), reason=BNB_MISSING or "-")
def test_a_quantized_task_head_is_refused_and_nothing_changes(tmp_path):
    """BERT's classifier quantized too (bitsandbytes' default): stage 2 cannot train it; the refusal
    names the parameter and leaves every requires_grad flag as it was."""
    torch.manual_seed(0)
    path = tmp_path / "bert"
    tf.AutoModelForSequenceClassification.from_config(quantized_config("bert")).save_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        path, quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    mf.patch_model(model, mf.MixDAConfig(domains=["d"], layers=[1]))
    mf.mark_trainable(model, "domain")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"mark_trainable: stage='task': the task head: parameter "
                                         r"'classifier.weight' of dtype torch.int8 is not accepted"):
        mf.mark_trainable(model, "task")
    with pytest.raises(ValueError, match=r"mark_trainable: stage='all': parameter .* torch.int8"):
        mf.mark_trainable(model, "all")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_torch_ao_quantized_task_head_is_refused_and_nothing_changes():
    """quantize_dynamic on the whole classifier quantizes its head too: a module with no parameter
    at all, so stage 2 would silently train no head. mark_trainable refuses it by name."""
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(quantized_config("bert"))
    model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    mf.patch_model(model, mf.MixDAConfig(domains=["d"], layers=[1]))
    with _no_backward_warning("ao"):
        mf.mark_trainable(model, "domain")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"^mark_trainable: stage='task': the task head: module 'classifier' "
                                         r"\(Linear, quantized\) is not accepted: expected floating-point"):
        with _no_backward_warning("ao"):
            mf.mark_trainable(model, "task")
    with pytest.raises(ValueError, match=r"^mark_trainable: stage='all': module 'bert.encoder.layer.0.attention"
                                         r".self.query' \(Linear, quantized\) is not accepted"):
        mf.mark_trainable(model, "all")              # full fine-tuning of a quantized model: nothing there trains
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_projection_without_sizes_is_refused(tmp_path):
    """A module in W2's place that is neither exact nor says in_features / out_features."""

    class Opaque(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = quantized("ao", "llama", tmp_path)
    mlp = model.base_model.layers[1].mlp
    mlp.down_proj = Opaque(mlp.down_proj)
    with pytest.raises(ValueError, match=r"patch_model: layer 1: down projection Opaque is not accepted: "
                                         r"expected nn.Linear, transformers' Conv1D or a module with int "
                                         r"in_features and out_features"):
        mf.patch_model(model, mf.MixDAConfig(domains=["d"]))
    assert not mf.is_patched(model)


@pytest.mark.skipif(bool(BNB_MISSING), reason=BNB_MISSING or "-")
def test_both_stages_run_through_the_trainer_on_a_bitsandbytes_base(tmp_path):
    """run_stage1 and run_stage2 (transformers' Trainer, which refuses a quantized model without
    PEFT adapters: a patched one with trainable parameters passes) on an 8-bit base."""
    from mixda_fast.training.mixda_stage1 import run_stage1
    from mixda_fast.training.mixda_stage2 import run_stage2
    from training_helpers import easy_task_rows, word_tokenizer, write_data, write_jsonl

    knowledge, general, _ = write_data(tmp_path)
    quiet = dict(disable_tqdm=True, logging_steps=1, per_device_train_batch_size=8, report_to=[])
    config = mf.MixDAConfig(domains=["colors"], layers=[1], gate_hidden=16)
    lm = quantized("bnb8", "llama", tmp_path)
    res = run_stage1(lm, word_tokenizer(), knowledge, tmp_path / "s1", general=general, domain="colors",
                     config=config, training_args=dict(max_steps=2, learning_rate=1e-2, **quiet))
    assert [h for h in res.log_history if "loss_old" in h]
    up = mf.mixda_modules(lm)[1].adapters["colors"].up.weight
    assert up.abs().sum() > 0                                   # moved off its zero init
    cls = quantized("bnb8", "llama", tmp_path, head="cls")
    mf.patch_model(cls, config)
    mf.load_adapters(cls, tmp_path / "s1", domain="colors")
    mf.mark_trainable(cls, "task")
    task = write_jsonl(tmp_path / "easy.jsonl", easy_task_rows())
    res = run_stage2(cls, word_tokenizer(), task, tmp_path / "s2", eval_data=task, k_shot=2, seed=0,
                     training_args=dict(max_steps=2, learning_rate=1e-2, **quiet))
    assert "accuracy" in res.metrics
    assert torch.equal(mf.mixda_modules(cls)[1].adapters["colors"].up.weight, up)   # frozen in stage 2
    assert not cls._hf_peft_config_loaded                       # the Trainer's flag was set for its check only


@pytest.mark.skipif(bool(BNB_MISSING), reason=BNB_MISSING or "-")
@pytest.mark.parametrize("model_dtype, quant, expected", [
    (torch.float32, dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16), torch.float32),
    (torch.bfloat16, dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
    (torch.bfloat16, dict(load_in_8bit=True), torch.bfloat16),
], ids=["4bit-bf16-compute-fp32-model", "4bit-bf16", "8bit-bf16"])
def test_adapters_take_the_dtype_the_quantized_projection_returns(tmp_path, model_dtype, quant, expected):
    """bitsandbytes returns its input's dtype (the model's), whatever its 4-bit compute dtype: the
    adapters and gates are built in that, and the patched model is still the quantized one exactly."""
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(quantized_config("llama")).save_pretrained(tmp_path / "m")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=tf.BitsAndBytesConfig(**quant),
                                                    dtype=model_dtype, device_map="cpu").eval()
    inputs = batch("llama")
    ref = _logits(model, inputs)
    mf.patch_model(model, mf.MixDAConfig(domains=["a", "b"], mixing="residual", gate_hidden=16))
    m = mf.mixda_modules(model)[0]
    assert {p.dtype for p in list(m.adapters.parameters()) + list(m.gate.parameters())} == {expected}
    assert torch.equal(_logits(model, inputs), ref)
    randomize_patch(model)
    out = _logits(model, inputs)
    assert out.dtype == ref.dtype and torch.isfinite(out).all() and not torch.equal(out, ref)


class _Wrapped(nn.Module):
    """A projection wrapper in PEFT's shape: not an exact projection, the sizes on ``base_layer``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x) * 1.0


@pytest.mark.parametrize("kind", ["float", "ao"])
def test_a_wrapped_projection_is_called_with_sizes_from_its_base_layer(tmp_path, kind):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(quantized_config("llama")).eval()
    if kind == "ao":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    for layer in model.base_model.layers:
        layer.mlp.down_proj = _Wrapped(layer.mlp.down_proj)
    inputs = batch("llama")
    ref = _logits(model, inputs)
    mf.patch_model(model, mf.MixDAConfig(domains=["a"], mixing="residual", gate_hidden=16))
    m = mf.mixda_modules(model)[0]
    assert (m.hidden_size, m.intermediate_size) == (D, F_PLAIN) and not m.host.fusable()
    assert m.adapters["a"].up.weight.dtype == torch.float32
    assert torch.equal(_logits(model, inputs), ref)
    mf.unpatch_model(model)
    assert torch.equal(_logits(model, inputs), ref)


def test_adapters_trained_on_the_float_model_load_into_its_torch_ao_quantized_copy(tmp_path):
    """The workflow README recommends for torch.ao (no backward through its quantized Linear):
    train on the float model, quantize a copy, load the adapters; its output is the float patched
    model's up to the int8 error, and exactly the float model's with the adapters off."""
    torch.manual_seed(0)
    float_model = tf.AutoModelForCausalLM.from_config(quantized_config("llama")).eval()
    config = mf.MixDAConfig(domains=["d"], gate_hidden=16)
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear}, dtype=torch.qint8)
    inputs = batch("llama")
    ref_quant = _logits(quant, inputs)
    mf.patch_model(float_model, config)
    randomize_patch(float_model, std=0.05)                       # stands for stage 1
    saved = mf.save_adapters(float_model, tmp_path / "a.safetensors")
    mf.patch_model(quant, config)
    mf.load_adapters(quant, saved)
    want, got = _logits(float_model, inputs), _logits(quant, inputs)
    assert not torch.equal(got, ref_quant)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    with mf.adapters_disabled(quant):
        assert torch.equal(_logits(quant, inputs), ref_quant)
    with pytest.warns(UserWarning, match=r"mark_trainable: \d+ modules \(first: 'model.layers.0.self_attn.q_proj'\)"):
        mf.mark_trainable(quant, "domain")


def test_mode_reads_the_width_of_a_wrapped_down_projection_from_its_sizes():
    """A float backbone whose W2 is wrapped (PEFT's shape): MoDE patches it (D from base_layer), and
    the batched execution, which reads expert weights, runs those experts one by one instead."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(quantized_config("llama")).eval()
    model.base_model.layers[0].mlp.down_proj = _Wrapped(model.base_model.layers[0].mlp.down_proj)
    mf.patch_model(model, mf.MoDEConfig(domains=["a", "b"], num_blocks=3, expert_layers=1, execution="batched"))
    assert mf.mode_blocks(model)[0].gate.in_features == D
    randomize_patch(model)
    batched = _logits(model, batch("llama"))
    for block in mf.mode_blocks(model):
        block.execution = "loop"
    torch.testing.assert_close(_logits(model, batch("llama")), batched, rtol=1e-5, atol=1e-5)


def test_one_rule_tells_an_exact_projection_and_only_those_are_read():
    """core.families.is_exact is the rule the patch, the fused path and linear_weight share: a
    subclass of nn.Linear (bitsandbytes' quantized Linear is one) is not read as a float weight."""
    from mixda_fast.core import families, projections

    class Subclass(nn.Linear):
        pass

    assert projections.is_exact is families.is_exact
    assert families.is_exact(nn.Linear(2, 3)) and not families.is_exact(Subclass(2, 3))
    assert families.linear_weight(nn.Linear(2, 3))[0].shape == (3, 2)
    with pytest.raises(TypeError, match=r"projection module Subclass is not accepted: expected nn.Linear or "
                                        r"transformers' Conv1D exactly"):
        families.linear_weight(Subclass(2, 3))
    assert projections.projection_shape(Subclass(2, 3), "f", "w") == (3, 2)
