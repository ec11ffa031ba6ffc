"""Both MixDA training stages on tiny models: the losses, loss falling, frozen base weights
bit-identical, resume == uninterrupted, and saved runs that rebuild the trained model."""

import pytest
import torch

import mixda_fast as mf
from mixda_fast.mixda.patching import mixda_state as patch_state
from mixda_fast.training import losses
from mixda_fast.training.data import KnowledgeCollator, encode_knowledge, load_knowledge
from mixda_fast.training.evaluate import evaluate_task, fact_exact_match
from mixda_fast.training.mixda_stage1 import default_layers, run_stage1
from mixda_fast.training.mixda_stage2 import build_stage2_model, load_run, run_stage2
from training_helpers import easy_task_rows, tiny, word_tokenizer, write_data, write_jsonl
from tiny_models import batch


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


QUIET = dict(disable_tqdm=True, logging_steps=2, per_device_train_batch_size=8)


def _patched(family, **cfg):
    model = tiny(family, "lm")
    mf.patch_model(model, mf.MixDAConfig(domains=["d"], layers=[1], **cfg))
    mf.mark_trainable(model, "domain")
    return model


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_old_knowledge_loss_is_positive_and_reaches_the_adapters(family):
    """The released code's L_old compared a tensor with itself (always 0). Here it is the MSE
    between the patched layer's output and the same layer with its adapters off."""
    model = _patched(family, gate_hidden=16)
    with torch.no_grad():                       # a trained-looking adapter: non-zero up-projection
        for m in mf.mixda_modules(model).values():
            m.adapters["d"].up.weight.normal_(0, 0.1)
    inputs = batch(family)
    wrapper = losses.Stage1Model(model).train()
    old = wrapper.old_loss(inputs["input_ids"], inputs["attention_mask"])
    assert old.item() > 0
    old.backward()
    up = mf.mixda_modules(model)[1].adapters["d"]
    assert up.up.weight.grad is not None and up.up.weight.grad.abs().sum() > 0
    assert up.down.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_old_loss_excludes_padding_and_matches_a_full_forward():
    model = _patched("bert", gate_hidden=16)
    inputs = batch("bert")
    wrapper = losses.Stage1Model(model).eval()
    early = wrapper.old_loss(inputs["input_ids"], inputs["attention_mask"])
    caps = []                                   # the same loss from a full forward
    with patch_state(model).calls.collecting(caps):
        model(**inputs)
    torch.testing.assert_close(early, losses.old_knowledge_loss(caps, inputs["attention_mask"]))
    y, f = caps[0]
    y2 = y.clone()
    y2[inputs["attention_mask"] == 0] += 100.0  # padding positions do not count
    torch.testing.assert_close(losses.old_knowledge_loss([(y2, f)], inputs["attention_mask"]), early)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "qwen2"])
def test_knowledge_loss_equals_the_models_own_loss(family):
    """The LM head runs on the labelled positions only; the loss is the model's own."""
    model = _patched(family).eval()
    inputs = batch(family, pad=False)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 3:6] = inputs["input_ids"][:, 3:6]
    causal = losses.is_causal_lm(model)
    assert causal == (family in ("gpt2", "qwen2"))
    with torch.no_grad():
        ours = losses.knowledge_loss(model, inputs["input_ids"], inputs["attention_mask"], labels, causal)
        theirs = model(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs)


def test_default_layers_scale_the_papers_choice():
    assert default_layers(24) == [7, 11]
    assert default_layers(6) == [2, 3]
    assert default_layers(12) == [4, 6]
    assert default_layers(3) == [1]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_stage1_loss_falls_and_base_weights_stay_bit_identical(tmp_path, family):
    knowledge, general, _ = write_data(tmp_path)
    model = tiny(family, "lm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = mf.MixDAConfig(domains=["colors"], layers=[1, 2], mixing="residual", gate_hidden=32)
    res = run_stage1(model, word_tokenizer(), knowledge, tmp_path / "s1", general=general, domain="colors",
                     config=config, old_loss="mse",      # the weak form: 24 steps must move the knowledge loss
                     training_args=dict(max_steps=24, learning_rate=1e-2, **QUIET))
    logs = [h for h in res.log_history if "loss_knowledge" in h]
    assert logs[-1]["loss_knowledge"] < 0.9 * logs[0]["loss_knowledge"]
    assert all(h["loss_old"] > 0 for h in logs)
    mf.unpatch_model(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], p) for n, p in before.items())
    assert {p.name for p in (tmp_path / "s1").iterdir()} >= {"mixda_adapter_colors.safetensors", "adapter_config.json",
                                                              "adapter_model.safetensors", "mixda_run.json"}


