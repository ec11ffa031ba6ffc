"""Training data for the two MixDA stages (docs/design.md section 2), from local files via ``datasets``.

File formats (``.json``: a JSON array of objects or JSON lines; ``.jsonl``: JSON lines; ``.txt``:
one example per non-empty line):

- knowledge (stage 1): ``{"prompt": "... {} ...", "targets": ["...", ...]}`` (one ``{}`` per
  target, the released code's format: the target spans are masked whole) or ``{"text": "..."}``
  (plain domain text: 15% random masking; causal-LM loss on every token for decoders);
- general text (stage 1, the old-knowledge loss): ``{"text": "..."}`` or ``.txt``;
- classification (stage 2): ``{"text": "...", "label": int | str}`` (optional ``"text_pair"``);
- multiple choice (stage 2): ``{"text": "...", "choices": ["...", ...], "label": int | str}``
  (``label`` the index of the right choice, or its text).

Every record is validated while the file is read: a malformed line raises :class:`DataFileError`
naming the file and the 1-based line; a missing or mistyped field names the field.
"""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..core.extras import require
from ..core.validate import MAX_CLASSES, check_labels

__all__ = ["DataFileError", "read_records", "load_knowledge", "load_texts", "load_task",
           "kshot_sample", "split_prompt", "encode_knowledge", "encode_texts", "encode_task",
           "KnowledgeCollator", "Stage1Collator", "TaskCollator", "TASKS"]

logger = logging.getLogger(__name__)

TASKS = ("classification", "multiple_choice")
PathLike = Union[str, os.PathLike]


class DataFileError(ValueError):
    """A data file is malformed: the message names the file, the 1-based line and the field."""

    def __init__(self, path: PathLike, line: Optional[int], message: str):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


# -- reading -------------------------------------------------------------------------------

def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    out = []
    i = text.index("[") + 1
    n = len(text)

    def skip_ws(j):
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_ws(i)
    if i < n and text[i] == "]":
        return out
    while True:
        i = skip_ws(i)
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataFileError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
        out.append((_line_of(text, i), value))
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            rest = text[i + 1:].strip()
            if rest:
                raise DataFileError(path, _line_of(text, i + 1 + text[i + 1:].index(rest[0])),
                                    "malformed JSON: extra data after the closing ']'")
            return out
        raise DataFileError(path, _line_of(text, min(i, n - 1)) if n else 1,
                            "malformed JSON: expected ',' or ']' after an array element")


def read_records(path: PathLike) -> list[tuple[int, Any]]:
    """(1-based line, record) pairs of a ``.json`` (array or JSON lines), ``.jsonl`` or ``.txt``
    file (a ``.txt`` line becomes ``{"text": line}``). Raises DataFileError on malformed lines,
    FileNotFoundError when the file is missing."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_records: path={path!r} is not accepted: expected a str or os.PathLike file path")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".txt", ".text"):
        raise DataFileError(path, None, f"unsupported file type {suffix!r}: expected .json, .jsonl or .txt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(path, _line_of(e.object.decode("utf-8", "replace"), e.start),
                            f"not valid UTF-8 ({e.reason})") from None
    if suffix in (".txt", ".text"):
        return [(i, {"text": line.strip()}) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataFileError(path, i, f"malformed JSON line: {e.msg} (column {e.colno})") from None
    return out


def _need(path, line, rec, field, types, what) -> Any:
    if not isinstance(rec, dict):
        raise DataFileError(path, line, f"expected a JSON object with field {field!r}, got {type(rec).__name__}")
    if field not in rec:
        raise DataFileError(path, line, f"missing field {field!r} ({what})")
    value = rec[field]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataFileError(path, line, f"field {field!r} = {value!r} is not accepted: expected {what}")
    return value


def _nonempty_str(path, line, rec, field, what="a non-empty string") -> str:
    value = _need(path, line, rec, field, str, what)
    if not value.strip():
        raise DataFileError(path, line, f"field {field!r} is empty: expected {what}")
    return value


def _dataset(rows: list[dict]):
    datasets = require("datasets", "train", "reading data files")

    if not rows:
        raise ValueError("no records")
    return datasets.Dataset.from_list(rows)


def _no_records(path) -> DataFileError:
    return DataFileError(path, None, "holds no records")


# -- knowledge (stage 1) --------------------------------------------------------------------

def split_prompt(prompt: str, targets: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt with its ``{}`` placeholders filled by ``targets``, and each target's
    (start, end) character span. Only ``{}`` is special (no str.format escapes)."""
    parts = prompt.split("{}")
    if len(parts) - 1 != len(targets):
        raise ValueError(f"prompt {prompt!r} has {len(parts) - 1} '{{}}' placeholders but "
                         f"{len(targets)} targets were given")
    text, spans = parts[0], []
    for target, part in zip(targets, parts[1:]):
        spans.append((len(text), len(text) + len(target)))
        text += target + part
    return text, spans


