"""mixda_fast: Mixture-of-Domain-Adapters (MixDA) for HuggingFace models, with fused kernels.

    import mixda_fast
    model = mixda_fast.patch_model(model, mixda_fast.MixDAConfig(domains=["bio", "law"]))
    mixda_fast.mark_trainable(model, "domain")

See README.md and DESIGN.md; ``python -m mixda_fast.info`` says which kernels were built.
"""

from .mixda.config import MixDAConfig
from .core.families import FAMILIES, FamilySpec, register_family
from .mixda.layer import MixDAFFN
from .mode import (MoDEBlock, MoDEConfig, compose_experts, experts_disabled, gate_forced, load_experts,
                   mode_blocks, save_experts)
from .ops import get_backend, kernels_available, set_backend
from .mixda.patching import adapters_disabled, is_patched, mixda_modules, patch_model, unpatch_model
from .core.pretrained import load_patched
from .mixda.saving import AdapterFileNotFoundError, load_adapters, save_adapters
from .mixda.trainable import count_parameters, mark_trainable
from .task_adapters import (add_task_adapters, load_task_adapters, remove_task_adapters, save_task_adapters,
                       task_adapter_modules)

__version__ = "0.1.0"

__all__ = [
    "MixDAConfig", "FamilySpec", "FAMILIES", "register_family", "MixDAFFN",
    "patch_model", "unpatch_model", "mixda_modules", "is_patched", "adapters_disabled", "load_patched",
    "save_adapters", "load_adapters", "AdapterFileNotFoundError",
    "mark_trainable", "count_parameters",
    "kernels_available", "set_backend", "get_backend", "__version__",
    "MoDEConfig", "MoDEBlock", "mode_blocks", "experts_disabled", "gate_forced",
    "save_experts", "load_experts", "compose_experts",
    "add_task_adapters", "remove_task_adapters", "task_adapter_modules", "save_task_adapters",
    "load_task_adapters",
]
