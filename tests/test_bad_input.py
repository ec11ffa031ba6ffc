"""Bad input gets a TypeError/ValueError naming the argument, the value and what is accepted,
and leaves the model as it was."""

import re

import pytest
import torch

import mixda_fast as mf
from mixda_fast import patching
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
    (dict(num_domains=1, gate_dropout=1.5), ValueError, ["gate_dropout", "1.5", "[0, 1)"]),
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

    def boom(self, base):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(patching._MaskCapture, "register", boom)
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
    import mixda_fast.saving as saving

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", failing_save)
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
