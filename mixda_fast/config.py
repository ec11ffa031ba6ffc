"""Configuration of a MixDA patch (Diao et al., ACL 2023, section 3; DESIGN.md section 1).

A :class:`MixDAConfig` says which feed-forward networks get domain adapters, how wide the adapters
are, what the gate reads and how its softmax weights mix the FFN with the adapters. It is validated
when it is built and saved as JSON next to the adapter weights it describes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["MixDAConfig"]

_ADAPTER_INPUTS = ("intermediate", "hidden")
_GATES = ("sequence", "token")
_MIXINGS = ("paper", "residual")
_INITS = ("zero_up", "normal")


def _fail(name: str, value: Any, accepted: str, exc=ValueError):
    raise exc(f"MixDAConfig.{name}={value!r} is not accepted: expected {accepted}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a layer index or a width is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MixDAConfig:
    """What to patch and how. Field defaults follow the paper's released code.

    Either ``num_domains`` (K) or ``domains`` (names, K = len) must be given; with only K the
    domains are named ``domain_0 .. domain_{K-1}``. Names key the adapters in saved files.
    """

    num_domains: Optional[int] = None
    """K >= 1 domain adapters per patched FFN."""
    domains: Optional[Sequence[str]] = None
    """Names of the K domains (unique, non-empty); overrides the default names."""
    layers: Optional[Sequence[int]] = None
    """0-based indices of the layers to patch; negatives count from the end. None = every layer
    (the paper patches two of 24 layers of RoBERTa-large: 7 and 11)."""
    reduction_factor: int = 16
    """Adapter bottleneck r = intermediate size // reduction_factor."""
    adapter_input: str = "intermediate"
    """"intermediate": adapters (and gate) read h = act(W1 x), the paper's code; "hidden": they
    read the FFN input x instead (4x cheaper down-projection)."""
    gate: Optional[str] = None
    """"sequence": one softmax per sequence from the last non-padding token (the paper's code);
    "token": one softmax per token. None (default): "token" for causal LMs (GPT-2, Llama,
    Mistral, Qwen2, BERT as a decoder), "sequence" for encoders, decided by ``patch_model``.
    A causal LM refuses "sequence": a gate read from the last token lets every position see the
    tokens after it, and a cached ``generate()`` could not compute it."""
    gate_hidden: int = 768
    """Width of the gate MLP's hidden layers (the released code: 768)."""
    gate_layers: int = 4
    """Number of Linear layers in the gate MLP (the released code: 4)."""
    gate_dropout: float = 0.2
    """Dropout before each gate Linear (the released code: 0.2)."""
    mixing: str = "paper"
    """"paper": y = g_{K+1} f + sum_k g_k a_k, the FFN is one of K+1 mixed experts; "residual":
    y = f + sum_k g_k a_k with a K-way softmax, the unpatched model at initialisation."""
    paper_gate_bug: bool = False
    """True reproduces the released code: the sequence gate reads position -1 even when it is
    padding. False reads the last non-padding token when the attention mask is known."""
    adapter_init: str = "zero_up"
    """"zero_up": Wdown kaiming-uniform, Wup = 0 and biases 0 (adapters start as no-ops);
    "normal": every adapter weight N(0, 0.02), biases 0."""
    extra: dict = field(default_factory=dict)
    """Free-form user metadata, saved with the adapters."""

    def __post_init__(self) -> None:
        if self.num_domains is None and self.domains is None:
            raise ValueError(
                "MixDAConfig needs num_domains (an int >= 1) or domains (a list of names); got neither"
            )
        if self.num_domains is not None and (not _is_int(self.num_domains)):
            _fail("num_domains", self.num_domains, "an int >= 1", TypeError)
        if self.num_domains is not None and self.num_domains < 1:
            _fail("num_domains", self.num_domains, "an int >= 1")
        if self.domains is not None:
            if isinstance(self.domains, str) or not isinstance(self.domains, (list, tuple)):
                _fail("domains", self.domains, "a list of domain names (str)", TypeError)
            names = list(self.domains)
            if not names:
                _fail("domains", self.domains, "at least one domain name")
            for n in names:
                if not isinstance(n, str) or not n or "." in n:
                    _fail("domains", self.domains, "non-empty str names without '.'",
                          TypeError if not isinstance(n, str) else ValueError)
            if len(set(names)) != len(names):
                _fail("domains", self.domains, "unique names")
            if self.num_domains is not None and self.num_domains != len(names):
                _fail("num_domains", self.num_domains,
                      f"len(domains) = {len(names)} when both are given")
            self.domains = names
            self.num_domains = len(names)
        else:
            self.domains = [f"domain_{k}" for k in range(self.num_domains)]
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple)):
                if _is_int(self.layers):
                    self.layers = [self.layers]
                else:
                    _fail("layers", self.layers, "None or a list of int layer indices", TypeError)
            if not all(_is_int(i) for i in self.layers):
                _fail("layers", self.layers, "None or a list of int layer indices", TypeError)
            if len(self.layers) == 0:
                _fail("layers", self.layers, "None (every layer) or a non-empty list of indices")
            self.layers = list(self.layers)
        if not _is_int(self.reduction_factor):
            _fail("reduction_factor", self.reduction_factor, "an int >= 1", TypeError)
        if self.reduction_factor < 1:
            _fail("reduction_factor", self.reduction_factor, "an int >= 1")
        for name, choices in (("adapter_input", _ADAPTER_INPUTS), ("gate", _GATES),
                              ("mixing", _MIXINGS), ("adapter_init", _INITS)):
            value = getattr(self, name)
            if value is None and name == "gate":
                continue                                 # decided by patch_model from the model
            if value not in choices:
                _fail(name, value, " | ".join(repr(c) for c in choices),
                      ValueError if isinstance(value, str) else TypeError)
        for name in ("gate_hidden", "gate_layers"):
            value = getattr(self, name)
            if not _is_int(value):
                _fail(name, value, "an int >= 1", TypeError)
            if value < 1:
                _fail(name, value, "an int >= 1")
        if isinstance(self.gate_dropout, bool) or not isinstance(self.gate_dropout, (int, float)):
            _fail("gate_dropout", self.gate_dropout, "a float in [0, 1)", TypeError)
        if not 0.0 <= float(self.gate_dropout) < 1.0:
            _fail("gate_dropout", self.gate_dropout, "a float in [0, 1)")
        self.gate_dropout = float(self.gate_dropout)
        if not isinstance(self.paper_gate_bug, bool):
            _fail("paper_gate_bug", self.paper_gate_bug, "True or False", TypeError)
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "a dict", TypeError)

    @property
    def num_experts(self) -> int:
        """Softmax width of the gate: K + 1 for paper mixing (the FFN is an expert), else K."""
        return self.num_domains + (1 if self.mixing == "paper" else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "MixDAConfig":
        if not isinstance(data, dict):
            raise TypeError(f"MixDAConfig.from_dict: data={data!r} is not accepted: expected a dict")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"MixDAConfig.from_dict: unknown fields {unknown}; accepted fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MixDAConfig":
        return cls.from_dict(json.loads(text))
