"""Runs are reproducible through the CLI: the same --seed gives bit-identical files, and a run
interrupted and resumed from its checkpoint ends where the uninterrupted run ends."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mixda_fast.cli import main
from training_helpers import easy_task_rows, save_checkpoint, write_data, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

FAST = ["--batch-size", "8", "--no-progress", "--logging-steps", "1"]


def _tensors(folder, pattern):
    files = sorted(folder.glob(pattern))
    assert files, f"no {pattern} in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    knowledge, general, _ = write_data(d)
    task = write_jsonl(d / "task.jsonl", easy_task_rows())
    return dict(knowledge=knowledge, general=general, task=task, bert=save_checkpoint(d / "bert", "bert"),
                gpt2=save_checkpoint(d / "gpt2", "gpt2"))


def _stage1(data, family, out, seed, *extra, method="mixda"):
    args = ["stage1", "--model", data[family], "--knowledge", str(data["knowledge"]), "--domain", "colors",
            "--output", str(out), "--seed", str(seed), "--max-steps", "3", *FAST, *extra]
    if method == "mixda":
        args += ["--general", str(data["general"]), "--layers", "1", "--gate-hidden", "16"]
    else:
        args += ["--method", "mode"]
    assert main(args) == 0


@pytest.mark.parametrize("family,method,pattern", [("bert", "mixda", "mixda_adapter*.safetensors"),
                                                   ("gpt2", "mixda", "mixda_adapter*.safetensors"),
                                                   ("gpt2", "mode", "mode_expert*.safetensors")])
def test_same_seed_same_files_other_seed_other_files(tmp_path, data, family, method, pattern):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        _stage1(data, family, tmp_path / name, seed, method=method)
    a, b, c = (_tensors(tmp_path / n, pattern) for n in "abc")
    assert _same(a, b)
    assert not _same(a, c)


def test_stage2_same_seed_same_head_and_task_adapters(tmp_path, data):
    _stage1(data, "bert", tmp_path / "s1", 1)
    for name in ("a", "b"):
        assert main(["stage2", "--model", data["bert"], "--domains", str(tmp_path / "s1"), "--train",
                     str(data["task"]), "--output", str(tmp_path / name), "--k-shot", "3", "--seed", "2",
                     "--task-adapter", "houlsby", "--max-steps", "2", *FAST]) == 0
    assert _same(_tensors(tmp_path / "a", "*.safetensors"), _tensors(tmp_path / "b", "*.safetensors"))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, data, family):
    """Run 4 steps with a checkpoint every 2; then start over in a new folder that holds only the
    step-2 checkpoint (the run was killed after it) and resume: the final adapters are the same."""
    steps = ["--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"]
    _stage1(data, family, tmp_path / "whole", 3, *steps)
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    _stage1(data, family, tmp_path / "cut", 3, *steps, "--resume")
    whole = _tensors(tmp_path / "whole", "mixda_adapter*.safetensors")
    assert _same(_tensors(tmp_path / "cut", "mixda_adapter*.safetensors"), whole)
    # and resuming from step 2 is not the same as stopping there
    assert not _same(_tensors(tmp_path / "whole" / "checkpoint-2", "trainable.safetensors"),
                     _tensors(tmp_path / "whole" / "checkpoint-4", "trainable.safetensors"))
