"""Fixtures of the application tests: a tiny checkpoint with MiniLM's real tokenizer."""

import pytest
import torch
import transformers as tf

from mixda_fast.training.runs import minilm_path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Six layers (the ablations and the README's recipe name layers up to 5), 32 wide, MiniLM's
    vocabulary, random weights with a masked-LM head."""
    path = tmp_path_factory.mktemp("tiny")
    tok = tf.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    tf.BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