def load_knowledge(path: PathLike):
    """Stage-1 knowledge file -> Dataset(line, text, spans): facts (prompt/targets; ``spans`` are
    the target character spans of the filled-in text) and plain text (``spans`` empty)."""
    rows = []
    for line, rec in read_records(path):
        if isinstance(rec, dict) and ("prompt" in rec or "targets" in rec):
            prompt = _nonempty_str(path, line, rec, "prompt", "a string with one '{}' per target")
            targets = _need(path, line, rec, "targets", list, "a list of target strings, one per '{}' in the prompt")
            for t in targets:
                if not isinstance(t, str) or not t.strip():
                    raise DataFileError(path, line, f"field 'targets' = {targets!r} is not accepted: "
                                                    "expected non-empty strings")
            try:
                text, spans = split_prompt(prompt, targets)
            except ValueError as e:
                raise DataFileError(path, line, f"fields 'prompt'/'targets': {e}") from None
            rows.append({"line": line, "text": text, "spans": [list(s) for s in spans]})
        elif isinstance(rec, dict) and "text" in rec:
            rows.append({"line": line, "text": _nonempty_str(path, line, rec, "text"), "spans": []})
        else:
            _need(path, line, rec, "prompt", str, "a knowledge record needs 'prompt' and 'targets', or 'text'")
    if not rows:
        raise _no_records(path)
    return _dataset(rows)


def load_texts(path: PathLike):
    """General (or plain domain) text -> Dataset(line, text)."""
    rows = [{"line": line, "text": _nonempty_str(path, line, rec, "text")} for line, rec in read_records(path)]
    if not rows:
        raise _no_records(path)
    return _dataset(rows)


# -- tasks (stage 2) ------------------------------------------------------------------------

