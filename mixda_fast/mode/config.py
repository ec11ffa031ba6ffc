"""Configuration of a MoDE patch (Schafhalter et al., arXiv 2410.10181, section 3; docs/design.md section 3).

A :class:`MoDEConfig` says how the model's L layers are cut into blocks, how many experts sit
beside each block, how deep each expert is and how it starts. It is validated when it is built
(``ValueError``/``TypeError`` naming the field, the value and what is accepted) and saved as JSON
next to the expert weights it describes. Whether ``num_blocks`` divides the model's depth is
checked by :func:`mixda_fast.patch_model`, which knows the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..core.config import MethodConfig
from ..core.validate import check_choice, check_int

__all__ = ["MoDEConfig", "EXPERT_INITS", "EXECUTIONS"]

EXPERT_INITS = ("copy", "random")
EXECUTIONS = ("auto", "batched", "loop")


@dataclass
class MoDEConfig(MethodConfig):
    """Blocks, experts and gates of a MoDE patch. Defaults follow the paper (B = 3, L_e = 2).

    Stage 1 trains one expert per domain (``num_experts=1``, the default); stage 2 composes N
    saved experts (:func:`mixda_fast.compose_experts` builds the config from the files). Expert
    names (``domains``) key the experts in saved files; without them they are ``expert_0 ..``.
    """

    num_blocks: int = 3
    """B: the L layers are cut into B contiguous blocks of L / B layers (B must divide L)."""
    num_experts: Optional[int] = None
    """N >= 1 experts beside every block (default 1, or len(domains))."""
    domains: Optional[Sequence[str]] = None
    """Names of the N experts, one per domain (unique; 1..100 characters from ASCII letters, digits,
    '_' and '-', not starting with '-': they become file names)."""
    expert_layers: int = 2
    """L_e: each expert is a stack of this many layers of the model's own layer class."""
    expert_init: str = "copy"
    """"copy": expert layer k of block i starts as a copy of backbone layer
    ``start_i + (k * (L / B)) // L_e`` (the block's own layers when L_e = L / B, evenly spaced ones
    otherwise); "random": freshly built layers with the model's own initialisation. "copy" is the
    default because a random expert mixed in by an untrained gate pushes the model far from what
    it knew; the paper's choice is not stated."""
    freeze_experts: bool = False
    """Stage 2 (composition): True trains the gates only, False the gates and the experts."""
    execution: str = "auto"
    """"batched": per depth, the N experts' FFN GEMMs run as one batched GEMM over stacked
    weights and the gate uses the fused softmax-combine op; "loop": every expert layer runs on
    its own and the mixture is the plain-torch formula (the reference); "auto": the fused mix
    always, the batched GEMMs only outside autograd (restacking weights every training step
    measured slower than N GEMMs on CPU; see bench/test_mode_bench.py). All agree to float
    rounding."""
    extra: dict = field(default_factory=dict)
    """Free-form user metadata, saved with the experts."""

    def __post_init__(self) -> None:
        check_int("MoDEConfig.num_blocks", self.num_blocks, 1, cap="MAX_LAYERS")
        check_int("MoDEConfig.expert_layers", self.expert_layers, 1, cap="MAX_EXPERT_LAYERS")
        if self.num_experts is None and self.domains is None:
            self.num_experts = 1
        self._check_members("num_experts", "expert", "expert (domain) names")
        for name, choices in (("expert_init", EXPERT_INITS), ("execution", EXECUTIONS)):
            check_choice(f"MoDEConfig.{name}", getattr(self, name), choices)
        self._check_flags("freeze_experts")

    @property
    def gate_width(self) -> int:
        """Softmax width of every gate: N experts + the backbone."""
        return self.num_experts + 1
