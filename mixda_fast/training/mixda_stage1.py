"""Stage 1 of MixDA: train one domain adapter on domain knowledge (docs/design.md section 2).

The base model is frozen; the domain adapter and the gate train (the gate optionally frozen),
with loss ``lambda * L_knowledge + L_old`` (lambda = 0.5): masked-LM (or causal-LM) cross-entropy
on the knowledge file, and the MSE that keeps each patched layer's output on general text close
to the unpatched layer's. Output folder: ``mixda_adapter_<domain>.safetensors`` (the domain
adapter, loadable into any slot by stage 2), the adapter folder files (``adapter_config.json``,
``adapter_model.safetensors``: adapter + gate, ``README.md``; :mod:`mixda_fast.core.adapter_folder`),
``lm_head.safetensors`` when the LM head was trained, ``mixda_run.json`` (what was trained, on
what, with which settings) and the Trainer's ``checkpoint-*`` folders when saving is on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch.nn as nn

from ..core.adapter_folder import check_writable
from ..core.families import family_of
from ..core.io import LM_HEAD
from ..core.model import count_parameters, head_parameters, layer_list
from ..core.patch import check_member, is_patched, mark_trainable, patch_model
from ..core.validate import check_choice
from ..mixda.config import MixDAConfig
from ..mixda.layer import MixDAGate
from ..mixda.patching import patch_config
from ..mixda.saving import save_adapters
from .data import (KnowledgeCollator, Stage1Collator, encode_knowledge, encode_texts, load_knowledge,
                   load_texts)
from .losses import OLD_LOSSES, Stage1Model, is_causal_lm
from .runs import save_adapter_folder, save_head, write_run
from .trainer import MixDATrainer, StageResult, StepTimer, seed_before_init, training_arguments

__all__ = ["default_layers", "run_stage1", "Stage1Result"]

logger = logging.getLogger(__name__)


def default_layers(num_layers: int) -> list[int]:
    """The paper's choice (layers 7 and 11 of RoBERTa-large's 24) scaled to ``num_layers``."""
    return sorted({min(num_layers - 1, int(num_layers * f + 0.5)) for f in (7 / 24, 11 / 24)})


@dataclass
class Stage1Result(StageResult):
    """What :func:`run_stage1` returns."""


def _as_dataset(data, loader, what: str):
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return loader(data)
    if hasattr(data, "column_names"):
        return data
    raise TypeError(f"run_stage1: {what}={data!r} is not accepted: expected a file path or a datasets.Dataset "
                    f"from mixda_fast.training.{loader.__name__}")


def _check_gate_learning_rate(model: nn.Module, config: Optional[MixDAConfig], train_gate: bool,
                              gate_learning_rate: Optional[float]) -> None:
    """Refuse a gate learning rate no gate would use (``train_gate=False``, or residual mixing with
    one domain: a gate of one entry, frozen) before anything is patched or written; MixDATrainer
    refuses it again on the built model."""
    if gate_learning_rate is None:
        return
    config = patch_config(model) if is_patched(model) else config
    if not train_gate or (config is not None and config.gate_width == 1):
        why = "train_gate=False" if not train_gate else "residual mixing with one domain gives a gate of one entry"
        raise ValueError(f"run_stage1: gate_learning_rate={gate_learning_rate!r} is not accepted: no gate trains "
                         f"({why}); leave it None")


def run_stage1(model: nn.Module, tokenizer, knowledge, output_dir: Union[str, os.PathLike], *,
               general=None, domain: str = "domain_0", config: Optional[MixDAConfig] = None,
               knowledge_weight: float = 0.5, old_weight: float = 1.0, old_loss: str = "paper",
               max_length: int = 128, general_batch_size: Optional[int] = None, train_gate: bool = True,
               train_lm_head: bool = False, save_lm_head: bool = False, training_args: Optional[dict] = None,
               resume_from_checkpoint: Union[None, bool, str] = None, callbacks: Sequence = (),
               base_model_path: Optional[str] = None, save: bool = True,
               data_sources: Optional[dict] = None, gate_learning_rate: Optional[float] = None,
               mask_general: bool = True) -> Stage1Result:
    """Train the domain adapter ``domain`` of ``model`` (a masked or causal LM; patched here with
    ``config``, default one adapter on :func:`default_layers`, unless already patched).

    ``knowledge``: a file (see :mod:`~mixda_fast.training.data`) or a :func:`load_knowledge`
    dataset; ``general``: general text for L_old (file or :func:`load_texts` dataset; None turns
    L_old off, with a warning). ``training_args``: overrides of :func:`training_arguments`
    (defaults: lr 1e-4, AdamW with weight decay 0.05, linear decay, 10 epochs, batch 16).
    ``data_sources``: {"knowledge": path, "general": path} to record in the manifest when the
    data are passed as datasets. ``gate_learning_rate``: a peak learning rate for the gate alone.
    ``old_loss``: the form of L_old (``training.losses.OLD_LOSSES``; "paper", the default, is
    the paper's L_S; "mse" is the released code's). ``save_lm_head``: write the LM head with the
    adapters although it does not train (a head fitted before stage 1). ``mask_general`` (masked
    LMs; default on): L_old reads general text
    masked as the knowledge is (15%), so it also holds the adapters at the mask token, where the
    knowledge loss trains them (without it, general masked-LM loss can rise while the drift on
    unmasked text stays small).
    Under DDP only the main process writes the output files.
    """
    if not isinstance(domain, str) or not domain:
        raise TypeError(f"run_stage1: domain={domain!r} is not accepted: expected a non-empty str")
    check_choice("run_stage1: old_loss", old_loss, OLD_LOSSES)
    _check_gate_learning_rate(model, config, train_gate, gate_learning_rate)
    output_dir = Path(output_dir)
    if save:                             # refused now, not after training
        check_writable(output_dir, "run_stage1")
    output_dir.mkdir(parents=True, exist_ok=True)
    family_of(model)
    seed_before_init(training_args)
    if not is_patched(model):
        n_layers = len(layer_list(model, *family_of(model), "run_stage1"))
        config = config or MixDAConfig(domains=[domain], layers=default_layers(n_layers))
        patch_model(model, config)
    elif config is not None and config is not patch_config(model):
        raise ValueError("run_stage1: model is already patched with another config; pass config=None or an "
                         "unpatched model")
    config = patch_config(model)
    check_member(model, domain, "run_stage1", "mixda")
    causal = is_causal_lm(model)
    mark_trainable(model, "domain", domain=domain)
    if config.gate_width == 1 and train_gate:            # mark_trainable left it frozen
        logger.info("run_stage1: residual mixing with one domain: the gate's softmax has one entry (always 1), "
                    "so the gate gets no gradient; it is frozen")
        train_gate = False
    if not train_gate:
        for m in model.modules():
            if isinstance(m, MixDAGate):
                m.requires_grad_(False)
    if train_lm_head:
        for p in head_parameters(model):
            p.requires_grad_(True)
    if general is None:
        logger.warning("run_stage1: no general text given: L_old (the old-knowledge loss) is off")

    kds = _as_dataset(knowledge, load_knowledge, "knowledge")
    gds = _as_dataset(general, load_texts, "general")
    sources = {"knowledge": str(knowledge) if isinstance(knowledge, (str, os.PathLike)) else None,
               "general": str(general) if isinstance(general, (str, os.PathLike)) else None}
    sources.update(data_sources or {})
    source = sources["knowledge"] or "knowledge"
    train_ds = encode_knowledge(kds, tokenizer, causal=causal, max_length=max_length, source=source)
    gen_ds = encode_texts(gds, tokenizer, max_length=max_length) if gds is not None else None
    args = training_arguments(str(output_dir), **(training_args or {}))
    collator = Stage1Collator(KnowledgeCollator(tokenizer, causal, seed=args.seed), gen_ds, general_batch_size,
                              mask_general=mask_general)
    timer = StepTimer()
    wrapper = Stage1Model(model, causal, old_loss=old_loss)
    trainer = MixDATrainer(model=wrapper, args=args, train_dataset=train_ds, data_collator=collator,
                           callbacks=[timer, *callbacks], knowledge_weight=knowledge_weight,
                           old_weight=old_weight if gds is not None else 0.0,
                           gate_learning_rate=gate_learning_rate)
    trainable, total = count_parameters(model)
    logger.info("stage 1: domain %r, layers %s, %d of %d parameters train", domain, config.layers, trainable, total)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    files = {}
    if save and args.should_save:
        files["domain_adapter"] = save_adapters(model, output_dir, domain=domain).name
        files.update(save_adapter_folder(model, output_dir, base_model_path, "adapters"))
        if train_lm_head or save_lm_head:
            files["lm_head"] = save_head(model, output_dir / "lm_head.safetensors", LM_HEAD, "run_stage1", lm=True)
        write_run(output_dir, {
            "stage": 1, "base_model": base_model_path, "model_type": family_of(model)[0],
            "domain": domain, "config": config.to_dict(), "files": files, "causal": causal,
            "knowledge": sources["knowledge"], "general": sources["general"],
            "knowledge_weight": knowledge_weight, "old_weight": old_weight, "old_loss": old_loss,
            "gate_learning_rate": gate_learning_rate,
            "mask_general": mask_general, "max_length": max_length,
            "trainable_parameters": trainable, "total_parameters": total,
            "train_gate": train_gate, "train_lm_head": train_lm_head, "lm_head_fitted": save_lm_head,
            "log_history": trainer.state.log_history,
        })
    return Stage1Result(model=model, trainer=trainer, timer=timer, output_dir=output_dir, files=files)
