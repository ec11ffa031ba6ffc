"""Where the feed-forward networks live in each supported HuggingFace model family.

A :class:`FamilySpec` names, relative to the model's base transformer (``model.base_model``), the
list of layers and, relative to one layer, the FFN's parts. The patch replaces the module at
``ffn`` with a :class:`~mixda_fast.mixda.layer.MixDAFFN` that computes the whole FFN (first projection,
activation, second projection) plus the adapters. No HuggingFace modeling code is copied: the
patched module calls the host's own projections and activation.

Users add a family with :func:`register_family`::

    mixda_fast.register_family("my_model", FamilySpec(layers="blocks", ffn="ffn",
                               up="ffn.fc1", act="ffn.act", down="ffn.fc2"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

__all__ = ["FamilySpec", "FAMILIES", "register_family", "family_of", "is_causal", "linear_weight"]


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one model family (dotted, as for ``nn.Module.get_submodule``)."""

    layers: str
    """ModuleList of transformer layers, relative to ``model.base_model``."""
    ffn: str
    """Module the patch replaces, relative to a layer; ``up``/``act``/``gate_proj`` must be inside it."""
    up: str
    """First projection W1 (nn.Linear or transformers' Conv1D), relative to the layer."""
    act: str
    """The FFN's activation module, relative to the layer."""
    down: str
    """Second projection W2, relative to the layer. When it is outside ``ffn`` (BERT: the output
    module), it is moved into the patched FFN and its old place passes its input through."""
    gate_proj: Optional[str] = None
    """Gated MLPs (Llama): h = act(gate_proj(x)) * up(x)."""
    post: Optional[str] = None
    """A module the host applies right after ``down`` inside ``ffn`` (GPT-2's dropout)."""
    attn_out: Optional[str] = None
    """The attention block's output projection, relative to the layer (where a Houlsby task
    adapter goes, :mod:`mixda_fast.task_adapters`); None when unknown."""
    causal: Optional[bool] = None
    """True for decoder-only families (position t sees tokens <= t), False for encoders; None:
    decided from transformers' model mappings (:func:`is_causal`)."""

    def rel(self, path: str) -> str:
        """``path`` relative to the ffn module; '' when it is outside it."""
        prefix = self.ffn + "."
        return path[len(prefix):] if path.startswith(prefix) else ""


_BERT = FamilySpec(layers="encoder.layer", ffn="intermediate", up="intermediate.dense",
                   act="intermediate.intermediate_act_fn", down="output.dense",
                   attn_out="attention.output.dense", causal=False)
_GPT2 = FamilySpec(layers="h", ffn="mlp", up="mlp.c_fc", act="mlp.act", down="mlp.c_proj",
                   post="mlp.dropout", attn_out="attn.c_proj", causal=True)
_LLAMA = FamilySpec(layers="layers", ffn="mlp", up="mlp.up_proj", act="mlp.act_fn",
                    down="mlp.down_proj", gate_proj="mlp.gate_proj", attn_out="self_attn.o_proj",
                    causal=True)
# DistilBERT keeps the whole FFN (lin1, activation, lin2, dropout) in one module, as GPT-2 does;
# its chunked forward (chunk_size_feed_forward) computes the same per-token function unchunked.
_DISTILBERT = FamilySpec(layers="transformer.layer", ffn="ffn", up="ffn.lin1", act="ffn.activation",
                         down="ffn.lin2", post="ffn.dropout", attn_out="attention.out_lin", causal=False)

FAMILIES: dict[str, FamilySpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # Gemma's gated MLP is Llama's with act_fn gelu_pytorch_tanh (fused: ops.activations.GELU_TANH);
    # the rest of the block (scaled embeddings, pre/post-FFN norms, soft-capping) is the host's own.
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "distilbert": _DISTILBERT,
}
"""``config.model_type`` -> :class:`FamilySpec`. Extend it with :func:`register_family`."""


def register_family(model_type: str, spec: FamilySpec, *, overwrite: bool = False) -> None:
    """Teach the patcher where a family's FFNs are (``model.config.model_type`` -> spec)."""
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"register_family: model_type={model_type!r} is not accepted: expected a non-empty str")
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family: spec={spec!r} is not accepted: expected a FamilySpec")
    if not spec.rel(spec.up) or not spec.rel(spec.act) or (spec.gate_proj and not spec.rel(spec.gate_proj)):
        raise ValueError(f"register_family: spec={spec!r}: up, act and gate_proj must lie inside ffn={spec.ffn!r}")
    if model_type in FAMILIES and not overwrite:
        raise ValueError(f"register_family: model_type={model_type!r} is already registered; pass overwrite=True")
    FAMILIES[model_type] = spec


def family_of(model: nn.Module) -> tuple[str, FamilySpec]:
    """The model's ``model_type`` and its spec, or a ValueError that lists what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"patch_model: model.config.model_type={model_type!r} is not supported; supported: "
            f"{sorted(FAMILIES)}. Register another family with mixda_fast.register_family("
            f"'{model_type}', mixda_fast.FamilySpec(layers=..., ffn=..., up=..., act=..., down=...))"
        )
    return model_type, FAMILIES[model_type]


def is_causal(model: nn.Module, spec: FamilySpec) -> bool:
    """Whether position t of the model sees only tokens <= t: ``config.is_decoder`` (BERT as a
    decoder), else the family's ``causal``, else a family transformers has a causal-LM class for
    and no masked-LM class."""
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False):
        return True
    if spec.causal is not None:
        return spec.causal
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def linear_weight(module: nn.Module):
    """(weight, bias) of a projection in nn.Linear layout (out, in); transformers' Conv1D
    stores (in, out) and is returned transposed (a view)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    raise TypeError(
        f"mixda_fast: projection module {type(module).__name__} is not accepted: expected nn.Linear "
        "or transformers' Conv1D"
    )
