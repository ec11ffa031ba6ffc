"""The ``mixda-fast`` command: every subcommand's --help, clear data errors, and stage 1 ->
stage 2 -> evaluate through folders on a tiny checkpoint."""

import json
import shutil
import subprocess

import pytest
import torch

from mixda_fast.cli import build_parser, main
from training_helpers import easy_task_rows, save_checkpoint, write_data, write_jsonl

SUBCOMMANDS = ["stage1", "stage2", "evaluate", "demo", "quality", "bench", "info"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: mixda-fast " + command in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("mixda-fast")
    if exe is None:
        pytest.skip("mixda-fast is not on PATH (package not installed with its console script)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in SUBCOMMANDS:
        assert command in out.stdout


def test_parser_lists_the_subcommands():
    text = build_parser().format_help()
    assert all(c in text for c in SUBCOMMANDS)


def test_bad_data_line_names_file_and_line(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"prompt": "e1 is {} .", "targets": ["red"]}\n{"prompt": "e2 is {} .", "targets": ["blue"\n')
    code = main(["stage1", "--model", ckpt, "--knowledge", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2: malformed JSON" in err
    missing = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "red"}, {"label": "blue"}])
    code = main(["stage2", "--model", ckpt, "--train", str(missing), "--output", str(tmp_path / "o2")])
    assert code == 2
    assert f"{missing}:2: missing field 'text'" in capsys.readouterr().err
    code = main(["stage1", "--model", str(tmp_path / "nope"), "--knowledge", str(bad), "--output", str(tmp_path)])
    assert code == 2


def test_stage1_stage2_evaluate_through_folders(tmp_path, capsys):
    knowledge, general, _ = write_data(tmp_path)
    task = write_jsonl(tmp_path / "task.jsonl", easy_task_rows())
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    fast = ["--max-steps", "3", "--batch-size", "8", "--no-progress", "--logging-steps", "1"]
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general),
                 "--output", str(tmp_path / "s1"), "--domain", "colors", "--layers", "1", "--gate-hidden", "16",
                 "--gate", "token", "--save-steps", "2", *fast]) == 0
    run = json.loads((tmp_path / "s1" / "mixda_run.json").read_text())
    assert run["domain"] == "colors" and run["config"]["gate"] == "token" and run["config"]["layers"] == [1]
    assert (tmp_path / "s1" / "checkpoint-2" / "trainable.safetensors").is_file()
    # resume the finished run from its checkpoint: it trains the last step again and ends the same
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general),
                 "--output", str(tmp_path / "s1"), "--domain", "colors", "--layers", "1", "--gate-hidden", "16",
                 "--gate", "token", "--save-steps", "2", "--resume", *fast]) == 0
    assert main(["stage2", "--model", ckpt, "--domains", str(tmp_path / "s1"), "--train", str(task),
                 "--eval", str(task), "--output", str(tmp_path / "s2"), "--k-shot", "3", "--task-adapter",
                 "houlsby", *fast]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "s2"), "--data", str(task)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"accuracy", "macro_f1", "examples"} and metrics["examples"] == 24
    assert main(["evaluate", "--run", str(tmp_path / "s1"), "--data", str(knowledge)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["facts"] == 16 and 0 <= metrics["exact_match"] <= 1


def test_stage1_refuses_a_checkpoint_without_lm_head_when_no_head_can_be_fitted(tmp_path, capsys):
    knowledge, _, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert", head="base")          # an encoder without MLM head
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--output", str(tmp_path / "s1"),
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no LM head weights" in err and "--train-lm-head" in err and "--general" in err
    assert not (tmp_path / "s1").exists()


def test_stage1_fits_a_missing_mlm_head_first_and_saves_it(tmp_path, capsys):
    from safetensors.torch import load_file

    from mixda_fast.training.mixda_stage2 import load_run

    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert", head="base")
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general),
                 "--output", str(tmp_path / "s1"), "--layers", "1", "--gate-hidden", "16", "--head-steps", "5",
                 "--max-steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has no masked-LM head" in out and "fitted one on --general text first" in out and "(5 steps" in out
    run = json.loads((tmp_path / "s1" / "mixda_run.json").read_text())
    assert run["lm_head_fitted"] is True and not run["train_lm_head"] and run["files"]["lm_head"] == "lm_head.safetensors"
    head = load_file(str(tmp_path / "s1" / "lm_head.safetensors"))
    model, _, _ = load_run(tmp_path / "s1")            # the rebuilt model has the fitted head, not a fresh one
    state = model.state_dict()
    assert head and all(torch.equal(state[k], v) for k, v in head.items())


def test_stage1_old_loss_form_is_chosen_and_recorded(tmp_path):
    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general),
                 "--output", str(tmp_path / "s1"), "--layers", "1", "--gate-hidden", "16", "--old-loss", "relative",
                 "--max-steps", "2", "--batch-size", "8", "--no-progress", "--logging-steps", "1"]) == 0
    run = json.loads((tmp_path / "s1" / "mixda_run.json").read_text())
    assert run["old_loss"] == "relative"
    logged = [h["loss_old"] for h in run["log_history"] if "loss_old" in h]
    assert logged and all(v > 0 for v in logged[1:])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--output",
                                   str(tmp_path / "x"), "--old-loss", "l1"])


