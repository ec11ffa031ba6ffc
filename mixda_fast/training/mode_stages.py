"""MoDE's two stages on the MixDA training machinery (Schafhalter et al., arXiv 2410.10181;
docs/design.md section 3): the same ``MixDATrainer`` (HuggingFace ``Trainer``; trainable-only
checkpoints, resume, ``accelerate`` / ``torchrun``), the same data files and collators.

- Stage 1 (:func:`run_mode_stage1`): one expert per domain. The model is patched with one
  expert (named after the domain) beside each of the B blocks; only the expert and the gates
  train, on the LM loss of the domain corpus: causal-LM cross-entropy on every token for
  decoders, masked-LM cross-entropy on BERT's 15% random masking for encoders (the knowledge
  collator of stage 1 of MixDA; prompt/targets records mask their target spans whole).
- Stage 2 (:func:`run_mode_stage2`): N stage-1 experts composed behind fresh (N+1)-way gates
  (:func:`mixda_fast.compose_experts`); the gates train, and the experts unless
  ``freeze_experts``, on the same LM loss over mixed-domain text.

Output folder (both stages): the adapter folder files (``adapter_config.json``,
``adapter_model.safetensors``: the whole patch, experts and gates, ``README.md``; what
``mixda_fast.from_pretrained(base, run_dir)`` and :func:`load_mode_run` rebuild the model from;
folders written before hold ``mode_experts.safetensors`` instead, which both still read), stage 1
also ``mode_expert_<domain>.safetensors``
(that expert and its gate rows: what stage 2 composes), ``mixda_run.json`` (``"method": "mode"``,
the stage, config, data, metrics, log) and the Trainer's ``checkpoint-*`` folders when saving is on.
:func:`lm_metrics` gives LM loss, perplexity and (next- or masked-) token accuracy on held-out text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.adapter_folder import check_writable, from_pretrained
from ..core.extras import require
from ..core.families import family_of
from ..mode.config import MoDEConfig
from ..mode.patching import is_mode_patched, mode_state
from ..mode.saving import FILE_NAME as EXPERTS_FILE, compose_experts, save_experts
from ..core.model import count_parameters
from ..core.patch import check_member, is_patched, mark_trainable, patch_model
from .data import KnowledgeCollator, encode_knowledge, load_knowledge
from .evaluate import batches, predicted_logits
from .losses import ModelObjective, is_causal_lm, knowledge_loss, lm_head_of
from .runs import RUN_FILE, load_lm, read_run, save_adapter_folder, write_run
from .trainer import MixDATrainer, StageResult, StepTimer, seed_before_init, training_arguments

__all__ = ["run_mode_stage1", "run_mode_stage2", "ModeResult", "LMObjective", "lm_metrics", "load_mode_run",
           "resolve_expert_file", "EXPERTS_FILE", "METHOD"]

logger = logging.getLogger(__name__)

METHOD = "mode"
PathOrData = Union[str, os.PathLike, Any]


class LMObjective(ModelObjective):
    """The LM loss of a (masked or causal) LM as one module for ``Trainer``: ``forward`` returns
    ``{"loss": ...}``, the cross-entropy over the positions whose label is not -100, with the
    LM head run on those positions only (:func:`~mixda_fast.training.losses.knowledge_loss`)."""

    def forward(self, input_ids, attention_mask, labels):
        return {"loss": knowledge_loss(self.model, input_ids, attention_mask, labels, self.causal)}


@dataclass
class ModeResult(StageResult):
    """What :func:`run_mode_stage1` and :func:`run_mode_stage2` return."""


# -- data ------------------------------------------------------------------------------------

def _as_list(data) -> list:
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("no training data given: expected one or more text files")
        return list(data)
    return [data]


def _encoded(data: PathOrData, tokenizer, causal: bool, max_length: int, fn: str):
    """One or more files (or load_knowledge datasets) -> one tokenized dataset; each file is
    encoded under its own name, so errors name the file and line."""
    datasets = require("datasets", "train", fn)

    parts, sources = [], []
    for d in _as_list(data):
        if isinstance(d, (str, os.PathLike)):
            ds, source = load_knowledge(d), str(d)
        elif hasattr(d, "column_names"):
            ds, source = d, "data"
        else:
            raise TypeError(f"{fn}: data={d!r} is not accepted: expected a text file path (.txt lines, .json/.jsonl "
                            "{\"text\"} records) or a datasets.Dataset from mixda_fast.training.load_knowledge")
        parts.append(encode_knowledge(ds, tokenizer, causal=causal, max_length=max_length, source=source))
        sources.append(source if isinstance(d, (str, os.PathLike)) else None)
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), sources


@torch.no_grad()
def lm_metrics(model: nn.Module, tokenizer, data: PathOrData, *, causal: Optional[bool] = None,
               batch_size: int = 64, max_length: int = 128, seed: int = 0) -> dict[str, float]:
    """LM loss (mean cross-entropy per predicted token), perplexity and token accuracy (argmax ==
    label) of ``model`` on text file(s) or :func:`load_knowledge` datasets. Causal LMs predict every
    next token; masked LMs the 15% randomly masked tokens, drawn from the batch's content and
    ``seed`` (the same text gives the same masks, so two models are compared on the same task)."""
    causal = is_causal_lm(model) if causal is None else causal
    ds, _ = _encoded(data, tokenizer, causal, max_length, "lm_metrics")
    collator = KnowledgeCollator(tokenizer, causal, seed=seed)
    head = lm_head_of(model)
    was_training = model.training
    model.eval()
    total, hits, n = 0.0, 0, 0
    try:
        with _cache_off(model):
            for batch in batches(ds, collator, batch_size):
                logits, labels, sel = predicted_logits(model, head, batch, causal)
                logits = logits.float()                                                  # (N, V)
                total += float(F.cross_entropy(logits, labels[sel], reduction="sum"))
                hits += int((logits.argmax(-1) == labels[sel]).sum())
                n += int(sel.sum())
    finally:
        model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": hits / max(n, 1),
            "tokens": n}


@contextlib.contextmanager
def _cache_off(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` inside: no KV cache (nor MoDE expert cache slots) is built for
    a loss or a metric."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before is None:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


# -- expert folders --------------------------------------------------------------------------

def resolve_expert_file(path: Union[str, os.PathLike]) -> Path:
    """The one-expert file of a MoDE stage-1 output folder (or ``path`` itself when it is a file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MoDE expert {str(p)!r} does not exist; expected a `mixda-fast stage1 --method mode` "
                                "output folder or a mode_expert_<domain>.safetensors file")
    if p.is_file():
        return p
    if (p / RUN_FILE).is_file():
        run = read_run(p)
        if run.get("method", "mixda") != METHOD:
            raise ValueError(f"{str(p)!r} is a MixDA stage-{run.get('stage')} run (domain adapters), not MoDE experts; "
                             "MoDE stage 2 composes the outputs of `mixda-fast stage1 --method mode`")
        if run.get("stage") != 1 or "expert" not in run.get("files", {}):
            raise ValueError(f"{str(p)!r} is a MoDE stage-{run.get('stage')} run; expected a MoDE stage-1 output "
                             "folder (one expert per domain)")
        return p / run["files"]["expert"]
    found = sorted(p.glob("mode_expert_*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"MoDE expert folder {str(p)!r} holds {len(found)} mode_expert_*.safetensors files and "
                                f"no {RUN_FILE}; expected one, or pass the file itself")
    return found[0]


# -- the stages ------------------------------------------------------------------------------

def _stage1_config(config: Optional[MoDEConfig], domain: str) -> MoDEConfig:
    if config is None:
        return MoDEConfig(domains=[domain])
    if not isinstance(config, MoDEConfig):
        raise TypeError(f"run_mode_stage1: config={config!r} is not accepted: expected a mixda_fast.MoDEConfig")
    if config.num_experts == 1 and config.domains == ["expert_0"]:     # unnamed: name it after the domain
        return dataclasses.replace(config, domains=[domain], num_experts=None)
    if domain not in config.domains:
        raise ValueError(f"run_mode_stage1: domain={domain!r} is not accepted: the config's experts are "
                         f"{list(config.domains)}")
    return config


def _train(model: nn.Module, tokenizer, data, output_dir: Path, *, fn: str, max_length: int, training_args,
           resume_from_checkpoint, callbacks, gate_learning_rate, eval_data):
    causal = is_causal_lm(model)
    train_ds, sources = _encoded(data, tokenizer, causal, max_length, fn)
    args = training_arguments(str(output_dir), **(training_args or {}))
    timer = StepTimer()
    trainer = MixDATrainer(model=LMObjective(model, causal), args=args, train_dataset=train_ds,
                           data_collator=KnowledgeCollator(tokenizer, causal, seed=args.seed),
                           callbacks=[timer, *callbacks], gate_learning_rate=gate_learning_rate)
    trainable, total = count_parameters(model)
    config = mode_state(model).config
    logger.info("%s: experts %s, %d blocks of %d-layer experts, %d examples, %d of %d parameters train", fn,
                list(config.domains), config.num_blocks, config.expert_layers, len(train_ds), trainable, total)
    with _cache_off(model):
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    metrics = lm_metrics(model, tokenizer, eval_data, causal=causal, max_length=max_length, seed=args.seed) \
        if eval_data is not None else {}
    return trainer, timer, sources, causal, (trainable, total), metrics


def _manifest(model, trainer, stage: int, files: dict, causal: bool, sources, counts, metrics, max_length,
              base_model_path, extra: dict) -> dict:
    return {"method": METHOD, "stage": stage, "base_model": base_model_path,
            "model_type": family_of(model)[0], "config": mode_state(model).config.to_dict(), "files": files,
            "causal": causal, "train": sources, "max_length": max_length, "trainable_parameters": counts[0],
            "total_parameters": counts[1], "metrics": metrics, "gate_learning_rate": trainer.gate_learning_rate,
            **extra, "log_history": trainer.state.log_history}


def run_mode_stage1(model: nn.Module, tokenizer, data: PathOrData, output_dir: Union[str, os.PathLike], *,
                    domain: str = "domain_0", config: Optional[MoDEConfig] = None, max_length: int = 128,
                    training_args: Optional[dict] = None, resume_from_checkpoint: Union[None, bool, str] = None,
                    callbacks: Sequence = (), base_model_path: Optional[str] = None, save: bool = True,
                    data_sources: Optional[Sequence[str]] = None, gate_learning_rate: Optional[float] = None,
                    eval_data: Optional[PathOrData] = None) -> ModeResult:
    """MoDE stage 1: train the expert ``domain`` of ``model`` (a masked or causal LM, patched here
    with ``config``, default ``MoDEConfig(domains=[domain])``: 3 blocks, 2-layer experts copied from
    the backbone) and the gates on the LM loss of ``data`` (text file(s) or :func:`load_knowledge`
    datasets); the backbone stays frozen. ``training_args`` overrides :func:`training_arguments`
    (lr 1e-4, AdamW with weight decay 0.05, linear decay, 10 epochs, batch 16). ``eval_data``:
    held-out text for :func:`lm_metrics` after training. Under DDP only the main process writes."""
    if not isinstance(domain, str) or not domain:
        raise TypeError(f"run_mode_stage1: domain={domain!r} is not accepted: expected a non-empty str")
    output_dir = Path(output_dir)
    if save:                             # refused now, not after training
        check_writable(output_dir, "run_mode_stage1")
    output_dir.mkdir(parents=True, exist_ok=True)
    family_of(model)
    if is_patched(model) and not is_mode_patched(model):
        raise ValueError("run_mode_stage1: model carries a MixDA patch; pass an unpatched model (or one patched "
                         "with a MoDEConfig)")
    seed_before_init(training_args)
    if not is_mode_patched(model):
        patch_model(model, _stage1_config(config, domain))
    elif config is not None and config is not mode_state(model).config:
        raise ValueError("run_mode_stage1: model is already patched with another config; pass config=None or an "
                         "unpatched model")
    check_member(model, domain, "run_mode_stage1", "mode")
    mark_trainable(model, "domain", domain=domain)
    trainer, timer, sources, causal, counts, metrics = _train(
        model, tokenizer, data, output_dir, fn="MoDE stage 1", max_length=max_length, training_args=training_args,
        resume_from_checkpoint=resume_from_checkpoint, callbacks=callbacks, gate_learning_rate=gate_learning_rate,
        eval_data=eval_data)
    files = {}
    if save and trainer.args.should_save:
        files["expert"] = save_experts(model, output_dir, domain=domain).name
        files.update(save_adapter_folder(model, output_dir, base_model_path, "experts"))
        write_run(output_dir, _manifest(
            model, trainer, 1, files, causal, list(data_sources or sources), counts, metrics, max_length,
            base_model_path, {"domain": domain}))
    return ModeResult(model=model, trainer=trainer, timer=timer, output_dir=output_dir, files=files, metrics=metrics)


def run_mode_stage2(model: nn.Module, tokenizer, data: PathOrData, output_dir: Union[str, os.PathLike], *,
                    experts: Sequence[Union[str, os.PathLike]] = (), expert_names: Optional[Sequence[str]] = None,
                    freeze_experts: Optional[bool] = None, gate_init: str = "saved", execution: Optional[str] = None,
                    max_length: int = 128, training_args: Optional[dict] = None,
                    resume_from_checkpoint: Union[None, bool, str] = None, callbacks: Sequence = (),
                    base_model_path: Optional[str] = None, save: bool = True,
                    data_sources: Optional[Sequence[str]] = None, gate_learning_rate: Optional[float] = None,
                    eval_data: Optional[PathOrData] = None) -> ModeResult:
    """MoDE stage 2: compose the N stage-1 ``experts`` (output folders of :func:`run_mode_stage1`,
    or their ``mode_expert_*.safetensors`` files) into the unpatched ``model`` behind (N+1)-way
    gates (:func:`mixda_fast.compose_experts`: ``expert_names`` renames them, ``gate_init``
    "saved" | "uniform"), then train the gates, and the experts unless ``freeze_experts``, on
    the LM loss of mixed-domain ``data``. With no ``experts``, ``model`` must be MoDE-patched
    already (e.g. by ``compose_experts``) and is trained as it is."""
    output_dir = Path(output_dir)
    if save:                             # refused now, not after training
        check_writable(output_dir, "run_mode_stage2")
    if isinstance(experts, (str, os.PathLike)):
        experts = [experts]
    expert_files = [resolve_expert_file(e) for e in experts]     # before anything is patched or written
    family_of(model)
    if expert_files:
        compose_experts(model, expert_files, domains=expert_names, freeze_experts=freeze_experts,
                        execution=execution, gate_init=gate_init)
    elif not is_mode_patched(model):
        raise ValueError("run_mode_stage2: experts=[] and the model is not MoDE-patched: pass the stage-1 output "
                         "folders (experts=[...]) or a model from mixda_fast.compose_experts")
    elif freeze_experts is not None:
        mode_state(model).config.freeze_experts = bool(freeze_experts)
    output_dir.mkdir(parents=True, exist_ok=True)
    mark_trainable(model, "compose")
    trainer, timer, sources, causal, counts, metrics = _train(
        model, tokenizer, data, output_dir, fn="MoDE stage 2", max_length=max_length, training_args=training_args,
        resume_from_checkpoint=resume_from_checkpoint, callbacks=callbacks, gate_learning_rate=gate_learning_rate,
        eval_data=eval_data)
    files = {}
    if save and trainer.args.should_save:
        files.update(save_adapter_folder(model, output_dir, base_model_path, "experts"))
        write_run(output_dir, _manifest(
            model, trainer, 2, files, causal, list(data_sources or sources), counts, metrics, max_length,
            base_model_path, {"experts": [str(e) for e in experts], "expert_files": [str(f) for f in expert_files],
                              "freeze_experts": mode_state(model).config.freeze_experts, "gate_init": gate_init}))
    return ModeResult(model=model, trainer=trainer, timer=timer, output_dir=output_dir, files=files, metrics=metrics)


def load_mode_run(run_dir: Union[str, os.PathLike], base_model: Optional[str] = None):
    """(model, tokenizer, manifest) rebuilt from a MoDE stage-1 or stage-2 output folder;
    ``base_model`` overrides the checkpoint folder recorded in the manifest."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run.get("method", "mixda") != METHOD:
        raise ValueError(f"{str(run_dir)!r} is a MixDA run, not a MoDE one; rebuild it with "
                         "mixda_fast.training.load_run")
    base = base_model or run.get("base_model")
    if not base:
        raise ValueError(f"{str(run_dir)!r}: the manifest records no base model; pass base_model (--model)")
    model, tokenizer, _ = load_lm(base)
    from_pretrained(model, run_dir)
    model.eval()
    return model, tokenizer, run
