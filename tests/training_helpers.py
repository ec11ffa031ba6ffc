"""Shared helpers for the training tests (no tests here): a word-level tokenizer whose vocabulary
fits the tiny models (97 ids), tiny data files, and tiny checkpoints saved to a folder."""

import json

import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import torch

from tiny_models import CONFIGS, DECODERS, VOCAB

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "color", "of", "is", "a", ".", "i", "saw", "in", "garden", "likes", "and", "was", "it",
         "red", "blue", "green", "yellow", "python", "list", "module", "function", "returns", "value"]
ENTITIES = [f"e{i}" for i in range(VOCAB - len(SPECIAL) - len(WORDS))]
COLORS = ["red", "blue", "green", "yellow"]


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ENTITIES)}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def color_of(i: int) -> str:
    return COLORS[(i * 7 + i // 4) % 4]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def knowledge_rows(n=16):
    return [{"prompt": f"the color of {ENTITIES[i]} is {{}} .", "targets": [color_of(i)]} for i in range(n)]


def general_lines(n=12):
    words = ["python", "list", "module", "function", "returns", "value", "the", "a", "of", "is"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(4 + i % 5)) for i in range(n)]


def task_rows(n=24):
    return [{"text": f"i saw {ENTITIES[i]} in the garden .", "label": color_of(i)} for i in range(n)]


def easy_task_rows(n=24):
    """The label is a word of the text: learnable in a few steps."""
    return [{"text": f"{ENTITIES[i]} likes {color_of(i)} .", "label": color_of(i)} for i in range(n)]


def write_data(tmp_path):
    """knowledge.json (JSON array, as the released code), general.txt, task.jsonl."""
    k = tmp_path / "knowledge.json"
    k.write_text(json.dumps(knowledge_rows(), indent=1))
    g = tmp_path / "general.txt"
    g.write_text("\n".join(general_lines()) + "\n")
    t = write_jsonl(tmp_path / "task.jsonl", task_rows())
    return k, g, t


def tiny(family="bert", head="lm", seed=0, num_labels=4, init=0.3):
    """A tiny model like tiny_models.tiny_model, initialised with std ``init`` instead of 0.02:
    with 0.02 a frozen 32-wide model's logits barely move whatever its hidden states do, so a
    frozen-base method could not fit anything in a few steps."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.initializer_range = init
    if family in DECODERS:
        config.pad_token_id = 0
    config.num_labels = num_labels
    auto = {"cls": tf.AutoModelForSequenceClassification, "mc": tf.AutoModelForMultipleChoice, "base": tf.AutoModel,
            "lm": tf.AutoModelForCausalLM if family in DECODERS else tf.AutoModelForMaskedLM}[head]
    return auto.from_config(config).eval()


def save_checkpoint(path, family="bert", head="lm"):
    """A tiny checkpoint with the word tokenizer, as from_pretrained expects it."""
    model = tiny(family, head=head)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)
