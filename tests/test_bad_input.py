"""Bad input gets a TypeError/ValueError naming the argument, the value and what is accepted,
and leaves the model as it was."""

import re

import pytest
import torch

import mixda_fast as mf
from mixda_fast.mixda import patching
from tiny_models import batch, tiny_model


def _raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (case-sensitive)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.mark.parametrize("kwargs, exc, fragments", [
    (dict(num_domains=0), ValueError, ["num_domains", "0", ">= 1"]),
    (dict(num_domains="3"), TypeError, ["num_domains", "'3'", "int"]),
    (dict(num_domains=True), TypeError, ["num_domains", "True", "int"]),
    (dict(), ValueError, ["num_domains", "domains"]),
    (dict(domains=["bio", "bio"]), ValueError, ["domains", "unique"]),
    (dict(domains="bio"), TypeError, ["domains", "'bio'", "list"]),
    (dict(domains=["bio"], num_domains=2), ValueError, ["num_domains", "2", "len(domains) = 1"]),
    (dict(num_domains=1, layers="all"), TypeError, ["layers", "'all'", "list of int"]),
    (dict(num_domains=1, layers=[0.5]), TypeError, ["layers", "0.5"]),
    (dict(num_domains=1, reduction_factor=0), ValueError, ["reduction_factor", "0", ">= 1"]),
    (dict(num_domains=1, adapter_input="x"), ValueError, ["adapter_input", "'x'", "'intermediate'", "'hidden'"]),
    (dict(num_domains=1, gate="layer"), ValueError, ["gate", "'layer'", "'sequence'", "'token'"]),
    (dict(num_domains=1, mixing="sum"), ValueError, ["mixing", "'sum'", "'paper'", "'residual'"]),
    (dict(num_domains=1, gate_dropout=1.5), ValueError, ["gate_dropout", "1.5", "< 1"]),
    (dict(num_domains=1, gate_layers=0), ValueError, ["gate_layers", "0"]),
    (dict(num_domains=1, paper_gate_bug="yes"), TypeError, ["paper_gate_bug", "'yes'"]),
    (dict(num_domains=1, adapter_init="xavier"), ValueError, ["adapter_init", "'xavier'", "'zero_up'"]),
])
def test_config_validation(kwargs, exc, fragments):
    with _raises(exc, *fragments):
        mf.MixDAConfig(**kwargs)


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    types, state = snap
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not mf.is_patched(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize("layers, fragments", [
    ([3], ["layers", "[3]", "out of range", "-3 .. 2"]),
    ([-4], ["layers", "[-4]", "-3 .. 2"]),
    ([0, -3], ["layers", "twice"]),
])
def test_layer_index_errors_leave_model_unchanged(layers, fragments):
    model = tiny_model("bert")
    snap = _snapshot(model)
    with _raises(ValueError, *fragments):
        mf.patch_model(model, mf.MixDAConfig(num_domains=1, layers=layers))
    _assert_unchanged(model, snap)


def test_reduction_factor_larger_than_width():
    model = tiny_model("gpt2")   # intermediate size 128
    snap = _snapshot(model)
    with _raises(ValueError, "reduction_factor=129", "128", "<= 128"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=1, reduction_factor=129))
    _assert_unchanged(model, snap)


def test_wrong_argument_types():
    model = tiny_model("bert")
    with _raises(TypeError, "config=", "MixDAConfig"):
        mf.patch_model(model, {"num_domains": 2})
    with _raises(TypeError, "model=str", "nn.Module"):
        mf.patch_model("bert-base-uncased", mf.MixDAConfig(num_domains=1))


def test_unknown_family_lists_supported_and_how_to_register():
    import transformers as tf

    cfg = tf.ElectraConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, embedding_size=32)
    model = tf.ElectraModel(cfg)
    snap = _snapshot(model)
    with _raises(ValueError, "model_type='electra'", "'bert'", "'llama'", "register_family"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=1))
    _assert_unchanged(model, snap)


def test_patching_twice():
    model = mf.patch_model(tiny_model("llama"), mf.MixDAConfig(num_domains=1))
    with _raises(ValueError, "already patched", "unpatch_model"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=1))


def test_failed_swap_is_rolled_back(monkeypatch):
    model = tiny_model("bert")
    snap = _snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(patching, "register_name_hooks", boom)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        mf.patch_model(model, mf.MixDAConfig(num_domains=2))
    _assert_unchanged(model, snap)


def test_unpatched_model_errors():
    model = tiny_model("bert")
    with _raises(ValueError, "not patched", "patch_model"):
        mf.unpatch_model(model)
    with _raises(ValueError, "not patched"):
        mf.mark_trainable(model, "domain")


