"""PEFT-style adapter folders (mixda_fast.save_pretrained / from_pretrained): exact round trips for
both methods on an encoder and a decoder, the layout the Hub expects, the old whole-patch files,
and every refusal leaving the model exactly as it was."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mixda_fast as mf
from mixda_fast.core.adapter_folder import CARD_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from mixda_fast.core.patch import patch_state
from tiny_models import batch, randomize_patch, tiny_model

CASES = [("bert", "mixda"), ("gpt2", "mixda"), ("llama", "mixda"), ("bert", "mode"), ("llama", "mode")]


def _config(method):
    if method == "mixda":
        return mf.MixDAConfig(domains=["bio", "law"], gate_hidden=16, layers=[0, 2])
    return mf.MoDEConfig(num_blocks=3, domains=["bio", "law"], expert_layers=1)


def _saved(family, method, folder, **kw):
    model = tiny_model(family, head="lm")
    mf.patch_model(model, _config(method))
    randomize_patch(model, seed=5)                       # not the zero-init patch
    mf.save_pretrained(model, folder, **kw)
    return model


def _logits(model, family):
    with torch.no_grad():
        return model(**batch(family)).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    assert not mf.is_patched(model)
    assert "mixda_fast" not in model.config.to_dict()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family,method", CASES)
def test_from_pretrained_rebuilds_the_saved_model_exactly(tmp_path, family, method):
    model = _saved(family, method, tmp_path)
    fresh = tiny_model(family, head="lm")
    assert not torch.equal(_logits(model, family), _logits(fresh, family))
    assert mf.from_pretrained(fresh, tmp_path) is fresh
    assert patch_state(fresh, "test").method.name == method
    assert torch.equal(_logits(fresh, family), _logits(model, family))


@pytest.mark.parametrize("method", ["mixda", "mode"])
def test_tensor_names_do_not_depend_on_the_head(tmp_path, method):
    model = _saved("bert", method, tmp_path)
    other = tiny_model("bert", head="cls")              # a classifier: stage 2 on stage-1 adapters
    mf.from_pretrained(other, tmp_path)
    method_ = patch_state(model, "test").method
    mine, theirs = method_.tensors(model), method_.tensors(other)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_folder_is_what_the_hub_expects(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    model = _saved("gpt2", "mixda", tmp_path / "out", base_model_name_or_path="openai-community/gpt2")
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    assert all(p.is_file() for p in folder.iterdir())       # top level only, no hidden or temporary files
    record = json.loads((folder / CONFIG_NAME).read_text())
    state = patch_state(model, "test")
    assert record["library_name"] == "mixda_fast" and "peft_type" not in record
    assert record["format_version"] == FORMAT_VERSION and record["mixda_fast_version"] == mf.__version__
    assert (record["method"], record["model_type"]) == ("mixda", "gpt2")
    assert record["base_model_name_or_path"] == "openai-community/gpt2"
    assert record["base_model_class"] == "GPT2LMHeadModel"
    assert record["config"] == state.config.to_dict() and record["patch"] == {"layers": [0, 2]}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        saved = {k: f.get_tensor(k) for k in f.keys()}
    live = state.method.tensors(model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in live)
    meta = metadata_load(folder / CARD_NAME)
    assert meta["library_name"] == "mixda_fast" and meta["base_model"] == "openai-community/gpt2"
    assert ModelCard.load(folder / CARD_NAME).data.library_name == "mixda_fast"


def test_the_base_model_name_defaults_to_the_checkpoint_and_local_paths_stay_off_the_card(tmp_path):
    tiny_model("bert", head="lm").save_pretrained(tmp_path / "base")
    import transformers as tf

    model = tf.BertForMaskedLM.from_pretrained(tmp_path / "base")
    mf.patch_model(model, _config("mixda"))
    mf.save_pretrained(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    from huggingface_hub.repocard import metadata_load

    assert "base_model" not in metadata_load(tmp_path / "ad" / CARD_NAME)


def test_saving_again_replaces_the_adapters_and_keeps_a_users_card(tmp_path):
    model = _saved("bert", "mixda", tmp_path)
    (tmp_path / CARD_NAME).write_text("# my own card\n")
    randomize_patch(model, seed=9)
    mf.save_pretrained(model, tmp_path)
    assert (tmp_path / CARD_NAME).read_text() == "# my own card\n"
    fresh = mf.from_pretrained(tiny_model("bert", head="lm"), tmp_path)
    assert torch.equal(_logits(fresh, "bert"), _logits(model, "bert"))


@pytest.mark.parametrize("family,method", [("bert", "mixda"), ("llama", "mode")])
def test_folders_of_the_old_whole_patch_files_still_load(tmp_path, family, method):
    model = tiny_model(family, head="lm")
    mf.patch_model(model, _config(method))
    randomize_patch(model, seed=5)
    (mf.save_adapters if method == "mixda" else mf.save_experts)(model, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()
    fresh = mf.from_pretrained(tiny_model(family, head="lm"), tmp_path)
    assert torch.equal(_logits(fresh, family), _logits(model, family))


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    record = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict) and key == "config":
            record[key].update(value)
        else:
            record[key] = value
    path.write_text(json.dumps(record))


def _shrink_a_tensor(folder):
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][..., :1].contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("case,words", [
    ("missing", ["from_pretrained", "save_directory=", "not an existing folder"]),
    ("empty", ["not an adapter folder", "adapter_config.json"]),
    ("peft", ["PEFT adapter", "peft.PeftModel.from_pretrained"]),
    ("other library", ["library_name=None", "'mixda_fast'"]),
    ("newer", [f"format_version={FORMAT_VERSION + 1}", "newer", "upgrade mixda_fast"]),
    ("model_type", ["model_type='gpt2'", "base_model is model_type='bert'"]),
    ("layers", ["does not fit base_model", "patch"]),
    ("shapes", ["has shape", "the model expects"]),
    ("widths", ["has shape", "the model expects"]),
    ("patched", ["already patched", "unpatch_model"]),
])
def test_refusals_name_the_problem_and_leave_the_model_as_it_was(tmp_path, case, words):
    folder = tmp_path / "ad"
    _saved("bert", "mixda", folder)
    base = tiny_model("bert", head="lm")
    if case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "peft":
        (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    elif case == "other library":
        _edit_config(folder, library_name=None)
    elif case == "newer":
        _edit_config(folder, format_version=FORMAT_VERSION + 1)
    elif case == "model_type":
        _edit_config(folder, model_type="gpt2")
    elif case == "layers":
        _edit_config(folder, patch={"layers": [0, 1, 2, 3]}, config={"layers": None})   # from a 4-layer model
    elif case == "shapes":
        _shrink_a_tensor(folder)
    elif case == "widths":
        _edit_config(folder, config={"reduction_factor": 8})
    elif case == "patched":
        mf.patch_model(base, mf.MoDEConfig(num_blocks=1))
    before = _snapshot(base)
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        mf.from_pretrained(base, folder)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    if case == "patched":
        assert base.state_dict().keys() == before.keys()
    else:
        _unchanged(base, before)


def test_save_refuses_an_unpatched_model_a_file_and_another_librarys_folder(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained: model=BertForMaskedLM is not patched"):
        mf.save_pretrained(tiny_model("bert", head="lm"), tmp_path)
    model = tiny_model("bert", head="lm")
    mf.patch_model(model, _config("mixda"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        mf.save_pretrained(model, tmp_path / "file")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    (peft / WEIGHTS_NAME).write_bytes(b"not ours")
    with pytest.raises(ValueError, match="PEFT adapter"):
        mf.save_pretrained(model, peft)
    assert (peft / WEIGHTS_NAME).read_bytes() == b"not ours" and sorted(p.name for p in peft.iterdir()) == [
        CONFIG_NAME, WEIGHTS_NAME]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / WEIGHTS_NAME).write_bytes(b"someone's")
    with pytest.raises(ValueError, match="without adapter_config.json"):
        mf.save_pretrained(model, stray)
    assert (stray / WEIGHTS_NAME).read_bytes() == b"someone's"
    with pytest.raises(TypeError, match="base_model_name_or_path=3"):
        mf.save_pretrained(model, tmp_path / "new", base_model_name_or_path=3)
    assert not (tmp_path / "new").exists()


def test_peft_refuses_the_folder_rather_than_misreading_it(tmp_path):
    peft = pytest.importorskip("peft")
    _saved("bert", "mixda", tmp_path)
    with pytest.raises((TypeError, KeyError, ValueError), match="peft_type"):
        peft.PeftConfig.from_pretrained(str(tmp_path))


def test_bad_arguments_and_a_bad_recorded_config_are_named_with_the_function(tmp_path):
    model = _saved("bert", "mixda", tmp_path / "ad")
    for call in (lambda: mf.save_pretrained(model, 3), lambda: mf.from_pretrained(tiny_model("bert", head="lm"), None)):
        with pytest.raises(TypeError, match=r"^(save|from)_pretrained: save_directory=(3|None) is not accepted: "
                                            r"expected a str or os.PathLike folder path$"):
            call()
    _edit_config(tmp_path / "ad", config={"reduction_factor": -1})
    base = tiny_model("bert", head="lm")
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"^from_pretrained: '.*adapter_config.json': MixDAConfig.reduction_factor=-1 "
                                         r"is not accepted"):
        mf.from_pretrained(base, tmp_path / "ad")
    _unchanged(base, before)


def test_load_patched_and_from_pretrained_point_to_each_other(tmp_path):
    """load_patched reads what transformers' model.save_pretrained wrote (the whole model); given an
    adapter folder (the patch alone) it says which function reads that, in one line; from_pretrained
    given a whole-model folder says the same the other way."""
    model = _saved("bert", "mixda", tmp_path / "ad")
    with pytest.raises(ValueError) as e:
        mf.load_patched(type(model), tmp_path / "ad")
    message = str(e.value)
    assert message.startswith("load_patched: path=") and "is an adapter folder" in message
    assert "mixda_fast.from_pretrained(base_model, path)" in message and "\n" not in message
    model.save_pretrained(tmp_path / "whole")                # the folder load_patched reads still loads
    assert torch.equal(_logits(mf.load_patched(type(model), tmp_path / "whole"), "bert"), _logits(model, "bert"))
    with pytest.raises(FileNotFoundError, match=r"is not an adapter folder: .*is read by mixda_fast.load_patched"):
        mf.from_pretrained(tiny_model("bert", head="lm"), tmp_path / "whole")    # and the way back
