"""The quality benchmark (``mixda-fast quality``): its data need the knowledge base, and its
``--quick`` mode runs end to end on a tiny checkpoint (MiniLM's tokenizer, random weights) and
writes its table, results and plots."""

import json

import pytest
import torch
import transformers as tf

from mixda_fast.benchmarks.quality import ABLATIONS, METHODS, QualitySettings, aggregate, run_quality
from mixda_fast.benchmarks.quality_data import DOMAINS, build_quality_data
from mixda_fast.benchmarks.quality_methods import mean_gate_weights
from mixda_fast.cli import main
from mixda_fast.training.data import load_knowledge, load_task

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_quality_data_hold_out_a_phrasing_and_people(tmp_path):
    d = build_quality_data(tmp_path, classes=5, train_per_class=2, test_per_class=1, people_jobs=6,
                           general_train=20, general_eval=5)
    places = DOMAINS["places"]
    trained = load_knowledge(d.knowledge["places"])
    held = load_knowledge(d.held_out["places"])
    assert d.facts["places"] == len(trained) == 15 * (len(places.facts) - 1) and len(held) == 15
    held_template = places.facts[-1].split("{name}")[1].split("{{}}")[0].strip()
    assert all(held_template in t for t in held["text"]) and not any(held_template in t for t in trained["text"])
    train, labels = load_task(d.task_train)
    test, _ = load_task(d.task_test, labels=labels)
    assert sorted(labels) == sorted(d.labels) and len(train) == 5 * 2 * 3 and len(test) == 5 * 3
    name = lambda text: text.split()[0]  # noqa: E731
    assert not {name(t) for t in train["text"]} & {name(t) for t in test["text"]}      # held-out people
    assert not any(v in t.split() for t in test["text"] for v in places.values)        # only the facts tell
    jobs = load_knowledge(d.knowledge["jobs"])
    jobs_words = {w for t in jobs["text"] for w in t.split()}
    assert not jobs_words & ({name(t) for t in train["text"]} | {name(t) for t in test["text"]})


def test_aggregate_is_mean_and_spread_over_seeds():
    rows = [{"stage1": {"em": 1.0}, "stage2": {"acc": 0.5}}, {"stage1": {"em": 0.0}, "stage2": {"acc": 0.7}}]
    out = aggregate(rows)
    assert out["stage1"]["em"] == {"mean": 0.5, "std": pytest.approx(0.5 ** 0.5), "n": 2}       # sample std
    assert out["stage2"]["acc"]["mean"] == pytest.approx(0.6) and out["stage2"]["acc"]["std"] == pytest.approx(0.02 ** 0.5)
    assert aggregate([{"stage1": {"em": 0.3}, "stage2": None}])["stage1"]["em"]["std"] == 0.0
    assert aggregate([{"stage1": None, "stage2": {"acc": 1.0}}])["stage1"] is None


def test_mean_gate_weights_average_every_layer_and_call():
    import mixda_fast as mf

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2)).eval()
    mf.patch_model(model, mf.MixDAConfig(domains=["a", "b"], gate_hidden=8))
    ids = torch.randint(5, 50, (3, 7))
    with torch.no_grad():
        mean = mean_gate_weights(model, lambda: (model(input_ids=ids), model(input_ids=ids[:1])))
        with mf.gate_weights(model) as calls:
            model(input_ids=ids), model(input_ids=ids[:1])
    assert len(mean) == 3 and sum(mean) == pytest.approx(1.0)            # K + 1 entries (paper mixing)
    rows = torch.cat([w for call in calls for w in call.values()])        # 2 calls x 2 layers: 8 rows
    assert rows.shape == (8, 3)
    torch.testing.assert_close(torch.tensor(mean), rows.mean(0))
    with torch.no_grad():                                                 # forced: the forced weights
        assert mean_gate_weights(model, lambda: model(input_ids=ids, mixda_domains="b")) == [0.0, 1.0, 0.0]