def test_stage1_progress_shows_both_losses_and_mask_general_is_recorded(tmp_path, capsys):
    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    assert main(["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general),
                 "--output", str(tmp_path / "s1"), "--layers", "1", "--gate-hidden", "16", "--mask-general",
                 "--max-steps", "2", "--batch-size", "8", "--logging-steps", "1"]) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if "'loss_knowledge'" in line]
    assert len(progress) == 2 and all("'loss_old'" in line for line in progress)
    run = json.loads((tmp_path / "s1" / "mixda_run.json").read_text())
    assert run["mask_general"] is True


def test_stage2_refuses_warmup_steps_with_warmup_epochs(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    task = write_jsonl(tmp_path / "task.jsonl", easy_task_rows())
    assert main(["stage2", "--model", ckpt, "--train", str(task), "--output", str(tmp_path / "s2"),
                 "--warmup-steps", "3", "--warmup-epochs", "1"]) == 2
    assert "--warmup-steps 3 is not accepted with --warmup-epochs 1: give one of the two" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


# -- precision, gate learning rate, quiet, version, load report ------------------------------------

def _stage1_args(ckpt, knowledge, general, out, *extra):
    return ["stage1", "--model", ckpt, "--knowledge", str(knowledge), "--general", str(general), "--output", str(out),
            "--layers", "1", "--gate-hidden", "16", "--max-steps", "2", "--batch-size", "8", "--logging-steps", "1",
            "--no-progress", *extra]


def _group_lrs(checkpoint) -> dict:
    """{peak learning rate: number of tensors} of the optimizer a Trainer checkpoint saved."""
    groups = torch.load(str(checkpoint / "optimizer.pt"), weights_only=False)["param_groups"]
    out = {}
    for g in groups:
        out[g["initial_lr"]] = out.get(g["initial_lr"], 0) + len(g["params"])
    return out


def test_version(capsys):
    from mixda_fast.version import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mixda-fast {__version__}\n"


def test_gate_lr_reaches_the_gate_parameter_groups_and_the_manifest(tmp_path):
    from mixda_fast.core.model import gate_parameters
    from mixda_fast.training.mixda_stage2 import load_run

    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "s1", "--gate-lr", "3e-3", "--lr", "2e-4",
                             "--save-steps", "1")) == 0
    model, _, run = load_run(tmp_path / "s1")
    n_gate = len(gate_parameters(model))
    assert run["gate_learning_rate"] == 3e-3 and n_gate > 0
    lrs = _group_lrs(tmp_path / "s1" / "checkpoint-1")
    assert set(lrs) == {2e-4, 3e-3} and lrs[3e-3] == n_gate
    task = write_jsonl(tmp_path / "task.jsonl", easy_task_rows())
    assert main(["stage2", "--model", ckpt, "--domains", str(tmp_path / "s1"), "--train", str(task), "--output",
                 str(tmp_path / "s2"), "--max-steps", "1", "--batch-size", "8", "--no-progress", "--save-steps", "1",
                 "--gate-lr", "1e-2"]) == 0
    assert json.loads((tmp_path / "s2" / "mixda_run.json").read_text())["gate_learning_rate"] == 1e-2
    lrs = _group_lrs(tmp_path / "s2" / "checkpoint-1")
    assert set(lrs) == {5e-4, 1e-2} and lrs[1e-2] == n_gate
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "s1b")) == 0         # default: one learning rate
    assert json.loads((tmp_path / "s1b" / "mixda_run.json").read_text())["gate_learning_rate"] is None