def test_mark_trainable_bad_stage_and_domain():
    model = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio"]))
    with _raises(ValueError, "stage='train'", "'domain'", "'task'", "'none'"):
        mf.mark_trainable(model, "train")
    with _raises(ValueError, "domain='law'", "['bio']"):
        mf.mark_trainable(model, "domain", domain="law")


@pytest.fixture()
def saved(tmp_path):
    model = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio", "law"], layers=[0, 1]))
    return model, mf.save_adapters(model, tmp_path / "a.safetensors")


def test_load_adapters_of_another_shape(saved):
    _, path = saved
    other = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio", "law"], layers=[0, 1],
                                                              reduction_factor=8))
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with _raises(ValueError, "reduction_factor", "16", "8"):
        mf.load_adapters(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in snap.items())


def test_load_adapters_of_another_family(saved):
    _, path = saved
    other = mf.patch_model(tiny_model("roberta"), mf.MixDAConfig(domains=["bio", "law"], layers=[0, 1]))
    with _raises(ValueError, "model_type='bert'", "'roberta'"):
        mf.load_adapters(other, path)


def test_load_adapters_of_another_k_or_layers(saved):
    _, path = saved
    other = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio", "law", "news"], layers=[0, 1]))
    with _raises(ValueError, "domains (K)", "'news'"):
        mf.load_adapters(other, path)
    other = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio", "law"], layers=[0]))
    with _raises(ValueError, "layers", "[0, 1]", "[0]"):
        mf.load_adapters(other, path)


def test_missing_file(saved, tmp_path):
    model, _ = saved
    with pytest.raises(mf.AdapterFileNotFoundError, match="nope.safetensors") as info:
        mf.load_adapters(model, tmp_path / "nope.safetensors")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


def test_truncated_and_garbage_files(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with _raises(ValueError, "cut.safetensors", "truncated"):
        mf.load_adapters(model, cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with _raises(ValueError, "junk.safetensors"):
        mf.load_adapters(model, junk)


def test_nan_weights_are_refused(saved, tmp_path):
    model, _ = saved
    with torch.no_grad():
        mf.mixda_modules(model)[1].adapters["law"].up.weight[0, 0] = float("nan")
    bad = mf.save_adapters(model, tmp_path / "nan.safetensors")
    fresh = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(domains=["bio", "law"], layers=[0, 1]))
    with _raises(ValueError, "layers.1.adapters.law.up.weight", "NaN"):
        mf.load_adapters(fresh, bad)


def test_save_path_errors(saved, tmp_path):
    model, _ = saved
    with _raises(ValueError, "path=", "does not exist"):
        mf.save_adapters(model, tmp_path / "no_such_dir" / "a.safetensors")
    with _raises(TypeError, "path=42", "str or os.PathLike"):
        mf.save_adapters(model, 42)
    with _raises(ValueError, "domain='news'", "['bio', 'law']"):
        mf.save_adapters(model, tmp_path / "x.safetensors", domain="news")


def test_save_replaces_atomically(saved, tmp_path, monkeypatch):
    """A save that fails half-way leaves the earlier file intact and no temporary behind."""
    model, path = saved
    original = path.read_bytes()
    import mixda_fast.core.io as io

    def failing_save(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        mf.save_adapters(model, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_backend_choice_errors():
    with _raises(ValueError, "'nope'", "'auto'", "'cpp'", "'torch'"):
        mf.set_backend("nope")


def test_register_family_errors():
    with _raises(ValueError, "'bert'", "already registered"):
        mf.register_family("bert", mf.FAMILIES["bert"])
    with _raises(TypeError, "spec=", "FamilySpec"):
        mf.register_family("mine", {"layers": "h"})


def test_odd_ffn_input_shapes_still_work():
    model = mf.patch_model(tiny_model("gpt2"), mf.MixDAConfig(num_domains=1))
    layer = mf.mixda_modules(model)[0]
    x = torch.randn(4, layer.hidden_size)     # (T, D) without batch dim
    assert layer(x).shape == (4, layer.hidden_size)
    out = model(**batch("gpt2", B=1, T=1, pad=False))
    assert out.last_hidden_state.shape == (1, 1, 32)


# ---- issue 10 item 7: names, caps, CLI flags, labels, manifests ----------------------------------

BAD_NAMES = ["a/b", "a\x00b", "a\nb", "x" * 101, "", "-a", "a.b", "a b", "..", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("cls", ["MixDAConfig", "MoDEConfig"])
def test_unsafe_domain_names_refused(cls, name):
    with _raises(ValueError, f"{cls}.domains=", repr(name), "safe file name"):
        getattr(mf, cls)(domains=[name])


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_domains=10 ** 12), "num_domains"), (dict(num_domains=1, gate_hidden=65537), "gate_hidden"),
    (dict(num_domains=1, gate_layers=65), "gate_layers"), (dict(num_domains=1, reduction_factor=2 ** 21), "reduction_factor"),
    (dict(num_domains=1, gate_dropout=float("nan")), "gate_dropout"), (dict(num_domains=1, layers=[10 ** 9]), "layers"),
])
def test_mixda_config_caps(kwargs, field):
    with _raises(ValueError, f"MixDAConfig.{field}="):
        mf.MixDAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_blocks=10 ** 9), "num_blocks"), (dict(expert_layers=257), "expert_layers"),
    (dict(num_experts=1025), "num_experts"),
])
def test_mode_config_caps(kwargs, field):
    with _raises(ValueError, f"MoDEConfig.{field}=", "mixda_fast.core.validate.MAX_"):
        mf.MoDEConfig(**kwargs)


