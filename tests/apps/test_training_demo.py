"""The demo's generated data (valid files, a task on held-out people) and one tiny training step
on it with the MiniLM tokenizer (a tiny model with MiniLM's vocabulary: no real weights)."""

import json

import pytest
import torch
import transformers as tf

import mixda_fast as mf
from mixda_fast.demo.data import COLOURS, build_demo_data, general_sentences, make_people
from mixda_fast.demo.mixda import DemoSettings, format_table, gate_weight_means
from mixda_fast.demo.plots import plot_gate_weights
from mixda_fast.training.data import load_knowledge, load_task, load_texts
from mixda_fast.training.mixda_stage1 import run_stage1
from mixda_fast.training.runs import minilm_path
from tiny_models import randomize_patch


def test_demo_data_is_valid_and_the_task_needs_the_knowledge_base(tmp_path):
    data = build_demo_data(tmp_path, n_people=40, n_test=20, general_train=30, general_eval=10)
    facts = load_knowledge(data.knowledge)
    assert len(facts) == data.n_facts == 40 * 3
    train, labels = load_task(data.task_train)
    test, _ = load_task(data.task_test, labels=labels)
    assert labels == sorted(COLOURS)
    name = lambda text: text.split()[0]  # noqa: E731
    assert not {name(t) for t in train["text"]} & {name(t) for t in test["text"]}   # held-out people
    assert {name(t) for t in test["text"]} <= set(data.people)
    # every test person's colour is stated in the knowledge base, and only there
    colour_of = {name(t): labels[y] for t, y in zip(test["text"], test["label"])}
    stated = {t.split()[4]: t.split()[6] for t in facts["text"] if t.startswith("the favourite colour of")}
    assert all(stated[p] == c for p, c in colour_of.items())
    assert not any(c in t.split() for t in test["text"] for c in COLOURS)
    assert len(load_texts(data.general_train)) == 30 and len(load_texts(data.general_eval)) == 10
    assert make_people(5, seed=1) == make_people(5, seed=1) and len(set(make_people(200))) == 200
    assert all(6 <= len(s.split()) <= 30 for s in general_sentences(50))


def test_one_stage1_step_on_demo_data_with_minilm_tokenizer(tmp_path, one_thread):
    data = build_demo_data(tmp_path / "data", n_people=8, n_test=4, general_train=16, general_eval=4)
    tok = tf.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(config).eval()
    res = run_stage1(model, tok, data.knowledge, tmp_path / "s1", general=data.general_train, domain="people",
                     config=mf.MixDAConfig(domains=["people"], layers=[1], gate_hidden=16), max_length=32,
                     training_args=dict(max_steps=1, per_device_train_batch_size=4, disable_tqdm=True,
                                        logging_steps=1))
    log = next(h for h in res.log_history if "loss_knowledge" in h)
    assert log["loss_knowledge"] > 0 and log["loss_old"] >= 0
    assert (tmp_path / "s1" / "mixda_adapter_people.safetensors").is_file()


def test_demo_table_formats_every_method():
    s1 = {"fact_exact_match": 0.5, "drift": 0.01, "step_time": 0.2, "trainable": 1e6, "history": []}
    s2 = {"accuracy": 0.6, "macro_f1": 0.55, "step_time": 0.1, "trainable": 2e5, "history": []}
    results = {"base": {"fact_exact_match": 0.0}, "chance_accuracy": 0.25,
               "methods": {"MixDA": {"stage1": s1, "stage2": s2}, "task adapter only": {"stage1": None, "stage2": s2}}}
    table = format_table(results)
    assert "MixDA" in table and "task adapter only" in table and "0.600" in table and "200" in table
    assert DemoSettings.quick().stage1_steps < DemoSettings().stage1_steps
    json.dumps(results)


def test_gate_weights_plot_is_written_per_layer_and_text_kind(tmp_path, one_thread):
    """Gate weights per layer and kind of text (sum 1), and the patch's change of each FFN output
    (above 0 with trained-like adapters, 0 exactly at init under residual mixing); the plot for two gate entries and
    for the demo's one (residual mixing, K = 1: weight 1 by construction, the change shown)."""
    tok = tf.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64)
    texts = {"facts": ["korvalen always wears red clothes .", "misuthar lives in oslo ."],
             "general text": general_sentences(3)}
    for domains, mixing in ((["people", "law"], "paper"), (["people"], "residual")):
        torch.manual_seed(0)
        model = mf.patch_model(tf.BertForMaskedLM(config).eval(),
                               mf.MixDAConfig(domains=domains, gate_hidden=16, mixing=mixing, adapter_init="normal"))
        randomize_patch(model)
        gate = gate_weight_means(model, tok, texts)
        assert gate["entries"] == domains + (["ffn"] if mixing == "paper" else [])
        assert list(gate["texts"]) == list(gate["change"]) == ["facts", "general text"]
        for kind, per_layer in gate["texts"].items():
            assert list(per_layer) == list(gate["change"][kind]) == [0, 1]
            assert all(abs(sum(w) - 1) < 1e-5 for w in per_layer.values())
            assert all(c > 0 for c in gate["change"][kind].values())
        if mixing == "residual":                          # adapters with zero up-projections: y = f exactly
            torch.manual_seed(0)
            fresh = mf.patch_model(tf.BertForMaskedLM(config).eval(),
                                   mf.MixDAConfig(domains=domains, gate_hidden=16, mixing=mixing))
            assert all(c == 0.0 for per_layer in gate_weight_means(fresh, tok, texts)["change"].values()
                       for c in per_layer.values())
            with mf.adapters_disabled(fresh), pytest.raises(ValueError, match=r"^gate_weight_means: model gave 0 "
                                                                     r"\(y, f\) pairs for 2 patched layers x 2 facts"):
                gate_weight_means(fresh, tok, texts)        # nothing to measure: said, not a silent empty plot
        png = plot_gate_weights(gate, tmp_path / f"gate_weights_{len(domains)}.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
