"""Stage output folders are adapter folders (mixda_fast.from_pretrained rebuilds the patch from
them) for both methods and stages, and run folders written before that layout (the whole-patch
file mixda_adapters.safetensors / mode_experts.safetensors) still load through load_run,
load_mode_run, stage 2 and from_pretrained."""

import json

import pytest
import torch
import transformers as tf

import mixda_fast as mf
from mixda_fast.core.adapter_folder import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from mixda_fast.core.patch import patch_state
from mixda_fast.training.evaluate import evaluate_task
from mixda_fast.training.mixda_stage1 import run_stage1
from mixda_fast.training.mixda_stage2 import build_stage2_model, load_run, run_stage2
from mixda_fast.training.mode_stages import load_mode_run, run_mode_stage1
from mixda_fast.training.runs import RUN_FILE, load_lm
from tiny_models import batch
from training_helpers import easy_task_rows, tiny, word_tokenizer, write_data, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

QUIET = dict(disable_tqdm=True, logging_steps=2, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2)


def _base(tmp_path, family="gpt2"):
    base = tmp_path / "base"
    tiny(family, "lm").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    return base


def _logits(model, family="gpt2"):
    with torch.no_grad():
        return model(**batch(family)).logits


def _same_patch(a, b):
    method = patch_state(a, "test").method
    ta, tb = method.tensors(a), method.tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _to_old_layout(run_dir, model, key):
    """The folder as the code before adapter folders wrote it: the whole-patch file under the
    method's entry, no adapter folder files."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        (run_dir / name).unlink()
    path = (mf.save_adapters if key == "adapters" else mf.save_experts)(model, run_dir)
    run = json.loads((run_dir / RUN_FILE).read_text())
    del run["files"]["adapter_config"]
    run["files"][key] = path.name
    (run_dir / RUN_FILE).write_text(json.dumps(run))


def _stage1(tmp_path, base):
    knowledge, general, _ = write_data(tmp_path)
    lm, tok, _ = load_lm(base)
    run_stage1(lm, tok, knowledge, tmp_path / "s1", general=general, domain="colors",
               config=mf.MixDAConfig(domains=["colors"], layers=[1], gate_hidden=16), training_args=QUIET,
               base_model_path=str(base))
    return lm.eval()


def test_mixda_stage_folders_are_adapter_folders_and_old_ones_still_load(tmp_path):
    base = _base(tmp_path)
    lm = _stage1(tmp_path, base)
    s1 = tmp_path / "s1"
    assert {p.name for p in s1.iterdir()} >= {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, RUN_FILE,
                                              "mixda_adapter_colors.safetensors"}
    assert json.loads((s1 / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(base)
    rebuilt = mf.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base).eval(), s1)
    assert torch.equal(_logits(rebuilt), _logits(lm))

    # stage 2: the adapter folder holds the domain adapters and the gates trained in stage 2
    task = write_jsonl(tmp_path / "easy.jsonl", easy_task_rows())
    tok = word_tokenizer()
    model = build_stage2_model(str(base), num_labels=4, domain_runs=[s1], task_adapter="pfeiffer",
                               reduction_factor=4)
    assert _same_patch(model, lm)                             # K = 1: stage 1's adapter and its gate
    run_stage2(model, tok, task, tmp_path / "s2", training_args=QUIET, base_model_path=str(base),
               domain_runs=[s1])
    model.eval()
    s2 = tmp_path / "s2"
    assert json.loads((s2 / RUN_FILE).read_text())["files"] == {
        "adapters": WEIGHTS_NAME, "adapter_config": CONFIG_NAME, "task_adapters": "task_adapters.safetensors",
        "head": "head.safetensors"}
    patched = mf.from_pretrained(tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=4), s2)
    assert _same_patch(patched, model) and not _same_patch(patched, lm)     # the gate trained in stage 2
    mf.load_task_adapters(patched, s2)                        # the task adapters: their own file
    mine, theirs = mf.task_adapter_modules(model), mf.task_adapter_modules(patched)
    assert all(torch.equal(a, b) for k in mine for a, b in zip(mine[k].parameters(), theirs[k].parameters()))
    expected = evaluate_task(model, tok, task)
    assert evaluate_task(load_run(s2)[0], tok, task) == expected

    # the same folders in the old layout still load, and stage 2 still reads an old stage-1 folder
    _to_old_layout(s1, lm, "adapters")
    _to_old_layout(s2, model, "adapters")
    assert torch.equal(_logits(load_run(s1)[0]), _logits(lm))
    assert evaluate_task(load_run(s2)[0], tok, task) == expected
    assert _same_patch(build_stage2_model(str(base), num_labels=4, domain_runs=[s1]), lm)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_mode_stage_folder_is_an_adapter_folder_and_an_old_one_still_loads(tmp_path, family):
    base = _base(tmp_path, family)
    knowledge, _, _ = write_data(tmp_path)
    lm, tok, _ = load_lm(base)
    run_mode_stage1(lm, tok, knowledge, tmp_path / "s1", domain="colors",
                    config=mf.MoDEConfig(num_blocks=3, expert_layers=1), training_args=QUIET,
                    base_model_path=str(base))
    lm.eval()
    fresh = load_lm(base)[0].eval()
    assert torch.equal(_logits(mf.from_pretrained(fresh, tmp_path / "s1"), family), _logits(lm, family))
    _to_old_layout(tmp_path / "s1", lm, "experts")
    assert torch.equal(_logits(load_mode_run(tmp_path / "s1")[0], family), _logits(lm, family))


def test_a_stage_refuses_a_folder_holding_a_peft_adapter_before_it_trains(tmp_path):
    """The adapter folder is written after training: a folder it would refuse then (another
    library's adapter) is refused before anything is patched, trained or written."""
    base = _base(tmp_path)
    knowledge, general, _ = write_data(tmp_path)
    out = tmp_path / "peft_out"
    out.mkdir()
    (out / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    lm, tok, _ = load_lm(base)
    for run in (lambda: run_stage1(lm, tok, knowledge, out, general=general, domain="colors", training_args=QUIET),
                lambda: run_mode_stage1(lm, tok, knowledge, out, domain="colors", training_args=QUIET)):
        with pytest.raises(ValueError, match=r"^run_(mode_)?stage1: .*belongs to a PEFT adapter"):
            run()
        assert not mf.is_patched(lm) and sorted(p.name for p in out.iterdir()) == [CONFIG_NAME]
