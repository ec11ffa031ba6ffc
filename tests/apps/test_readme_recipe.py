"""The README's "MixDA on your own files" walk-through runs as written: its stage-1, stage-2 and
evaluate commands, read from the README, on a tiny checkpoint and the quality benchmark's files
(only the step count is cut)."""

import json
import shlex
from pathlib import Path

import pytest

from mixda_fast.benchmarks.quality_data import build_quality_data
from mixda_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough_commands() -> list:
    """The ``mixda-fast`` commands of the README section, continuation lines joined, comments cut."""
    text = README.read_text()
    section = text.split("## MixDA on your own files", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2]]
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in joined.splitlines() if line.startswith("mixda-fast ")]


def test_readme_walkthrough_runs_stage1_stage2_and_evaluate(tiny_checkpoint, tmp_path, capsys):
    commands = walkthrough_commands()
    assert [c[1] for c in commands] == ["stage1", "stage2", "evaluate", "evaluate"]
    d = build_quality_data(tmp_path, classes=4, train_per_class=2, test_per_class=1, people_jobs=4,
                           general_train=16, general_eval=4)
    files = {"CKPT": tiny_checkpoint, "facts.json": d.knowledge["places"], "general.txt": d.general_train,
             "places/": tmp_path / "places", "task_train.jsonl": d.task_train, "task_dev.jsonl": d.task_test,
             "task/": tmp_path / "task", "facts_held_out.json": d.held_out["places"],
             "task_test.jsonl": d.task_test}
    short = {"stage1": ["--max-steps", "2", "--no-progress"], "stage2": ["--max-steps", "2", "--no-progress"],
             "evaluate": []}
    outputs = []
    for command in commands:
        args = [str(files.get(a, a)) for a in command[1:]] + short[command[1]]
        capsys.readouterr()
        assert main(args) == 0, " ".join(command)
        outputs.append(capsys.readouterr().out)
    run = json.loads((tmp_path / "places" / "mixda_run.json").read_text())
    assert run["config"]["layers"] == [0, 1, 2, 3, 4, 5] and run["config"]["mixing"] == "residual"
    assert run["old_loss"] == "paper" and run["mask_general"] is True
    facts = json.loads(outputs[2].strip().splitlines()[-1])
    task = json.loads(outputs[3].strip().splitlines()[-1])
    assert set(facts) == {"exact_match", "token_accuracy", "facts"} and facts["facts"] == len(json.loads(Path(d.held_out["places"]).read_text()))
    assert set(task) == {"accuracy", "macro_f1", "examples"} and task["examples"] == sum(1 for _ in open(d.task_test))


def test_readme_register_family_example_runs():
    """The README's "Model families" example (register Phi, patch, residual identity, unpatch) runs
    as written; the registration is undone afterwards."""
    import mixda_fast as mf

    section = README.read_text().split("## Model families", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.startswith("python")]
    assert len(blocks) == 1 and "register_family(\"phi\"" in blocks[0]
    assert "phi" not in mf.FAMILIES
    try:
        scope = {}
        exec(compile(blocks[0], str(README), "exec"), scope)
        assert mf.FAMILIES["phi"].up == "mlp.fc1" and not mf.is_patched(scope["model"])
    finally:
        mf.FAMILIES.pop("phi", None)
