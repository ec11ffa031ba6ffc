"""MoDE's two stages on the MixDA training machinery (docs/design.md section 3), through the Python API
and ``mixda-fast stage1/stage2/evaluate --method mode``, on tiny checkpoints: only expert + gates
train in stage 1, the backbone stays bit-identical, stage 2 composes two stage-1 outputs, bad input
errors name what is wrong; and a MoDE-patched model under torch.compile without graph breaks."""

import json

import pytest
import torch
from safetensors import safe_open

import mixda_fast as mf
from mixda_fast.cli import main
from mixda_fast.training.mode_stages import (LMObjective, lm_metrics, load_mode_run, run_mode_stage1,
                                             run_mode_stage2)
from training_helpers import ENTITIES, color_of, general_lines, save_checkpoint, tiny, word_tokenizer
from tiny_models import batch, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


QUIET = dict(disable_tqdm=True, logging_steps=2, per_device_train_batch_size=8)
FAST = ["--batch-size", "8", "--no-progress", "--logging-steps", "1", "--lr", "3e-3"]
CONFIG = dict(num_blocks=3, expert_layers=1)          # 3-layer tiny models: one layer per block


def write_domains(tmp_path):
    """Two domain corpora (.txt lines and {"text"} JSON lines) over the word tokenizer's vocabulary."""
    colors = tmp_path / "colors.txt"
    colors.write_text("".join(f"the color of {ENTITIES[i]} is {color_of(i)} .\n" for i in range(16)))
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": line}) + "\n" for line in general_lines(16)))
    return colors, code


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _losses(history):
    return [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_stage1_api_trains_expert_and_gates_only(tmp_path, family):
    """Causal LM (GPT-2) and 15% masked LM (BERT): the LM loss falls, only the expert and the
    gates train, the backbone is bit-identical, the files rebuild the trained model."""
    colors, _ = write_domains(tmp_path)
    model = tiny(family, "lm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tok = word_tokenizer()
    start = lm_metrics(model, tok, colors)
    res = run_mode_stage1(model, tok, colors, tmp_path / "s1", domain="colors", config=mf.MoDEConfig(**CONFIG),
                          training_args=dict(max_steps=30 if family == "bert" else 20, learning_rate=3e-3, **QUIET),
                          eval_data=colors, gate_learning_rate=1e-2)
    gate_ids = {id(b.gate.weight) for b in mf.mode_blocks(model)}
    lrs: dict = {}
    for g in res.trainer.optimizer.param_groups:
        lrs.setdefault(g["initial_lr"], set()).update(id(p) for p in g["params"])
    assert gate_ids <= lrs[1e-2] and set(lrs) == {1e-2, 3e-3}          # the gates' own learning rate
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mode_blocks." in n and (".experts.colors." in n or ".gate." in n) for n in trainable)
    losses = _losses(res.log_history)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert res.metrics["loss"] < start["loss"] and res.metrics["tokens"] == start["tokens"] > 0
    run = json.loads((tmp_path / "s1" / "mixda_run.json").read_text())
    assert run["method"] == "mode" and run["stage"] == 1 and run["domain"] == "colors" and run["causal"] == (family == "gpt2")
    assert run["files"] == {"expert": "mode_expert_colors.safetensors", "experts": "adapter_model.safetensors",
                            "adapter_config": "adapter_config.json"}
    assert run["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the saved files hold experts and gates only, and rebuild the trained model exactly
    assert all(k.startswith("blocks.") for k in _tensors(tmp_path / "s1" / "adapter_model.safetensors"))
    rebuilt, tok2, _ = load_mode_run(tmp_path / "s1", base_model=_save_base(tmp_path, family))
    assert lm_metrics(rebuilt, tok2, colors) == lm_metrics(model, tok, colors)
    mf.unpatch_model(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], p) for n, p in before.items())


def _save_base(tmp_path, family):
    """The same initial checkpoint as tiny(family, 'lm'), saved as a folder."""
    path = tmp_path / f"base_{family}"
    if not path.exists():
        save_checkpoint(path, family)
    return str(path)


def test_lm_objective_is_the_models_own_loss():
    model = tiny("gpt2", "lm").eval()
    inputs = batch("gpt2", pad=False)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        ours = LMObjective(model)(**inputs, labels=labels)["loss"]
        theirs = model(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs)


def test_stage1_cli_checkpoints_resume_and_evaluate(tmp_path, capsys):
    """`mixda-fast stage1 --method mode`: trainable-only checkpoints; a run resumed from its step-2
    checkpoint ends with the same expert and gates as the uninterrupted run; `evaluate` reports
    LM metrics of the folder."""
    colors, _ = write_domains(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    args = ["stage1", "--method", "mode", "--model", ckpt, "--knowledge", str(colors), "--domain", "colors",
            "--num-blocks", "3", "--expert-layers", "1", "--max-steps", "4", "--save-steps", "2", *FAST]
    assert main([*args, "--output", str(tmp_path / "full"), "--eval", str(colors)]) == 0
    out = capsys.readouterr().out
    assert "MoDE expert 'colors'" in out and '"token_accuracy"' in out
    first = tmp_path / "full" / "checkpoint-2" / "trainable.safetensors"
    assert first.is_file() and (tmp_path / "full" / "checkpoint-2" / "optimizer.pt").is_file()
    assert all(".mode_blocks." in k for k in _tensors(first))        # trainable parameters only
    assert main([*args, "--output", str(tmp_path / "resumed"),
                 "--resume", str(tmp_path / "full" / "checkpoint-2")]) == 0
    full = _tensors(tmp_path / "full" / "adapter_model.safetensors")
    resumed = _tensors(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    run = json.loads((tmp_path / "full" / "mixda_run.json").read_text())
    assert run["config"]["num_blocks"] == 3 and run["config"]["expert_layers"] == 1
    assert run["train"] == [str(colors)] and run["base_model"] == ckpt
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "full"), "--data", str(colors)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"loss", "perplexity", "token_accuracy", "tokens"}
    assert metrics["loss"] == pytest.approx(run["metrics"]["loss"])


def _two_experts(tmp_path, ckpt, colors, code):
    for name, data in (("colors", colors), ("code", code)):
        assert main(["stage1", "--method", "mode", "--model", ckpt, "--knowledge", str(data), "--domain", name,
                     "--output", str(tmp_path / name), "--num-blocks", "3", "--expert-layers", "1",
                     "--max-steps", "3", *FAST]) == 0
    return [tmp_path / "colors", tmp_path / "code"]


def test_stage2_composes_two_stage1_outputs(tmp_path, capsys):
    """API: two stage-1 folders composed behind 3-way gates; gates and experts train, the backbone
    is bit-identical. CLI with --freeze-experts: the experts come out exactly as stage 1 left them,
    the gates trained."""
    colors, code = write_domains(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    s1 = _two_experts(tmp_path, ckpt, colors, code)
    from mixda_fast.training.runs import load_lm

    model, tok, _ = load_lm(ckpt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = run_mode_stage2(model, tok, [colors, code], tmp_path / "s2", experts=s1,
                          training_args=dict(max_steps=12, learning_rate=3e-3, **QUIET), base_model_path=ckpt,
                          eval_data=[colors, code])
    blocks = mf.mode_blocks(model)
    assert len(blocks) == 3 and all(b.names == ["colors", "code"] and b.gate.out_features == 3 for b in blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".gate." in n for n in trainable) and any(".experts.code." in n for n in trainable)
    assert all(".mode_blocks." in n for n in trainable)
    losses = _losses(res.log_history)
    assert losses[-1] < losses[0], losses
    stage1 = _tensors(s1[0] / "mode_expert_colors.safetensors")
    now = _tensors(tmp_path / "s2" / "adapter_model.safetensors")
    key = next(k for k in stage1 if ".expert." in k)
    assert not torch.equal(now[key.replace(".expert.", ".experts.colors.")], stage1[key])   # experts trained
    run = json.loads((tmp_path / "s2" / "mixda_run.json").read_text())
    assert run["method"] == "mode" and run["stage"] == 2 and run["config"]["domains"] == ["colors", "code"]
    assert run["freeze_experts"] is False and set(res.metrics) == {"loss", "perplexity", "token_accuracy", "tokens"}
    mf.unpatch_model(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    assert main(["stage2", "--method", "mode", "--model", ckpt, "--experts", *map(str, s1), "--train", str(colors),
                 str(code), "--output", str(tmp_path / "frozen"), "--freeze-experts", "--max-steps", "3",
                 "--save-steps", "3", *FAST]) == 0
    assert "2 MoDE experts composed" in capsys.readouterr().out
    frozen = _tensors(tmp_path / "frozen" / "adapter_model.safetensors")
    for name, folder in zip(["colors", "code"], s1):
        for k, t in _tensors(folder / f"mode_expert_{name}.safetensors").items():
            if ".expert." in k:
                assert torch.equal(frozen[k.replace(".expert.", f".experts.{name}.")], t), k
    checkpoint = _tensors(tmp_path / "frozen" / "checkpoint-3" / "trainable.safetensors")
    assert checkpoint and all(".gate." in k for k in checkpoint)               # only the gates trained
    rebuilt, tok2, run = load_mode_run(tmp_path / "frozen")
    assert run["freeze_experts"] is True and mf.mode_blocks(rebuilt)[0].names == ["colors", "code"]


def test_bad_input_errors_name_what_is_wrong(tmp_path, capsys):
    colors, code = write_domains(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    out = ["--output", str(tmp_path / "o")]

    def fails(argv, *expected):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        for e in expected:
            assert e in err, (e, err)

    s1 = ["stage1", "--model", ckpt, "--knowledge", str(colors), *out]
    fails([*s1, "--method", "mode", "--layers", "1"], "--layers is a MixDA option", "--method mode",
          "MoDE options: --num-blocks")
    fails([*s1, "--num-blocks", "3"], "--num-blocks is a MoDE option", "add --method mode")
    fails([*s1, "--method", "mode", "--num-blocks", "2"], "MoDEConfig.num_blocks=2", "accepted values: [1, 3]")
    s2 = ["stage2", "--method", "mode", "--model", ckpt, "--train", str(colors), *out]
    fails(s2, "--method mode needs --experts")
    fails([*s2, "--experts", str(tmp_path / "nope")], f"MoDE expert {str(tmp_path / 'nope')!r} does not exist")
    fails([*s2, "--experts", str(colors), "--task", "classification"], "--task is a MixDA option")
    fails(["stage2", "--model", ckpt, "--train", str(colors), "--experts", str(colors), *out],
          "--experts is a MoDE option")
    assert main(["stage1", "--model", ckpt, "--knowledge", str(colors), "--general", str(colors), "--layers", "1",
                 "--gate-hidden", "16", "--output", str(tmp_path / "mixda"), "--max-steps", "1", *FAST]) == 0
    fails([*s2, "--experts", str(tmp_path / "mixda")], "is a MixDA stage-1 run", "--method mode")
    s1_mode = tmp_path / "mode1"
    assert main([*s1[:-2], "--method", "mode", "--output", str(s1_mode), "--max-steps", "1", *FAST]) == 0
    fails(["stage2", "--model", ckpt, "--train", str(colors), "--domains", str(s1_mode), *out],
          "is a MoDE run (experts)")
    fails([*s2, "--experts", str(s1_mode), str(s1_mode)], "must be unique", "--expert-names")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the color of e1 is red ."}\n{"txt": "oops"}\n')
    fails([*s1, "--method", "mode", "--knowledge", str(bad)], f"{bad}:2:", "'prompt'")
    fails([*s2, "--experts", str(s1_mode), "--train", str(colors), str(bad)], f"{bad}:2:")


def _two_expert_model(family):
    model = tiny_model(family)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, expert_layers=1, num_experts=2))
    with torch.no_grad():
        for b in mf.mode_blocks(model):
            b.gate.weight.normal_(0, 0.5)
    return model


def test_compile_fullgraph_training_matches_eager():
    """A MoDE-patched BERT (two experts per block, fused combine) compiles as one graph
    (``fullgraph=True`` fails on any graph break) and gives the eager forward and the eager
    gradients of experts and gates. The aot_eager backend traces forward and backward as inductor
    would receive them, without the minutes of C++ code generation on this CPU (inductor itself
    was checked by hand on tiny BERT and Llama: same outputs and gradients)."""
    model = _two_expert_model("bert")
    mf.mark_trainable(model, "compose")
    inputs = batch("bert", B=2, T=6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = m(**inputs).last_hidden_state
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want_g.keys() == got_g.keys() and any(".experts." in n for n in want_g)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6)


def test_explain_finds_no_graph_break_with_kv_cache():
    """Llama with its KV cache: the experts' cache slots are made and filled inside the graph."""
    model = _two_expert_model("llama")
    inputs = batch("llama", B=2, T=6)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(**inputs, use_cache=True)
    torch._dynamo.reset()
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.parametrize("command,options", [("stage1", ["--num-blocks", "--expert-layers", "--expert-init"]),
                                             ("stage2", ["--experts", "--freeze-experts", "--gate-init"])])
def test_help_shows_the_method_and_mode_options(command, options, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--method {mixda,mode}" in out and "MoDE options (--method mode)" in out
    assert all(o in out for o in options)