def test_quick_mode_runs_end_to_end_and_writes_table_and_plots(tmp_path, tiny_checkpoint, capsys):
    assert main(["quality", "--quick", "--model", tiny_checkpoint, "--out", str(tmp_path / "q"), "--domains",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1, 2]
    for name in METHODS:
        assert name in out and len(results["per_seed"][name]) == 3
        s2 = results["summary"][name]["stage2"]
        assert 0 <= s2["accuracy"]["mean"] <= 1 and s2["accuracy"]["n"] == 3
    assert results["summary"]["task adapter only"]["stage1"] is None
    lora = results["per_seed"]["LoRA"][0]
    assert lora["rank"][0] >= 1 and results["summary"]["full fine-tuning"]["stage1"]["trainable"]["mean"] > \
        results["summary"]["MixDA"]["stage1"]["trainable"]["mean"]
    assert len(results["domains"]) == 3 and set(results["domains"][0]["composed"]) == {"places", "jobs"}
    for w in results["domains"][0]["gate_weights"].values():
        assert sum(w) == pytest.approx(1.0, abs=1e-5)
    table = (tmp_path / "q" / "table.txt").read_text()
    assert "fact EM (held-out phrasing)" in table and "composed / alone" in table
    for png in ("quality.png", "loss_curves.png", "gate_weights.png"):
        assert (tmp_path / "q" / png).read_bytes()[:4] == b"\x89PNG"


def test_ablations_change_one_thing_each_and_run(tmp_path, tiny_checkpoint):
    s = QualitySettings.quick(seeds=(0,), methods=("MixDA",), ablations=True, stage1_steps=2, stage2_epochs=1,
                              head_steps=2)
    results = run_quality(tmp_path, s, tiny_checkpoint, echo=lambda *a: None)
    names = [n for n in results["summary"] if n.startswith("ablation: ")]
    assert len(names) == len(ABLATIONS) - 1
    for n in names:
        assert results["summary"][n]["stage2"]["accuracy"]["n"] == 1
    table = (tmp_path / "table.txt").read_text()
    ablations = table.split("Ablations (each changes one thing of the recipe):")[1]
    rows = [line for line in ablations.split("\n\n")[1].splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["recipe (residual mixing, every layer)"] + \
        [n for n in ABLATIONS if n != "recipe"]
    assert not any(line.startswith("| ablation: ") for line in table.splitlines())   # not in the main table
    for name, m in ABLATIONS.items():                  # one change of the recipe (or of paper mixing)
        changes = {**m.config, **m.stage1, **m.settings}
        paper = changes.pop("mixing", None) == "paper"
        for one in (("gate_hidden", "gate_layers"), ("lr_stage2_adapters", "stage2_epochs")):   # one thing each
            if one[0] in changes:
                changes.pop(one[1])
        assert len(changes) == (0 if name == "recipe" or (paper and not name.startswith("paper mixing,")) else 1), name


def test_a_seed_starts_every_run_from_the_same_place(tmp_path, tiny_checkpoint):
    """The fresh head's weights and its fitting come from the seed, not from what ran before."""
    from mixda_fast.benchmarks.quality_methods import seed_setup

    s = QualitySettings.quick(head_steps=3)
    a = seed_setup(1, s, tiny_checkpoint, tmp_path / "a")
    torch.rand(7)                                                  # the global RNG moves on
    b = seed_setup(1, s, tiny_checkpoint, tmp_path / "b")
    assert a.base == b.base
    for (n, p), (_, q) in zip(a.mlm.named_parameters(), b.mlm.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(a.cls.named_parameters(), b.cls.named_parameters()):
        assert torch.equal(p, q), n


def test_unknown_contender_is_refused_before_any_work(tmp_path, capsys):
    assert main(["quality", "--methods", "MixDA", "LoRA++", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--methods 'LoRA++' is not accepted" in err and "'task adapter only'" in err
    assert not (tmp_path / "q").exists()


def test_contenders_do_not_depend_on_what_ran_before(tmp_path, tiny_checkpoint):
    """New modules (the task adapter, LoRA) are seeded per contender: the same numbers whether or
    not something used the global RNG first."""
    from mixda_fast.benchmarks.quality_methods import run_method, seed_setup

    s = QualitySettings.quick(head_steps=2, stage2_epochs=1)
    sd = seed_setup(0, s, tiny_checkpoint, tmp_path)
    a = run_method("a", METHODS["task adapter only"], sd, s)["stage2"]
    torch.rand(11)
    b = run_method("b", METHODS["task adapter only"], sd, s)["stage2"]
    assert [a[k] for k in ("accuracy", "macro_f1", "train_accuracy")] == \
        [b[k] for k in ("accuracy", "macro_f1", "train_accuracy")]
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]


@pytest.mark.parametrize("args, message", [
    (["--methods", "LoRA"], "LoRA takes its rank from MixDA's trainable parameters; add 'MixDA'"),
    (["--seeds", "0", "0"], "--seeds 0 0 is not accepted: expected distinct seeds"),
    (["--model", "/no/such/folder"], "--model '/no/such/folder' is not accepted: expected a local checkpoint"),
])
def test_bad_quality_arguments_are_refused_before_any_work(tmp_path, capsys, args, message):
    assert main(["quality", *args, "--out", str(tmp_path / "q")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quality_settings_are_checked():
    with pytest.raises(ValueError, match="QualitySettings.classes"):
        QualitySettings(classes=21)
    with pytest.raises(ValueError, match="distinct seeds"):
        QualitySettings(seeds=(1, 1))
    with pytest.raises(ValueError, match="QualitySettings.methods"):
        QualitySettings(methods=("MixDA", "LoRA++"))
    assert QualitySettings(methods=("LoRA", "MixDA")).methods == ("MixDA", "LoRA")     # MixDA sets LoRA's rank


def test_domain_ratio_is_not_measured_when_a_domain_learned_nothing_alone():
    from mixda_fast.benchmarks.quality import check_targets

    run = {"alone": {"places": 0.0, "jobs": 1.0}, "composed": {"places": 0.5, "jobs": 0.96},
           "ratio": {"places": None, "jobs": 0.96}}
    targets = {t: ok for t, _, ok in check_targets({"summary": {}, "domains": [run]})}
    assert targets["several domains: fact EM on 'places' composed >= 0.95 x alone"] is None
    assert targets["several domains: fact EM on 'jobs' composed >= 0.95 x alone"] is True


def test_general_sentences_are_distinct():
    from mixda_fast.training.corpora import general_sentences

    s = general_sentences(700)
    assert len(s) == 700 and len(set(s)) == 700
