"""Tiny quantized models for the tests: bitsandbytes 8-bit and 4-bit (loaded through transformers'
BitsAndBytesConfig, on the CPU) and torch.ao dynamic int8 (quantize_dynamic({nn.Linear}, qint8)).

The models are 64 wide: bitsandbytes' CPU 4-bit inference kernel (AVX512-BF16 machines) needs
in_features >= its 64-wide quantization block. ``KINDS`` parametrizes a test over the three,
skipping the bitsandbytes ones with the reason where bitsandbytes cannot run here.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import transformers as tf

from tiny_models import CONFIGS, DECODERS

D, F_PLAIN = 64, 128


def bnb_missing() -> str:
    """Why bitsandbytes cannot run here ('' when it can): not installed, or its CPU ops fail."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"bitsandbytes is not installed or does not import ({type(e).__name__}: {e})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch.randn(64, 64)
            q8 = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            q8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            q4 = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
            q4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False)
            x = torch.randn(2, 64)
            q8.to("cpu")(x), q4.to("cpu")(x)
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes does not run on this CPU ({type(e).__name__}: {e})"
    return ""


BNB_MISSING = bnb_missing()
KINDS = [pytest.param("bnb8", marks=pytest.mark.skipif(bool(BNB_MISSING), reason=BNB_MISSING)),
         pytest.param("bnb4", marks=pytest.mark.skipif(bool(BNB_MISSING), reason=BNB_MISSING)),
         "ao"]


def quantized_config(family: str, num_labels: int = 4):
    config = CONFIGS[family]()
    if family == "gpt2":
        config.n_embd = D                 # n_inner None: 4 * 64
    else:
        config.hidden_size, config.intermediate_size = D, F_PLAIN
        if getattr(config, "head_dim", None):        # Llama: set from the old width at construction
            config.head_dim = D // config.num_attention_heads
    if family in DECODERS:
        config.pad_token_id = 0
    config.num_labels = num_labels
    return config


def auto_class(family: str, head: str):
    if head == "cls":
        return tf.AutoModelForSequenceClassification
    return tf.AutoModelForCausalLM if family in DECODERS else tf.AutoModelForMaskedLM


def quantized(kind: str, family: str, folder, head: str = "lm", seed: int = 0) -> nn.Module:
    """A tiny quantized model, the same for the same arguments: bitsandbytes through
    ``from_pretrained`` of a saved float checkpoint, torch.ao by ``quantize_dynamic``."""
    torch.manual_seed(seed)
    model = auto_class(family, head).from_config(quantized_config(family)).eval()
    if kind == "ao":
        if head == "cls":                 # a task head must stay trainable: quantize the transformer only
            torch.ao.quantization.quantize_dynamic(model.base_model, {nn.Linear}, dtype=torch.qint8, inplace=True)
            return model
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    path = folder / f"{family}-{head}-{seed}"
    if not path.exists():
        model.save_pretrained(path)
    skip = ["classifier", "score"] if head == "cls" else None      # a task head must stay trainable
    q = (tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if kind == "bnb8" else
         tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip))
    return auto_class(family, head).from_pretrained(path, quantization_config=q, device_map="cpu").eval()