def test_gate_lr_refused_where_no_gate_trains(tmp_path, capsys):
    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "s1", "--gate-lr", "1e-3", "--freeze-gate")) == 2
    assert "--gate-lr 0.001 is not accepted with --freeze-gate: the gate does not train" in capsys.readouterr().err
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "s1", "--gate-lr", "1e-3", "--mixing", "residual")) == 2
    assert "--gate-lr 0.001 is not accepted with --mixing residual" in capsys.readouterr().err
    task = write_jsonl(tmp_path / "task.jsonl", easy_task_rows())
    assert main(["stage2", "--model", ckpt, "--train", str(task), "--output", str(tmp_path / "s2"),
                 "--gate-lr", "1e-3"]) == 2
    assert "--gate-lr 0.001 is not accepted without --domains" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_mode_stage1_records_the_gate_lr(tmp_path):
    knowledge, _, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    assert main(["stage1", "--method", "mode", "--model", ckpt, "--knowledge", str(knowledge), "--output",
                 str(tmp_path / "m1"), "--num-blocks", "1", "--expert-layers", "1", "--max-steps", "1",
                 "--batch-size", "8", "--no-progress", "--gate-lr", "2e-3", "--save-steps", "1"]) == 0
    assert json.loads((tmp_path / "m1" / "mixda_run.json").read_text())["gate_learning_rate"] == 2e-3
    assert 2e-3 in _group_lrs(tmp_path / "m1" / "checkpoint-1")


def test_precision_flags(tmp_path, capfd):
    """--bf16 trains under CPU autocast (the losses differ from the float32 run's, the saved
    adapters stay float32); --fp16 without a GPU and --bf16 with --fp16 are refused before any work."""
    from safetensors.torch import load_file

    from mixda_fast.training.trainer import fp16_supported, training_arguments

    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "gpt2")
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        assert main(_stage1_args(ckpt, knowledge, general, tmp_path / name, *extra)) == 0
        run = json.loads((tmp_path / name / "mixda_run.json").read_text())
        losses[name] = [h["loss"] for h in run["log_history"] if "loss" in h]
    assert len(losses["bf16"]) == 2 and torch.isfinite(torch.tensor(losses["bf16"])).all()   # no NaN or inf
    assert losses["bf16"] != losses["fp32"]
    adapters = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_stage1_args(ckpt, knowledge, general, tmp_path / "both", "--bf16", "--fp16"))
    assert e.value.code == 2 and "not allowed with argument" in capfd.readouterr().err
    if fp16_supported():
        pytest.skip("an accelerator is present: fp16 is accepted here")
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "fp16", "--fp16")) == 2
    assert ("--fp16 is not accepted on this machine: fp16 mixed precision needs a GPU"
            in capfd.readouterr().err)
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(ValueError, match="training_arguments: fp16=True is not accepted on this machine"):
        training_arguments(str(tmp_path / "x"), fp16=True)


@pytest.fixture
def transformers_shown():
    """The messages transformers' own logger hands its handlers to print (its stream handler
    writes to the stderr of when it was made, which capfd may not see)."""
    import logging

    class Shown(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    shown, root = Shown(), logging.getLogger("transformers")
    root.addHandler(shown)
    yield shown.messages
    root.removeHandler(shown)


def test_quiet_prints_only_the_result_and_no_run_prints_the_load_report(tmp_path, capfd, transformers_shown):
    """A checkpoint without an MLM head: transformers' LOAD REPORT and tied-weights note are not
    printed (the command says what it does about the head itself); --quiet leaves the result line
    alone on stdout and no progress bar or per-step losses on stderr."""
    knowledge, general, _ = write_data(tmp_path)
    ckpt = save_checkpoint(tmp_path / "ckpt", "bert", head="base")
    capfd.readouterr()
    assert main(_stage1_args(ckpt, knowledge, general, tmp_path / "loud", "--head-steps", "2")) == 0
    out, err = capfd.readouterr()
    assert "'loss_knowledge'" in out and "fitted one on --general text first" in out
    for text in (out, err, "".join(transformers_shown)):
        assert "LOAD REPORT" not in text and "tied weights" not in text and "Loading weights" not in text
    argv = _stage1_args(ckpt, knowledge, general, tmp_path / "quiet", "--head-steps", "2", "--quiet")
    argv.remove("--no-progress")
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"stage 1 done: domain adapter 'domain_0' in {tmp_path / 'quiet'} "
                                "(mixda_adapter_domain_0.safetensors, adapter_model.safetensors, adapter_config.json, lm_head.safetensors)"]
    for noise in ("it/s", "examples/s", "'loss'", "INFO", "LOAD REPORT"):
        assert noise not in err
    assert json.loads((tmp_path / "quiet" / "mixda_run.json").read_text())["log_history"]   # still logged


