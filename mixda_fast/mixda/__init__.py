"""MixDA: Mixture-of-Domain-Adapters (Diao et al., ACL 2023; docs/design.md sections 1 and 2).

K domain adapters in parallel with each chosen FFN and a softmax gate mixing them
(:class:`~.layer.MixDAFFN`), patched in place (:mod:`.patching`), saved per domain
(:mod:`.saving`; the released code's checkpoints in and out: :mod:`.released`), trained in two stages (:mod:`.trainable`, :mod:`mixda_fast.training`).
Importing this package registers the method with the core, so ``patch_model(model,
MixDAConfig(...))`` lands in :func:`.patching.patch_mixda`.
"""

from ..core.patch import Method, register_method
from .config import MixDAConfig
from .layer import MixDAFFN
from .patching import adapters_disabled, mixda_modules, patch_mixda
from .released import export_released, import_released, released_config
from .routing import domain_forced, gate_weights
from .saving import FILE_NAME, FORMAT, describe_patch, load_adapters, patch_tensors, save_adapters
from .trainable import STAGES, unfreeze

__all__ = ["MixDAConfig", "MixDAFFN", "mixda_modules", "adapters_disabled", "save_adapters", "load_adapters",
           "import_released", "export_released", "released_config", "domain_forced", "gate_weights"]

register_method(Method(
    name="mixda", title="MixDA", config_class=MixDAConfig, patch=patch_mixda, stages=STAGES, unfreeze=unfreeze,
    functions="mixda_fast.mixda_modules, save_adapters, load_adapters, adapters_disabled, domain_forced, ...",
    tensors=patch_tensors, describe=describe_patch, legacy_file=FILE_NAME, legacy_format=FORMAT,
    load_legacy=load_adapters))
