"""Tiny HuggingFace models of every supported family, built from configs (no downloads)."""


import torch
import transformers as tf

VOCAB = 97


def _common(**kw):
    return dict(vocab_size=VOCAB, num_hidden_layers=3, num_attention_heads=2, **kw)


CONFIGS = {
    "bert": lambda: tf.BertConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=64, **_common()),
    "roberta": lambda: tf.RobertaConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=70,
                                        pad_token_id=1, **_common()),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_positions=64, n_layer=3, n_head=2, vocab_size=VOCAB),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=80, num_key_value_heads=1,
                                    max_position_embeddings=64, **_common()),
    "mistral": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=80, num_key_value_heads=1,
                                        max_position_embeddings=64, **_common()),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=80, num_key_value_heads=1,
                                    max_position_embeddings=64, **_common()),
    "qwen3": lambda: tf.Qwen3Config(hidden_size=32, intermediate_size=80, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, **_common()),
    "gemma": lambda: tf.GemmaConfig(hidden_size=32, intermediate_size=80, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, **_common()),
    "gemma2": lambda: tf.Gemma2Config(hidden_size=32, intermediate_size=80, num_key_value_heads=1, head_dim=16,
                                      query_pre_attn_scalar=16, sliding_window=4, max_position_embeddings=64,
                                      **_common()),
    "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=32, intermediate_size=80, num_key_value_heads=1, head_dim=16,
                                          query_pre_attn_scalar=16, sliding_window=4, max_position_embeddings=64,
                                          **_common()),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=3, n_heads=2,
                                              max_position_embeddings=64),
}
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
FAMILIES = ENCODERS + DECODERS


def tiny_model(family: str, head: str = "base", seed: int = 0, num_labels: int = 3):
    """head: 'base' (AutoModel), 'lm' (causal or masked LM) or 'cls' (sequence classification)."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    if family in DECODERS:
        config.pad_token_id = 0
    if head == "cls":
        config.num_labels = num_labels
        model = tf.AutoModelForSequenceClassification.from_config(config)
    elif head == "lm":
        cls = tf.AutoModelForCausalLM if family in DECODERS else tf.AutoModelForMaskedLM
        model = cls.from_config(config)
    else:
        model = tf.AutoModel.from_config(config)
    return model.eval()


def batch(family: str, B: int = 3, T: int = 9, seed: int = 1, pad: bool = True):
    """input_ids and attention_mask with ragged lengths: right padding for encoders, left for decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B):
            n = min(T - 1, 2 * b)
            if family in DECODERS:
                mask[b, :n] = 0
            else:
                mask[b, T - n:] = 0
        ids = ids.masked_fill(mask == 0, 0 if family in DECODERS else CONFIGS[family]().pad_token_id or 0)
    return {"input_ids": ids, "attention_mask": mask}


def randomize_patch(model, std: float = 0.3, seed: int = 0):
    """Add N(0, std) noise to every adapter, gate and MoDE expert parameter: a patch at init (zero
    up-projections, near-uniform gates) hides bugs that only non-zero modules show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n or ".gate." in n or "mode_blocks" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model