def test_load_report_shown_only_when_weights_outside_the_head_are_missing(tmp_path, caplog, transformers_shown):
    """A checkpoint that lacks a layer's weights: one warning line names them, then transformers'
    load report follows; a checkpoint without the head only (expected) prints neither."""
    from safetensors.torch import load_file, save_file

    from mixda_fast.training.runs import load_lm

    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(weights))
    gone = sorted(k for k in tensors if ".layer.0.output.dense." in k)
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(weights), metadata={"format": "pt"})
    headless = save_checkpoint(tmp_path / "headless", "bert", head="base")
    transformers_shown.clear()
    with caplog.at_level("WARNING", logger="mixda_fast"):
        _, _, missing = load_lm(ckpt)
    assert sorted(missing) == gone
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("mixda_fast")]
    assert lines == [f"the checkpoint {ckpt} has no weights for {', '.join(gone)}: they are freshly initialised"]
    report = [m for m in transformers_shown if "LOAD REPORT" in m]
    assert len(report) == 1 and all(k in report[0] for k in gone)
    caplog.clear()
    transformers_shown.clear()
    with caplog.at_level("WARNING", logger="mixda_fast"):
        _, _, missing = load_lm(headless)
    assert missing and all(k.startswith("cls.") for k in missing)            # the MLM head only: expected
    assert not [r for r in caplog.records if r.name.startswith("mixda_fast")] and not transformers_shown


def test_a_failed_load_prints_the_held_back_report(tmp_path, transformers_shown):
    """transformers' error on a failed load says "look at the above report": the held-back
    report is printed after all, once, and nothing stays held after the call."""
    import torch
    from safetensors.torch import load_file, save_file

    from mixda_fast.training.runs import load_lm

    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(weights))
    bad = next(k for k in tensors if ".layer.0.output.dense.weight" in k)
    tensors[bad] = torch.zeros(3, 3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    transformers_shown.clear()
    with pytest.raises(RuntimeError, match="look at the above report"):
        load_lm(ckpt)
    report = [m for m in transformers_shown if "LOAD REPORT" in m]
    assert len(report) == 1 and bad in report[0]
    import logging

    assert not any(h.filters for h in logging.getLogger("transformers").handlers)   # nothing left held back


def test_stage2_gradient_checkpointing_trains_the_same_task_adapter(tmp_path):
    from safetensors.torch import load_file

    ckpt = save_checkpoint(tmp_path / "ckpt", "bert")
    task = write_jsonl(tmp_path / "task.jsonl", easy_task_rows())
    args = ["stage2", "--model", ckpt, "--train", str(task), "--max-steps", "2", "--batch-size", "8",
            "--no-progress", "--task-adapter", "houlsby"]
    for name, extra in (("plain", []), ("gc", ["--gradient-checkpointing"])):
        assert main([*args, "--output", str(tmp_path / name), "--save-steps", "2", *extra]) == 0
        targs = torch.load(str(tmp_path / name / "checkpoint-2" / "training_args.bin"), weights_only=False)
        on = getattr(targs, "activation_checkpointing", False) or targs.gradient_checkpointing
        assert on == (name == "gc")                                   # the flag reached the Trainer
    for name in ("task_adapters.safetensors", "head.safetensors"):
        want, got = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "gc" / name))
        assert got.keys() == want.keys() and got
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