def test_config_from_json_names_source():
    with _raises(ValueError, "f.safetensors", "num_domains=1000000000000"):
        mf.MixDAConfig.from_json('{"num_domains": 1000000000000}', source="f.safetensors")
    with _raises(ValueError, "f.safetensors", "malformed JSON"):
        mf.MoDEConfig.from_json("{oops", source="f.safetensors")


CLI_BAD = [
    ("stage1", "--lr", "nan"), ("stage1", "--lr", "0"), ("stage1", "--lr", "-1"), ("stage1", "--lambda", "inf"),
    ("stage1", "--lambda", "-1"), ("stage1", "--old-weight", "inf"), ("stage1", "--old-weight", "nan"),
    ("stage1", "--weight-decay", "-5"), ("stage1", "--weight-decay", "nan"), ("stage1", "--threads", "-1"),
    ("stage1", "--epochs", "inf"), ("stage1", "--epochs", "0"), ("stage1", "--gate-dropout", "1.5"),
    ("stage1", "--gate-dropout", "-0.1"), ("stage1", "--batch-size", "0"), ("stage1", "--max-length", "0"),
    ("stage1", "--grad-accum", "0"), ("stage1", "--logging-steps", "0"), ("stage1", "--max-steps", "-1"),
    ("stage1", "--save-steps", "-1"), ("stage1", "--save-total-limit", "-1"), ("stage1", "--seed", "-1"),
    ("stage1", "--seed", str(2 ** 32)), ("stage1", "--reduction-factor", "0"), ("stage1", "--gate-hidden", "65537"),
    ("stage1", "--gate-layers", "0"), ("stage1", "--general-batch-size", "0"), ("stage1", "--layers", "1.5"),
    ("stage1", "--num-blocks", "0"), ("stage1", "--expert-layers", "1000"), ("stage1", "--domain", "a/b"),
    ("stage1", "--domain", "x" * 101), ("stage1", "--batch-size", "many"),
    ("stage2", "--lr", "nan"), ("stage2", "--warmup-epochs", "-1"), ("stage2", "--warmup-epochs", "nan"),
    ("stage2", "--k-shot", "0"), ("stage2", "--task-reduction-factor", "0"), ("stage2", "--labels", "a,a"),
    ("stage2", "--labels", "a,,b"), ("stage2", "--expert-names", "a/b,c"), ("stage2", "--threads", "-3"),
    ("evaluate", "--batch-size", "0"), ("evaluate", "--threads", "-1"),
    ("demo", "--seed", "-1"), ("demo", "--threads", "-1"),
]


def _cli_args(command, tmp_path):
    out = tmp_path / "out"
    return out, {"stage1": ["stage1", "--model", str(tmp_path / "m"), "--knowledge", str(tmp_path / "k.txt"),
                            "--output", str(out)],
                 "stage2": ["stage2", "--model", str(tmp_path / "m"), "--train", str(tmp_path / "t.jsonl"),
                            "--output", str(out)],
                 "evaluate": ["evaluate", "--run", str(out), "--data", str(tmp_path / "d.txt")],
                 "demo": ["demo", "--out", str(out)]}[command]