def test_stage1_resume_equals_an_uninterrupted_run(tmp_path):
    """Killed right after the checkpoint at step 3 (mid-epoch), resumed: the same adapters and
    gate as a run that was never interrupted (random masking and general-text draws included)."""
    from transformers import TrainerCallback

    knowledge, general, _ = write_data(tmp_path)
    (tmp_path / "plain.txt").write_text("the module returns a list\nthe function returns a value of the list\n" * 4)
    args = dict(max_steps=6, learning_rate=3e-3, save_strategy="steps", save_steps=3, **QUIET)

    class Killed(Exception):
        pass

    class KillAfterStep3(TrainerCallback):
        def on_save(self, a, state, control, **kw):
            if state.global_step == 3:
                raise Killed

    def run(out, knowledge_file, resume=None, callbacks=()):
        model = tiny("bert", "lm")
        config = mf.MixDAConfig(domains=["d"], layers=[1], gate_hidden=16)
        run_stage1(model, word_tokenizer(), knowledge_file, out, general=general, domain="d", config=config,
                   training_args=args, resume_from_checkpoint=resume, callbacks=callbacks)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    for name, data in (("facts", knowledge), ("plain", tmp_path / "plain.txt")):
        full = run(tmp_path / name / "full", data)
        with pytest.raises(Killed):
            run(tmp_path / name / "cut", data, callbacks=[KillAfterStep3()])
        ckpt = tmp_path / name / "cut" / "checkpoint-3"
        assert (ckpt / "trainable.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
        assert (ckpt / "trainable.safetensors").stat().st_size < 400_000     # trainable parameters only
        resumed = run(tmp_path / name / "cut", data, resume=str(ckpt))
        assert resumed.keys() == full.keys() and len(full) > 0
        for n in full:
            assert torch.equal(resumed[n], full[n]), (name, n)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_stage2_end_to_end_and_rebuilt_from_its_folder(tmp_path, family):
    """Stage 1 -> stage 2 through folders: the domain adapter comes along frozen, the frozen
    weights stay bit-identical, the loss falls (GPT-2: a random frozen tiny BERT's [CLS] pooler
    barely sees the text), and load_run rebuilds the same predictions (BERT: its pooler is not in
    a masked-LM checkpoint, so it is random at load and saved with the head)."""
    knowledge, general, _ = write_data(tmp_path)
    task = write_jsonl(tmp_path / "easy.jsonl", easy_task_rows())
    base = tmp_path / "base"
    tiny(family, "lm").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    tok = word_tokenizer()
    from mixda_fast.training.runs import load_lm

    lm, _, _ = load_lm(base)
    config = mf.MixDAConfig(domains=["colors"], layers=[1], gate_hidden=16)
    run_stage1(lm, tok, knowledge, tmp_path / "s1", general=general, domain="colors", config=config,
               training_args=dict(max_steps=4, learning_rate=1e-3, **QUIET), base_model_path=str(base))
    model = build_stage2_model(str(base), num_labels=4, domain_runs=[tmp_path / "s1"],
                               task_adapter="houlsby", reduction_factor=4)
    # the stage-1 adapter (and with K = 1 its gate) came along, frozen
    torch.testing.assert_close(mf.mixda_modules(model)[1].adapters["colors"].up.weight,
                               mf.mixda_modules(lm)[1].adapters["colors"].up.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    res = run_stage2(model, tok, task, tmp_path / "s2", eval_data=task, k_shot=4, seed=0,
                     training_args=dict(num_train_epochs=25 if family == "gpt2" else 2, learning_rate=1e-2,
                                        **QUIET),
                     base_model_path=str(base), domain_runs=[tmp_path / "s1"])
    logs = [h["loss"] for h in res.log_history if "loss" in h]
    if family == "gpt2":
        assert sum(logs[-3:]) < 0.8 * sum(logs[:3])
    assert {"accuracy", "macro_f1"} <= set(res.metrics)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not any(".adapters." in n and p.requires_grad for n, p in model.named_parameters())
    rebuilt, tok2, run = load_run(tmp_path / "s2")
    assert run["stage"] == 2 and run["labels"] == ["blue", "green", "red", "yellow"]
    ours = evaluate_task(model, tok, task)
    assert evaluate_task(rebuilt, tok2, task) == ours
    assert ours["accuracy"] == pytest.approx(res.metrics["accuracy"])


def test_stage1_run_rebuilt_and_fact_exact_match(tmp_path):
    knowledge, general, _ = write_data(tmp_path)
    base = tmp_path / "base"
    tiny("gpt2", "lm").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    from mixda_fast.training.runs import load_lm

    lm, tok, _ = load_lm(base)
    run_stage1(lm, tok, knowledge, tmp_path / "s1", general=general, domain="d",
               config=mf.MixDAConfig(domains=["d"], layers=[1], gate_hidden=16),
               training_args=dict(max_steps=3, **QUIET), base_model_path=str(base))
    rebuilt, tok2, run = load_run(tmp_path / "s1")
    a, b = fact_exact_match(lm, tok, knowledge), fact_exact_match(rebuilt, tok2, knowledge)
    assert a == b and a["facts"] == 16


def test_fact_exact_match_counts_whole_facts():
    """A model that always predicts the label gets 1.0; the base tiny model gets ~0."""
    tok = word_tokenizer()
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp())
    knowledge, _, _ = write_data(path)
    model = tiny("bert", "lm")
    ds = encode_knowledge(load_knowledge(knowledge), tok, causal=False)
    assert fact_exact_match(model, tok, knowledge)["exact_match"] < 0.5

    class Oracle(torch.nn.Module):   # logits that put all mass on the label of each masked token
        def __init__(self):
            super().__init__()
            self.labels = {}

    col = KnowledgeCollator(tok, causal=False)([ds[i] for i in range(len(ds))])
    assert (col["labels"] != -100).sum(1).tolist() == [1] * len(ds)


def test_stage2_multiple_choice_head(tmp_path):
    """Multiple choice: (B, C, T) inputs, the gate reads each (example, choice) sequence."""
    rows = [{"text": f"{e} likes", "choices": ["red", "blue", "green"], "label": i % 3}
            for i, e in enumerate(["e1", "e2", "e3", "e4", "e5", "e6"])]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    base = tmp_path / "base"
    tiny("bert", "mc").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    tok = word_tokenizer()
    model = build_stage2_model(str(base), task="multiple_choice", num_labels=3, task_adapter="pfeiffer")
    mf.patch_model(model, mf.MixDAConfig(domains=["d"], layers=[1], gate_hidden=16, mixing="paper"))
    from mixda_fast.training.mixda_stage2 import freeze_for_task

    freeze_for_task(model)
    res = run_stage2(model, tok, data, tmp_path / "s2", task="multiple_choice", eval_data=data,
                     training_args=dict(max_steps=3, learning_rate=1e-3, **QUIET), base_model_path=str(base))
    assert res.labels == ["0", "1", "2"] and set(res.metrics) >= {"accuracy", "macro_f1"}
    rebuilt, tok2, run = load_run(tmp_path / "s2")
    assert run["task"] == "multiple_choice"
    assert evaluate_task(rebuilt, tok2, data, task="multiple_choice") == \
        evaluate_task(model, tok, data, task="multiple_choice")


def test_a_gate_learning_rate_without_a_trainable_gate_is_refused(tmp_path):
    """A gate learning rate for a model whose gates do not train (frozen, or a gate of one entry)
    would be recorded and do nothing: MixDATrainer refuses it before the Trainer is built."""
    from mixda_fast.training.trainer import MixDATrainer, training_arguments

    model = mf.patch_model(tiny("bert", head="lm"), mf.MixDAConfig(domains=["d"], mixing="residual"))
    mf.mark_trainable(model, "domain", domain="d")
    args = training_arguments(str(tmp_path / "out"), max_steps=1)
    with pytest.raises(ValueError, match=r"^MixDATrainer: gate_learning_rate=0\.001 is not accepted: the model has "
                                         r"no trainable gate parameter"):
        MixDATrainer(model=model, args=args, gate_learning_rate=1e-3)
    trainer = MixDATrainer(model=model, args=args)                  # without it: one learning rate
    assert trainer.gate_learning_rate is None
    paper = mf.patch_model(tiny("bert", head="lm"), mf.MixDAConfig(domains=["d"]))
    mf.mark_trainable(paper, "domain", domain="d")
    assert MixDATrainer(model=paper, args=args, gate_learning_rate=1e-3).gate_learning_rate == 1e-3


@pytest.mark.parametrize("case", ["train_gate_false", "residual_one_domain", "patched_residual_one_domain"])
def test_run_stage1_refuses_an_unused_gate_learning_rate_before_any_work(tmp_path, case):
    """run_stage1 says so before it patches the model or creates the output folder."""
    model = tiny("bert", head="lm")
    residual = mf.MixDAConfig(domains=["d"], mixing="residual")
    config = residual if case == "residual_one_domain" else None
    if case == "patched_residual_one_domain":
        mf.patch_model(model, residual)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    out = tmp_path / "s1"
    with pytest.raises(ValueError, match=r"^run_stage1: gate_learning_rate=0\.001 is not accepted: no gate trains \("):
        run_stage1(model, word_tokenizer(), ["x"], out, domain="d", config=config, gate_learning_rate=1e-3,
                   train_gate=case != "train_gate_false")
    assert not out.exists() and mf.is_patched(model) == (case == "patched_residual_one_domain")
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