def load_task(path: PathLike, task: str = "classification", labels: Optional[Sequence] = None):
    """Stage-2 file -> (Dataset(line, text[, text_pair | choices], label: int), label names).

    Classification labels may be ints or strings; string labels are mapped through ``labels``
    (default: the sorted distinct labels of this file). Multiple choice: ``label`` is the right
    choice's index or text; every record needs the same number of choices."""
    if task not in TASKS:
        raise ValueError(f"load_task: task={task!r} is not accepted: expected one of {' | '.join(map(repr, TASKS))}")
    records = read_records(path)
    if not records:
        raise _no_records(path)
    rows = []
    if task == "classification":
        raw = []
        for line, rec in records:
            text = _nonempty_str(path, line, rec, "text")
            label = _need(path, line, rec, "label", (int, str), "an int class id or a string class name")
            pair = rec.get("text_pair")
            if pair is not None and not isinstance(pair, str):
                raise DataFileError(path, line, f"field 'text_pair' = {pair!r} is not accepted: expected a string")
            raw.append((line, text, pair, label))
        kinds = {type(r[3]) for r in raw}
        if len(kinds) > 1:
            line = next(r[0] for r in raw if type(r[3]) is not type(raw[0][3]))
            raise DataFileError(path, line, "field 'label' mixes ints and strings across records")
        if labels is None:
            labels = sorted({r[3] for r in raw})
            if kinds == {int}:
                if min(labels) < 0:
                    raise DataFileError(path, next(r[0] for r in raw if r[3] < 0), "field 'label' is negative")
                if max(labels) >= MAX_CLASSES:
                    raise DataFileError(path, next(r[0] for r in raw if r[3] >= MAX_CLASSES),
                                        f"field 'label' = {max(labels)} is not accepted: expected a class id 0 .. "
                                        f"{MAX_CLASSES - 1} (mixda_fast.core.validate.MAX_CLASSES)")
                labels = list(range(max(labels) + 1))
        labels = check_labels(f"load_task: {path}: labels", labels)     # also: at most MAX_CLASSES
        index = {lab: i for i, lab in enumerate(labels)}
        for line, text, pair, label in raw:
            if label not in index:
                raise DataFileError(path, line, f"field 'label' = {label!r} is not one of the labels {labels}")
            row = {"line": line, "text": text, "label": index[label]}
            if any(r[2] is not None for r in raw):
                row["text_pair"] = pair or ""
            rows.append(row)
        return _dataset(rows), [str(x) for x in labels]
    n_choices = None
    for line, rec in records:
        text = _need(path, line, rec, "text", str, "a string (question or context)")
        choices = _need(path, line, rec, "choices", list, "a list of at least two choice strings")
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataFileError(path, line, f"field 'choices' = {choices!r} is not accepted: expected at least "
                                            "two non-empty strings")
        if n_choices is None:
            n_choices = len(choices)
        elif len(choices) != n_choices:
            raise DataFileError(path, line, f"field 'choices' has {len(choices)} choices; the first record has "
                                            f"{n_choices} (every record needs the same number)")
        label = _need(path, line, rec, "label", (int, str), "the right choice's index or text")
        if isinstance(label, str):
            if label not in choices:
                raise DataFileError(path, line, f"field 'label' = {label!r} is not one of the choices")
            label = choices.index(label)
        if not 0 <= label < len(choices):
            raise DataFileError(path, line, f"field 'label' = {label} is not a choice index 0..{len(choices) - 1}")
        rows.append({"line": line, "text": text, "choices": list(choices), "label": label})
    return _dataset(rows), [str(i) for i in range(n_choices)]