@pytest.mark.parametrize("command, flag, value", CLI_BAD, ids=[f"{c}{f}={v[:12]}" for c, f, v in CLI_BAD])
def test_cli_refuses_bad_numbers_and_names(command, flag, value, tmp_path, capsys):
    from mixda_fast.cli import main

    out, args = _cli_args(command, tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*args, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mixda-fast {command}: error: argument {flag}") and "is not accepted: expected" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["stage1", "stage2", "demo"])
def test_cli_refuses_output_that_is_a_file(command, tmp_path, capsys):
    from mixda_fast.cli import main

    out, args = _cli_args(command, tmp_path)
    out.write_text("user data")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "existing file" in capsys.readouterr().err and out.read_text() == "user data"


@pytest.mark.parametrize("rows, labels, fragments", [
    ([{"text": "a", "label": 10 ** 9}], None, ["t.jsonl:1", "label", "1000000000", "MAX_CLASSES"]),
    ([{"text": "a", "label": -1}], None, ["t.jsonl:1", "negative"]),
    ([{"text": "a", "label": "x"}], ["y", "z"], ["t.jsonl:1", "'x'", "not one of the labels"]),
    ([{"text": "a", "label": "x"}], ["x", "x"], ["labels", "unique"]),
    ([{"text": "a", "label": "x"}], [], ["labels", "MAX_CLASSES"]),
])
def test_task_labels_refused(rows, labels, fragments, tmp_path):
    import json

    from mixda_fast.training.data import load_task

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with _raises(ValueError, *fragments):
        load_task(path, labels=labels)


_GOOD_RUN = {"format": "mixda_fast.run/1", "stage": 1, "domain": "bio", "model_type": "bert",
             "config": {"domains": ["bio"]}, "files": {"adapters": "mixda_adapters.safetensors"}}


@pytest.mark.parametrize("change, fragments", [
    (dict(stage=7), ["stage=7", "1 | 2"]),
    (dict(method="lora"), ["method='lora'"]),
    (dict(files=[]), ["files=[]", "dict"]),
    (dict(files={"adapters": "/etc/passwd"}), ["files['adapters']", "/etc/passwd", "plain file name"]),
    (dict(files={"adapters": "../x.safetensors"}), ["files['adapters']", "plain file name"]),
    (dict(files={"adapters": ".."}), ["files['adapters']"]),
    (dict(files={}), ["'adapters'", "stage-1"]),
    (dict(config={"num_domains": 10 ** 12}), ["config", "num_domains=1000000000000", "MAX_DOMAINS"]),
    (dict(config={"domains": ["a/b"]}), ["config", "MixDAConfig.domains"]),
    (dict(config="x"), ["config", "dict"]),
    (dict(domain="a/b"), ["domain='a/b'"]),
    (dict(method="mode", config={"num_blocks": 10 ** 9}, files={"expert": "e.safetensors", "experts": "x.safetensors"}),
     ["MoDEConfig.num_blocks"]),
    (dict(max_length=0), ["max_length=0"]),
    (None, ["mixda_run.json", "JSON object"]),
])
def test_manifest_refused(change, fragments, tmp_path):
    import json

    from mixda_fast.training.runs import read_run

    run = [1, 2] if change is None else {**_GOOD_RUN, **change}
    (tmp_path / "mixda_run.json").write_text(json.dumps(run))
    with pytest.raises((TypeError, ValueError)) as e:
        read_run(tmp_path)
    msg = str(e.value)
    assert "mixda_run.json" in msg and all(f in msg for f in fragments), msg


def test_manifest_malformed_json_and_symlink(tmp_path):
    from mixda_fast.training.runs import read_run

    (tmp_path / "mixda_run.json").write_text("{oops")
    with _raises(ValueError, "mixda_run.json", "malformed JSON"):
        read_run(tmp_path)
    import json

    (tmp_path / "link.safetensors").symlink_to("/etc/passwd")
    (tmp_path / "mixda_run.json").write_text(json.dumps({**_GOOD_RUN, "files": {"adapters": "link.safetensors"}}))
    with _raises(ValueError, "files['adapters']", "outside"):
        read_run(tmp_path)
    (tmp_path / "link.safetensors").unlink()
    (tmp_path / "mixda_run.json").write_text(json.dumps(_GOOD_RUN))
    assert read_run(tmp_path)["domain"] == "bio"


@pytest.mark.parametrize("name,value,exc", [("knowledge_weight", float("nan"), ValueError),
                                            ("old_weight", float("inf"), ValueError),
                                            ("old_weight", -1.0, ValueError),
                                            ("knowledge_weight", "0.5", TypeError),
                                            ("gate_learning_rate", float("nan"), ValueError),
                                            ("gate_learning_rate", 0.0, ValueError)])
def test_trainer_loss_weights_and_gate_lr_are_finite(name, value, exc):
    from mixda_fast.training.trainer import MixDATrainer

    with pytest.raises(exc, match=rf"MixDATrainer: {name}="):
        MixDATrainer(**{name: value})
