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
