"""Data files for both stages: formats, whole-span masking, clear errors, the k-shot sampler."""

import json

import pytest
import torch

from mixda_fast.training.data import (DataFileError, KnowledgeCollator, Stage1Collator, TaskCollator,
                                      encode_knowledge, encode_task, encode_texts, kshot_sample, load_knowledge,
                                      load_task, load_texts, read_records, split_prompt)
from training_helpers import ENTITIES, word_tokenizer, write_jsonl


def test_split_prompt_fills_placeholders_and_reports_spans():
    text, spans = split_prompt("the {} of {} is {} .", ["color", "e1", "red"])
    assert text == "the color of e1 is red ."
    assert [text[a:b] for a, b in spans] == ["color", "e1", "red"]
    text, spans = split_prompt("braces {x} stay, {} fills", ["it"])      # no str.format escapes
    assert text == "braces {x} stay, it fills"
    with pytest.raises(ValueError, match="1 '{}' placeholders but 2 targets"):
        split_prompt("a {} b", ["x", "y"])


def test_knowledge_json_array_jsonl_and_txt(tmp_path):
    rows = [{"prompt": "the color of {} is {} .", "targets": ["e1", "red"]}, {"text": "a list is a value ."}]
    (tmp_path / "k.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "k.jsonl", rows)
    (tmp_path / "k.txt").write_text("a list is a value .\n\n the module returns it .\n")
    a, b = load_knowledge(tmp_path / "k.json"), load_knowledge(tmp_path / "k.jsonl")
    assert a["text"] == b["text"] == ["the color of e1 is red .", "a list is a value ."]
    assert a["spans"][0] == [[13, 15], [19, 22]] and a["spans"][1] == []
    assert a["line"] == [2, 9] and b["line"] == [1, 2]
    c = load_knowledge(tmp_path / "k.txt")
    assert c["text"] == ["a list is a value .", "the module returns it ."] and c["line"] == [1, 3]


def test_whole_target_spans_are_masked():
    tok = word_tokenizer()
    ds = load_knowledge_rows([{"prompt": "the color of {} is {} .", "targets": ["e1 e2", "red"]}])
    enc = encode_knowledge(ds, tok, causal=False)[0]
    words = tok.convert_ids_to_tokens(enc["input_ids"])
    assert words == ["[CLS]", "the", "color", "of", "[MASK]", "[MASK]", "is", "[MASK]", ".", "[SEP]"]
    assert tok.convert_ids_to_tokens([i for i in enc["labels"] if i != -100]) == ["e1", "e2", "red"]
    causal = encode_knowledge(ds, tok, causal=True)[0]
    assert "[MASK]" not in tok.convert_ids_to_tokens(causal["input_ids"])
    assert causal["labels"] == enc["labels"]


def load_knowledge_rows(rows, tmp=None):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "k.jsonl"
    return load_knowledge(write_jsonl(path, rows))


def test_random_masking_of_plain_text_is_bert_style():
    tok = word_tokenizer()
    ds = encode_knowledge(load_knowledge_rows([{"text": " ".join(["list"] * 400)}]), tok, causal=False, max_length=512)
    torch.manual_seed(0)
    batch = KnowledgeCollator(tok, causal=False)([ds[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    chosen = labels != -100
    assert 0.10 < chosen.float().mean() < 0.20                      # ~15% of tokens
    assert not chosen[0] and not chosen[-1]                         # never [CLS] / [SEP]
    masked = (ids == tok.mask_token_id) & chosen
    assert 0.65 < masked.sum() / chosen.sum() < 0.95                # ~80% of them -> [MASK]
    causal = KnowledgeCollator(tok, causal=True)([encode_knowledge(load_knowledge_rows([{"text": "a list"}]), tok,
                                                                   causal=True)[0]])
    assert torch.equal(causal["labels"], causal["input_ids"])      # causal: every token is a label


def test_stage1_collator_adds_general_batch():
    tok = word_tokenizer()
    k = encode_knowledge(load_knowledge_rows([{"prompt": "e1 is {} .", "targets": ["red"]}] * 3), tok, causal=False)
    g = encode_texts(load_texts_rows(["a list", "the module returns a value ."]), tok)
    batch = Stage1Collator(KnowledgeCollator(tok, False), g, general_batch_size=5)([k[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and batch["old_input_ids"].shape[0] == 5
    assert batch["old_attention_mask"].sum(1).min() >= 4            # [CLS] a list [SEP]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "old_input_ids", "old_attention_mask"}


def load_texts_rows(lines):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "g.txt"
    path.write_text("\n".join(lines))
    return load_texts(path)


def test_task_files_and_collator(tmp_path):
    tok = word_tokenizer()
    rows = [{"text": f"i saw {e} .", "label": lab} for e, lab in zip(ENTITIES[:6], ["red", "blue"] * 3)]
    ds, labels = load_task(write_jsonl(tmp_path / "t.jsonl", rows))
    assert labels == ["blue", "red"] and ds["label"] == [1, 0, 1, 0, 1, 0]
    batch = TaskCollator(tok)([encode_task(ds, tok, task="classification")[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 6) and batch["labels"].tolist() == [1, 0, 1]
    mc = [{"text": f"{e} is", "choices": ["red", "blue", "green"], "label": "blue"} for e in ENTITIES[:4]]
    ds, labels = load_task(write_jsonl(tmp_path / "mc.jsonl", mc), "multiple_choice")
    assert labels == ["0", "1", "2"] and ds["label"] == [1] * 4
    enc = encode_task(ds, tok, task="multiple_choice")
    batch = TaskCollator(tok, "multiple_choice")([enc[i] for i in range(4)])
    assert batch["input_ids"].shape[:2] == (4, 3) and batch["attention_mask"].shape == batch["input_ids"].shape
    ints, labels = load_task(write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}]))
    assert labels == ["0", "1", "2"] and ints["label"] == [2, 0]


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a {} .", "targets": ["x"]}\n{"prompt": "b {} .", "targets": ["y"}\n', r"k\.jsonl:2: malformed JSON"),
    ('{"prompt": "a {} .", "targets": ["x"]}\n\n{"prompt": "b {} ."}\n', r"k\.jsonl:3: missing field 'targets'"),
    ('{"targets": ["x"]}\n', r"k\.jsonl:1: missing field 'prompt'"),
    ('{"prompt": "a {} {} .", "targets": ["x"]}\n', r"k\.jsonl:1: .*2 '\{\}' placeholders but 1 targets"),
    ('{"prompt": "a {} .", "targets": "x"}\n', r"k\.jsonl:1: field 'targets' = 'x' is not accepted"),
    ('{"prompt": "a {} .", "targets": [""]}\n', r"k\.jsonl:1: field 'targets'"),
    ('{"body": "no text"}\n', r"k\.jsonl:1: missing field 'prompt' .*or 'text'"),
    ('[1, 2]\n', r"k\.jsonl:1: expected a JSON object"),
])
def test_bad_knowledge_lines_name_file_line_and_field(tmp_path, content, match):
    path = tmp_path / "k.jsonl"
    path.write_text(content)
    with pytest.raises(DataFileError, match=match):
        load_knowledge(path)


def test_bad_json_array_names_the_line(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('[\n {"prompt": "a {} .", "targets": ["x"]},\n {"prompt": "b {} .", "targets": ["y"]\n]\n')
    with pytest.raises(DataFileError, match=r"k\.json:4: malformed JSON"):
        load_knowledge(path)
    path.write_text('[\n {"prompt": "a {} .", "targets": ["x"]},\n\n {"prompt": "b {} ."}\n]\n')
    with pytest.raises(DataFileError, match=r"k\.json:4: missing field 'targets'"):
        load_knowledge(path)


@pytest.mark.parametrize("rows, task, match", [
    ([{"text": "a", "label": "x"}, {"label": "y"}], "classification", r"t\.jsonl:2: missing field 'text'"),
    ([{"text": "a"}], "classification", r"t\.jsonl:1: missing field 'label'"),
    ([{"text": "a", "label": 1.5}], "classification", r"t\.jsonl:1: field 'label' = 1.5"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], "classification", r"t\.jsonl:2: .*mixes ints and strings"),
    ([{"text": "a", "choices": ["x"], "label": 0}], "multiple_choice", r"t\.jsonl:1: field 'choices'"),
    ([{"text": "a", "choices": ["x", "y"], "label": 0}, {"text": "b", "choices": ["x", "y", "z"], "label": 0}],
     "multiple_choice", r"t\.jsonl:2: field 'choices' has 3 choices"),
    ([{"text": "a", "choices": ["x", "y"], "label": 2}], "multiple_choice", r"t\.jsonl:1: field 'label' = 2"),
    ([{"text": "a", "choices": ["x", "y"], "label": "z"}], "multiple_choice", r"t\.jsonl:1: field 'label' = 'z'"),
])
def test_bad_task_lines(tmp_path, rows, task, match):
    with pytest.raises(DataFileError, match=match):
        load_task(write_jsonl(tmp_path / "t.jsonl", rows), task)


def test_unknown_eval_label_and_other_file_errors(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "green"}])
    with pytest.raises(DataFileError, match=r"t\.jsonl:1: field 'label' = 'green' is not one of the labels"):
        load_task(path, labels=["red", "blue"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataFileError, match=r"x\.csv: unsupported file type '\.csv'"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataFileError, match="holds no records"):
        load_texts(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="task='regression'"):
        load_task(path, "regression")
    (tmp_path / "b.txt").write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(DataFileError, match=r"b\.txt:2: not valid UTF-8"):
        load_texts(tmp_path / "b.txt")


def test_target_beyond_max_length_is_reported():
    ds = load_knowledge_rows([{"prompt": "a a a a a a {} .", "targets": ["red"]}])
    with pytest.raises(DataFileError, match=r":1: target 'red' lies beyond max_length=5"):
        encode_knowledge(ds, word_tokenizer(), causal=False, max_length=5, source="k.jsonl")


def test_kshot_sampler_is_deterministic_per_seed(tmp_path):
    rows = [{"text": f"x{i}", "label": ["a", "b", "c"][i % 3]} for i in range(60)]
    ds, _ = load_task(write_jsonl(tmp_path / "t.jsonl", rows))
    one, two, other = kshot_sample(ds, 4, seed=1), kshot_sample(ds, 4, seed=1), kshot_sample(ds, 4, seed=2)
    assert one["text"] == two["text"]
    assert one["text"] != other["text"]
    assert sorted(one["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    small = kshot_sample(ds.select(range(4)), 3, seed=0)           # fewer than k: keep all of that class
    assert sorted(small["label"]) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="k=0"):
        kshot_sample(ds, 0)


def test_stage1_collator_masks_general_text_only_when_asked():
    """mask_general: the general batch is masked as plain knowledge text is (same draws for the
    same batch); without it, or for a causal LM, the general text is passed as it is."""
    tok = word_tokenizer()
    k = encode_knowledge(load_knowledge_rows([{"prompt": "e1 is {} .", "targets": ["red"]}] * 4), tok, causal=False)
    lines = ["the module returns a value of the list ."] * 40
    g = encode_texts(load_texts_rows(lines), tok)
    examples = [k[i] for i in range(4)]
    plain = Stage1Collator(KnowledgeCollator(tok, False), g, general_batch_size=40)(examples)
    masked = Stage1Collator(KnowledgeCollator(tok, False), g, general_batch_size=40, mask_general=True)(examples)
    again = Stage1Collator(KnowledgeCollator(tok, False), g, general_batch_size=40, mask_general=True)(examples)
    assert torch.equal(masked["old_input_ids"], again["old_input_ids"])
    assert torch.equal(masked["old_attention_mask"], plain["old_attention_mask"])
    original = torch.tensor([g[0]["input_ids"]] * 40)
    assert torch.equal(plain["old_input_ids"], original)
    changed = masked["old_input_ids"] != original
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    assert not changed[special].any()                                         # [CLS], [SEP] stay
    assert (masked["old_input_ids"] == tok.mask_token_id).sum() > 0
    assert 0.05 < changed[~special].float().mean() < 0.25                     # ~15% * 90% change
    assert torch.equal(masked["input_ids"], plain["input_ids"])              # the knowledge batch is untouched
    causal = Stage1Collator(KnowledgeCollator(tok, True), g, general_batch_size=40, mask_general=True)(
        [encode_knowledge(load_knowledge_rows([{"prompt": "e1 is {} .", "targets": ["red"]}]), tok, causal=True)[0]])
    assert torch.equal(causal["old_input_ids"], original)
