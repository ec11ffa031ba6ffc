"""Files: every loader refuses non-finite, unexpected, missing and mis-shaped tensors (naming the
file and leaving the model as it was); writers never replace a file that is not their own; atomic
writes fsync before the rename, leave no temporary behind (failure, KeyboardInterrupt, SIGKILL)
and give new files the user's umask."""

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mixda_fast as mf
import mixda_fast.core.io as mio
from mixda_fast.task_adapters import add_task_adapters, load_task_adapters, save_task_adapters
from mixda_fast.training.mixda_stage2 import _head_named, _load_named
from mixda_fast.training.trainer import TRAINABLE_FILE, MixDATrainer, write_json_atomic
from tiny_models import tiny_model


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save_head(model, path, fmt):
    return mio.save_safetensors({n: p.detach().clone() for n, p in _head_named(model).items()}, path, {"format": fmt})


# Each loader: build(tmp_path) -> (model to load into, good file, load(model, file), key to corrupt).
def _adapters(tmp):
    cfg = mf.MixDAConfig(domains=["bio", "law"])
    src = mf.patch_model(tiny_model("bert"), cfg)
    _perturb(src)
    return (mf.patch_model(tiny_model("bert"), cfg), mf.save_adapters(src, tmp / "a.safetensors"),
            mf.load_adapters, None)


def _experts(tmp):
    cfg = mf.MoDEConfig(num_blocks=3, domains=["bio", "law"], expert_layers=1)
    src = mf.patch_model(tiny_model("gpt2", head="lm"), cfg)
    _perturb(src)
    return (mf.patch_model(tiny_model("gpt2", head="lm"), cfg), mf.save_experts(src, tmp / "e.safetensors"),
            mf.load_experts, None)


def _compose(tmp):
    src = mf.patch_model(tiny_model("gpt2", head="lm"), mf.MoDEConfig(num_blocks=3, domains=["bio"], expert_layers=1))
    _perturb(src)
    path = mf.save_experts(src, tmp, domain="bio")
    return tiny_model("gpt2", head="lm"), path, lambda m, p: mf.compose_experts(m, [p]), "blocks.1.gate.weight"


def _task_adapters(tmp):
    src = add_task_adapters(tiny_model("bert"), "houlsby")
    _perturb(src)
    return tiny_model("bert"), save_task_adapters(src, tmp / "t.safetensors"), load_task_adapters, None


def _head(tmp):
    src = tiny_model("bert", head="cls")
    _perturb(src)
    path = _save_head(src, tmp / "head.safetensors", mio.HEAD)
    return tiny_model("bert", head="cls"), path, lambda m, p: _load_named(m, p, mio.HEAD), None


def _lm_head(tmp):
    src = tiny_model("roberta", head="lm")
    _perturb(src)
    path = _save_head(src, tmp / "lm_head.safetensors", mio.LM_HEAD)
    return tiny_model("roberta", head="lm"), path, lambda m, p: _load_named(m, p, mio.LM_HEAD), None


def _checkpoint(tmp):
    def trainable(seed):
        model = add_task_adapters(tiny_model("bert", head="cls"))
        for n, p in model.named_parameters():
            p.requires_grad_("task_adapter" in n or n.startswith("classifier."))
        if seed:
            _perturb(model, seed)
        return model

    src = trainable(1)
    (tmp / "ckpt").mkdir()
    path = mio.save_safetensors({n: p.detach().clone() for n, p in src.named_parameters() if p.requires_grad},
                                tmp / "ckpt" / TRAINABLE_FILE, {"format": mio.TRAINABLE})

    def load(model, file):
        MixDATrainer._load_from_checkpoint(types.SimpleNamespace(model=model), str(Path(file).parent))
    return trainable(0), path, load, None


LOADERS = {"load_adapters": _adapters, "load_experts": _experts, "compose_experts": _compose,
           "load_task_adapters": _task_adapters, "head": _head, "lm_head": _lm_head, "checkpoint": _checkpoint}


