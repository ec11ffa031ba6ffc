"""Configuration of a MixDA patch (Diao et al., ACL 2023, section 3; docs/design.md section 1).

A :class:`MixDAConfig` says which feed-forward networks get domain adapters, how wide the adapters
are, what the gate reads and how its softmax weights mix the FFN with the adapters. It is validated
when it is built and saved as JSON next to the adapter weights it describes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..core.config import MethodConfig
from ..core.validate import MAX_LAYERS, check_choice, check_float, check_int, is_int

__all__ = ["MixDAConfig"]

_ADAPTER_INPUTS = ("intermediate", "hidden")
_GATES = ("sequence", "token")
_MIXINGS = ("paper", "residual")
_INITS = ("zero_up", "normal")


@dataclass
class MixDAConfig(MethodConfig):
    """What to patch and how. Field defaults follow the paper's released code.

    Either ``num_domains`` (K) or ``domains`` (names, K = len) must be given; with only K the
    domains are named ``domain_0 .. domain_{K-1}``. Names key the adapters in saved files.
    """

    num_domains: Optional[int] = None
    """K >= 1 domain adapters per patched FFN."""
    domains: Optional[Sequence[str]] = None
    """Names of the K domains (unique; 1..100 characters from ASCII letters, digits, '_' and '-',
    not starting with '-': they key the adapters in saved files and name files); overrides the
    default names."""
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
        self._check_members("num_domains", "domain", "domain names")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple)):
                if is_int(self.layers):
                    self.layers = [self.layers]
                else:
                    self._fail("layers", self.layers, "None or a list of int layer indices", TypeError)
            if not all(is_int(i) for i in self.layers):
                self._fail("layers", self.layers, "None or a list of int layer indices", TypeError)
            if len(self.layers) == 0:
                self._fail("layers", self.layers, "None (every layer) or a non-empty list of indices")
            if len(self.layers) > MAX_LAYERS or any(not -MAX_LAYERS <= i < MAX_LAYERS for i in self.layers):
                self._fail("layers", self.layers, f"at most {MAX_LAYERS} layer indices in -{MAX_LAYERS} .. "
                                             f"{MAX_LAYERS - 1} (mixda_fast.core.validate.MAX_LAYERS)")
            self.layers = list(self.layers)
        check_int("MixDAConfig.reduction_factor", self.reduction_factor, 1, cap="MAX_REDUCTION_FACTOR")
        for name, choices in (("adapter_input", _ADAPTER_INPUTS), ("gate", _GATES),
                              ("mixing", _MIXINGS), ("adapter_init", _INITS)):
            value = getattr(self, name)
            if value is None and name == "gate":
                continue                                 # decided by patch_model from the model
            check_choice(f"MixDAConfig.{name}", value, choices)
        check_int("MixDAConfig.gate_hidden", self.gate_hidden, 1, cap="MAX_GATE_HIDDEN")
        check_int("MixDAConfig.gate_layers", self.gate_layers, 1, cap="MAX_GATE_LAYERS")
        self.gate_dropout = check_float("MixDAConfig.gate_dropout", self.gate_dropout, 0.0, 1.0, hi_open=True)
        self._check_flags("paper_gate_bug")

    @property
    def gate_width(self) -> int:
        """Softmax width of the gate: K + 1 for paper mixing (the FFN is an expert), else K."""
        return self.num_domains + (1 if self.mixing == "paper" else 0)

    @property
    def num_experts(self) -> int:
        """Deprecated alias of :attr:`gate_width` (MoDEConfig.num_experts counts experts, N)."""
        warnings.warn("MixDAConfig.num_experts is deprecated: use MixDAConfig.gate_width (the gate's softmax "
                      "width, K + 1 with paper mixing)", DeprecationWarning, stacklevel=2)
        return self.gate_width
