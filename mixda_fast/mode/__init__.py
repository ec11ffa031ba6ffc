"""MoDE: modular domain experts beside blocks of the frozen model (Schafhalter et al.,
arXiv 2410.10181; docs/design.md section 3).

Importing this package registers the method with the core, so ``patch_model(model,
MoDEConfig(...))`` lands in :func:`.patching.patch_mode`.

    config = mixda_fast.MoDEConfig(num_blocks=3, expert_layers=2, domains=["bio"])
    mixda_fast.patch_model(model, config)          # stage 1: one expert per domain
    mixda_fast.mark_trainable(model, "domain")     # expert + gates train
    mixda_fast.save_experts(model, "bio.safetensors", domain="bio")
    ...
    model = mixda_fast.compose_experts(fresh_model, ["bio.safetensors", "law.safetensors"])
    mixda_fast.mark_trainable(model, "compose")    # stage 2: gates (+ experts unless frozen)
"""

from .block import MoDEBlock
from .config import MoDEConfig
from ..core.patch import Method, register_method
from .patching import experts_disabled, gate_forced, is_mode_patched, mode_blocks, patch_mode
from .saving import (FILE_NAME, FORMAT, compose_experts, describe_patch, load_experts, patch_tensors,
                     read_expert_metadata, save_experts)
from .trainable import MODE_STAGES, unfreeze

__all__ = ["MoDEConfig", "MoDEBlock", "mode_blocks", "is_mode_patched", "experts_disabled", "gate_forced",
           "save_experts", "load_experts", "compose_experts", "read_expert_metadata", "MODE_STAGES"]

register_method(Method(
    name="mode", title="MoDE", config_class=MoDEConfig, patch=patch_mode, stages=MODE_STAGES, unfreeze=unfreeze,
    functions="mixda_fast.mode_blocks, save_experts, load_experts, gate_forced, ...",
    stage_note=" for a MoDE-patched model", members="experts",
    tensors=patch_tensors, describe=describe_patch, legacy_file=FILE_NAME, legacy_format=FORMAT,
    load_legacy=load_experts))