def _corrupt(path, key, how):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = key or sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    if how in ("nan", "inf"):
        t = tensors[key].clone()
        t.view(-1)[0] = float(how)
        tensors[key] = t
    elif how == "unexpected":
        tensors["embeddings.extra.weight"] = torch.zeros(2)
    elif how == "missing":
        del tensors[key]
    else:   # shape
        t = tensors[key]
        tensors[key] = torch.zeros((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype)
    save_file(tensors, str(path), metadata=meta)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("how, words", [("nan", "non-finite"), ("inf", "non-finite"), ("unexpected", "unexpected"),
                                        ("missing", "missing"), ("shape", "shape")])
@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_refuse_bad_tensors_and_change_nothing(tmp_path, loader, how, words):
    model, path, load, key = LOADERS[loader](tmp_path)
    _corrupt(path, key, how)
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(model, path)
    assert type(info.value) is ValueError
    msg = str(info.value)
    assert str(path) in msg and words in msg and "\n" not in msg
    _assert_same_state(model, before)


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_accept_their_good_file(tmp_path, loader):
    model, path, load, _ = LOADERS[loader](tmp_path)
    before = _state(model)
    load(model, path)
    after = model.state_dict()
    assert after.keys() != before.keys() or any(not torch.equal(after[k], before[k]) for k in before)


def test_head_file_cannot_overwrite_word_embeddings(tmp_path):
    model = tiny_model("bert", head="cls")
    key = "bert.embeddings.word_embeddings.weight"
    tensors = {n: p.detach().clone() for n, p in _head_named(model).items()}
    tensors[key] = torch.zeros_like(model.state_dict()[key])
    path = tmp_path / "head.safetensors"
    save_file(tensors, str(path), metadata={"format": mio.HEAD})
    before = _state(model)
    with pytest.raises(ValueError, match="unexpected.*" + key) as info:
        _load_named(model, path, mio.HEAD)
    assert str(path) in str(info.value)
    _assert_same_state(model, before)


# -- writers ------------------------------------------------------------------------------------
def _save_adapters(path):
    return mf.save_adapters(mf.patch_model(tiny_model("bert"), mf.MixDAConfig(num_domains=1)), path)


def _save_experts(path):
    return mf.save_experts(mf.patch_model(tiny_model("gpt2"), mf.MoDEConfig(num_blocks=1, domains=["a"])), path)


def _save_task(path):
    return save_task_adapters(add_task_adapters(tiny_model("bert")), path)


SAVERS = {"save_adapters": _save_adapters, "save_experts": _save_experts, "save_task_adapters": _save_task}


@pytest.mark.parametrize("foreign", ["jsonl", "other_safetensors"])
@pytest.mark.parametrize("saver", SAVERS)
def test_savers_refuse_to_replace_a_file_not_their_own(tmp_path, saver, foreign):
    path = tmp_path / "train.jsonl"
    if foreign == "jsonl":
        path.write_bytes(b'{"text": "user data"}\n')
    else:   # a safetensors file of another kind (another saver's, or plain)
        save_file({"x": torch.ones(2)}, str(path), metadata={"format": "pt"})
    original = path.read_bytes()
    with pytest.raises(ValueError, match=f"{saver}: path='{path}' is not accepted: .*expected") as info:
        SAVERS[saver](path)
    assert type(info.value) is ValueError
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["train.jsonl"]


@pytest.mark.parametrize("saver", SAVERS)
def test_savers_overwrite_their_own_file(tmp_path, saver):
    path = tmp_path / "own.safetensors"
    SAVERS[saver](path)
    SAVERS[saver](path)
    assert sorted(os.listdir(tmp_path)) == ["own.safetensors"]


@pytest.mark.parametrize("saver", ["save_adapters", "save_experts"])
def test_savers_refuse_each_others_files(tmp_path, saver):
    other = {"save_adapters": "save_experts", "save_experts": "save_adapters"}[saver]
    path = SAVERS[other](tmp_path / "x.safetensors")
    original = path.read_bytes()
    with pytest.raises(ValueError, match="is not accepted"):
        SAVERS[saver](path)
    assert path.read_bytes() == original


# -- atomic writes ------------------------------------------------------------------------------
@pytest.fixture(params=["tmpfile", "tmpfile-copy", "named"])
def mode(request, monkeypatch):
    """How write_atomic gets its temporary: O_TMPFILE + link, O_TMPFILE + copy (link refused, as
    in some containers), or a named temporary (no O_TMPFILE)."""
    if request.param == "named":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    elif request.param == "tmpfile-copy":
        def refuse(*a, **k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "link", refuse)
    return request.param


def test_fsync_before_rename(tmp_path, mode, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    _save_adapters(tmp_path / "a.safetensors")
    assert "replace" in calls and calls.index("fsync") < calls.index("replace")
    assert calls[-1] == "fsync"          # the folder, after the rename
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("writer", ["save_adapters", "write_atomic"])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, mode, monkeypatch, exc, writer):
    path = _save_adapters(tmp_path / "a.safetensors")
    original = path.read_bytes()

    def fail(*args, **kwargs):
        if args and hasattr(args[0], "write"):
            args[0].write(b"partial")
        raise exc
    monkeypatch.setattr(mio, "save", fail)
    with pytest.raises(type(exc)):
        _save_adapters(path) if writer == "save_adapters" else mio.write_atomic(path, fail)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == [path.name]


_KILLED_WRITER = """
import sys, time
from mixda_fast.core.io import write_atomic
def write(f):
    f.write(b"x" * 4096); f.flush()
    print("writing", flush=True)
    time.sleep(60)
write_atomic(sys.argv[1], write)
"""


def test_sigkill_mid_write_leaves_only_the_original(tmp_path):
    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this platform: a killed write may leave its named temporary")
    path = tmp_path / "a.json"
    path.write_bytes(b"original")
    env = dict(os.environ, PYTHONPATH=str(Path(mf.__file__).parent.parent), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == ["a.json"] and path.read_bytes() == b"original"


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, mode, umask, want):
    old = os.umask(umask)
    try:
        path = _save_adapters(tmp_path / "a.safetensors")
        write_json_atomic(str(tmp_path / "run.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == want
    assert os.stat(tmp_path / "run.json").st_mode & 0o777 == want
