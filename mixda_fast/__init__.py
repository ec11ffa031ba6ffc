"""mixda_fast: Mixture-of-Domain-Adapters (MixDA) for HuggingFace models, with fused kernels.

    import mixda_fast
    model = mixda_fast.patch_model(model, mixda_fast.MixDAConfig(domains=["bio", "law"]))
    mixda_fast.mark_trainable(model, "domain")
    ...
    mixda_fast.save_pretrained(model, "bio-adapters")          # adapter_config.json + adapter_model.safetensors
    model = mixda_fast.from_pretrained(base_model, "bio-adapters")

See README.md and docs/design.md; ``python -m mixda_fast.info`` says which kernels were built.
"""

from .core.adapter_folder import from_pretrained, read_adapter_config, save_pretrained
from .core.families import FAMILIES, FamilySpec, register_family
from .core.io import AdapterFileNotFoundError
from .core.model import count_parameters
from .core.patch import is_patched, mark_trainable, patch_model, unpatch_model
from .core.pretrained import load_patched
from .mixda import (MixDAConfig, MixDAFFN, adapters_disabled, domain_forced, export_released, gate_weights,
                    import_released, load_adapters, mixda_modules, released_config, save_adapters)
from .mode import (MoDEBlock, MoDEConfig, compose_experts, experts_disabled, gate_forced, load_experts,
                   mode_blocks, save_experts)
from .ops import get_backend, kernels_available, set_backend
from .task_adapters import (add_task_adapters, load_task_adapters, remove_task_adapters, save_task_adapters,
                            task_adapter_modules)
from .version import __version__

__all__ = [
    "MixDAConfig", "FamilySpec", "FAMILIES", "register_family", "MixDAFFN",
    "patch_model", "unpatch_model", "mixda_modules", "is_patched", "adapters_disabled", "load_patched",
    "domain_forced", "gate_weights",
    "save_adapters", "load_adapters", "AdapterFileNotFoundError",
    "import_released", "export_released", "released_config",
    "save_pretrained", "from_pretrained", "read_adapter_config",
    "mark_trainable", "count_parameters",
    "kernels_available", "set_backend", "get_backend", "__version__",
    "MoDEConfig", "MoDEBlock", "mode_blocks", "experts_disabled", "gate_forced",
    "save_experts", "load_experts", "compose_experts",
    "add_task_adapters", "remove_task_adapters", "task_adapter_modules", "save_task_adapters",
    "load_task_adapters",
]