def kshot_sample(dataset, k: int, seed: int = 0, label_column: str = "label"):
    """At most ``k`` examples of each label, drawn with ``random.Random(seed)``: the same seed
    gives the same subset. Labels with fewer than ``k`` examples keep all of them (logged)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kshot_sample: k={k!r} is not accepted: expected an int >= 1")
    if label_column not in dataset.column_names:
        raise ValueError(f"kshot_sample: label_column={label_column!r} is not a column; columns: "
                         f"{dataset.column_names}")
    by_label: dict[Any, list[int]] = {}
    for i, lab in enumerate(dataset[label_column]):
        by_label.setdefault(lab, []).append(i)
    rng = random.Random(seed)
    chosen = []
    for lab in sorted(by_label):
        idx = by_label[lab]
        if len(idx) < k:
            logger.warning("kshot_sample: label %r has only %d examples (k=%d); keeping all", lab, len(idx), k)
        chosen += rng.sample(idx, min(k, len(idx)))
    return dataset.select(sorted(chosen))


# -- tokenization ---------------------------------------------------------------------------

def _fingerprint() -> str:
    return uuid.uuid4().hex     # in-memory datasets; avoids hashing the tokenizer


def _require_fast(tokenizer, fn):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{fn}: tokenizer={type(tokenizer).__name__} is not accepted: expected a fast "
                        "(Rust) tokenizer, which gives the character offsets that target spans need")


def encode_knowledge(dataset, tokenizer, *, causal: bool, max_length: int = 128, source: str = "knowledge"):
    """Tokenize a :func:`load_knowledge` dataset.

    Facts: masked LM -> each target span's tokens become the mask token, ``labels`` hold the
    original ids there and -100 elsewhere (a static, whole-span mask); causal LM -> the text is
    left as is and ``labels`` are the target tokens. Plain text: ``labels`` empty and
    ``random_mask`` True (masked in the collator; causal: every token is a label)."""
    _require_fast(tokenizer, "encode_knowledge")
    mask_id = tokenizer.mask_token_id
    if not causal and mask_id is None:
        raise ValueError("encode_knowledge: the tokenizer has no mask token, which masked-LM training "
                         "needs; pass causal=True for decoder models")

    def encode(ex):
        enc = tokenizer(ex["text"], truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = ex["spans"]
        if not spans:
            return {"input_ids": ids, "labels": [], "random_mask": True}
        labels = [-100] * len(ids)
        for s, e in spans:
            hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < e and b > s]
            if not hit:
                raise DataFileError(source, ex["line"], f"target {ex['text'][s:e]!r} lies beyond "
                                                        f"max_length={max_length} tokens")
            for i in hit:
                labels[i] = ids[i]
                if not causal:
                    ids[i] = mask_id
        return {"input_ids": ids, "labels": labels, "random_mask": False}

    return dataset.map(encode, remove_columns=["text", "spans"], new_fingerprint=_fingerprint())


def encode_texts(dataset, tokenizer, *, max_length: int = 128):
    """Tokenize a :func:`load_texts` dataset (``input_ids`` only)."""
    return dataset.map(lambda ex: {"input_ids": tokenizer(ex["text"], truncation=True, max_length=max_length)["input_ids"]},
                       remove_columns=["text"], new_fingerprint=_fingerprint())


def encode_task(dataset, tokenizer, *, task: str, max_length: int = 128):
    """Tokenize a :func:`load_task` dataset: ``input_ids`` (a list per choice for multiple choice)."""
    if task == "classification":
        def encode(ex):
            pair = ex.get("text_pair") or None
            return {"input_ids": tokenizer(ex["text"], pair, truncation=True, max_length=max_length)["input_ids"]}
        drop = [c for c in ("text", "text_pair") if c in dataset.column_names]
    elif task == "multiple_choice":
        def encode(ex):
            enc = tokenizer([ex["text"]] * len(ex["choices"]), ex["choices"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"]}
        drop = ["text", "choices"]
    else:
        raise ValueError(f"encode_task: task={task!r} is not accepted: expected one of {' | '.join(map(repr, TASKS))}")
    return dataset.map(encode, remove_columns=drop, new_fingerprint=_fingerprint())


# -- collators ------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return v
    return 0


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _ids_and_mask(seqs, pad_id):
    ids = _pad(seqs, pad_id)
    mask = _pad([[1] * len(s) for s in seqs], 0)
    return ids, mask


def batch_generator(examples: list[dict], seed: int, salt: int = 0) -> torch.Generator:
    """A generator seeded from the batch's content (its examples' token ids, in order) and
    ``seed``. Random masking and general-text draws come from it, not from torch's global RNG:
    Trainer restores the global RNG only after it has fetched (collated) the first batch of a
    resumed run, so global draws would make a resumed run differ from an uninterrupted one. The
    sampler's order is reproducible, hence so is every batch; a new epoch reshuffles the
    batches, so the masks change from epoch to epoch (dynamic masking)."""
    h = zlib.crc32(f"{seed}:{salt}".encode())
    for ex in examples:
        h = zlib.crc32(array("q", ex["input_ids"]).tobytes(), h)
    return torch.Generator().manual_seed(h)


@dataclass
class KnowledgeCollator:
    """Pads knowledge examples (right padding); masks plain-text examples at random: BERT's
    15% of non-special tokens, of which 80% -> mask token, 10% -> random token, 10% unchanged
    (random draws from :func:`batch_generator`)."""

    tokenizer: Any
    causal: bool
    mlm_probability: float = 0.15
    seed: int = 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = _pad_id(self.tokenizer)
        special = set(self.tokenizer.all_special_ids)
        gen = None
        seqs, labels = [], []
        for ex in examples:
            ids = list(ex["input_ids"])
            if not ex["random_mask"]:
                lab = list(ex["labels"])
            elif self.causal:
                lab = list(ids)
            else:
                gen = gen or batch_generator(examples, self.seed)
                ids, lab = self._mask(ids, special, gen)
            seqs.append(ids)
            labels.append(lab)
        input_ids, attention_mask = _ids_and_mask(seqs, pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad(labels, -100)}

    def _mask(self, ids: list[int], special: set, gen: torch.Generator) -> tuple[list[int], list[int]]:
        t = torch.tensor(ids, dtype=torch.long)
        candidates = torch.tensor([i not in special for i in ids])
        chosen = (torch.rand(len(ids), generator=gen) < self.mlm_probability) & candidates
        if candidates.any() and not chosen.any():        # at least one label per sequence
            pos = candidates.nonzero().flatten()
            chosen[pos[torch.randint(len(pos), (1,), generator=gen)]] = True
        labels = torch.where(chosen, t, torch.full_like(t, -100))
        r = torch.rand(len(ids), generator=gen)
        to_mask = chosen & (r < 0.8)
        to_random = chosen & (r >= 0.8) & (r < 0.9)
        t = torch.where(to_mask, torch.full_like(t, self.tokenizer.mask_token_id), t)
        t = torch.where(to_random, torch.randint(len(self.tokenizer), t.shape, generator=gen), t)
        return t.tolist(), labels.tolist()


@dataclass
class Stage1Collator:
    """A knowledge batch plus, for the old-knowledge loss, as many general-text examples drawn
    at random (:func:`batch_generator`) from ``general`` (``old_input_ids``, ``old_attention_mask``).
    ``mask_general`` (masked LMs): the general text is masked as the knowledge collator masks
    plain text, so L_old also holds the layers where the knowledge loss trains them: at the mask
    token."""

    knowledge: KnowledgeCollator
    general: Any = None           # tokenized general-text Dataset, or None (no L_old)
    general_batch_size: Optional[int] = None
    mask_general: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.knowledge(examples)
        if self.general is not None and len(self.general) > 0:
            n = self.general_batch_size or len(examples)
            gen = batch_generator(examples, self.knowledge.seed, salt=1)
            idx = torch.randint(len(self.general), (n,), generator=gen).tolist()
            seqs = [self.general[i]["input_ids"] for i in idx]
            if self.mask_general and not self.knowledge.causal:
                special = set(self.knowledge.tokenizer.all_special_ids)
                seqs = [self.knowledge._mask(list(ids), special, gen)[0] for ids in seqs]
            batch["old_input_ids"], batch["old_attention_mask"] = _ids_and_mask(seqs, _pad_id(self.knowledge.tokenizer))
        return batch


@dataclass
class TaskCollator:
    """Pads classification (B, T) or multiple-choice (B, C, T) examples; ``labels`` (B,)."""

    tokenizer: Any
    task: str = "classification"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = _pad_id(self.tokenizer)
        labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        if self.task == "classification":
            ids, mask = _ids_and_mask([ex["input_ids"] for ex in examples], pad_id)
        else:
            C = len(examples[0]["input_ids"])
            flat = [s for ex in examples for s in ex["input_ids"]]
            ids, mask = _ids_and_mask(flat, pad_id)
            ids, mask = ids.view(len(examples), C, -1), mask.view(len(examples), C, -1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
