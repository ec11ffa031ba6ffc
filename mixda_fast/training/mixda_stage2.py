"""Stage 2 of MixDA: a task on top of K frozen domain adapters (docs/design.md section 2).

The K domain adapters trained in stage 1 are loaded (frozen), a task adapter is added
(:mod:`~mixda_fast.task_adapters`: Pfeiffer after each FFN output, bottleneck = hidden
size // 16, swish; Houlsby after attention too), and the gate, the task adapter and the task
head train. Heads: sequence classification and multiple choice. With K = 1 the stage-1 gate is
loaded too (it was trained with that adapter); with K > 1 the gate is a fresh (K+1)-way gate, as
in the paper. Output folder: the adapter folder files (``adapter_config.json``,
``adapter_model.safetensors``: domain adapters + the gates trained here, ``README.md``; what
``mixda_fast.from_pretrained(base, run_dir)`` restores), ``task_adapters.safetensors``,
``head.safetensors``, ``mixda_run.json``; :func:`load_run` rebuilds the whole trained model
(patch, task adapters and head) from it, old folders (``mixda_adapters.safetensors``) too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch.nn as nn

from ..core.adapter_folder import check_writable, from_pretrained
from ..core.families import family_of
from ..core.io import HEAD, LM_HEAD
from ..core.model import count_parameters, head_parameters
from ..core.patch import is_patched, mark_trainable, patch_model
from ..mixda.config import MixDAConfig
from ..mixda.patching import patch_config
from ..mixda.saving import load_adapters
from ..task_adapters import add_task_adapters, has_task_adapters, load_task_adapters, save_task_adapters
from .data import TASKS, TaskCollator, encode_task, kshot_sample, load_task
from .lm_head import missing_head_keys
from .runs import load_head, load_lm, load_pretrained, read_run, save_adapter_folder, save_head, write_run
from .trainer import MixDATrainer, StageResult, StepTimer, classification_metrics, training_arguments

__all__ = ["build_stage2_model", "run_stage2", "load_run", "freeze_for_task", "Stage2Result", "task_model_class"]

logger = logging.getLogger(__name__)
_STRUCTURAL = ("layers", "reduction_factor", "adapter_input", "gate", "gate_hidden", "gate_layers", "mixing",
               "paper_gate_bug")


def task_model_class(task: str):
    import transformers as tf

    if task not in TASKS:
        raise ValueError(f"task={task!r} is not accepted: expected one of {' | '.join(map(repr, TASKS))}")
    return tf.AutoModelForSequenceClassification if task == "classification" else tf.AutoModelForMultipleChoice


def _domain_config(runs: list[tuple[Path, dict]]) -> MixDAConfig:
    first_dir, first = runs[0]
    base = MixDAConfig.from_dict(first["config"])
    names = []
    for d, run in runs:
        if run.get("stage") != 1:
            raise ValueError(f"domain adapter folder {str(d)!r} is a stage-{run.get('stage')} run; expected "
                             "a stage-1 output folder")
        cfg = MixDAConfig.from_dict(run["config"])
        diffs = [f"{k}: {getattr(cfg, k)!r} vs {getattr(base, k)!r}" for k in _STRUCTURAL
                 if k not in ("gate", "gate_hidden", "gate_layers") and getattr(cfg, k) != getattr(base, k)]
        if diffs:
            raise ValueError(f"domain adapter folders {str(first_dir)!r} and {str(d)!r} were trained with different "
                             f"patches ({'; '.join(diffs)}); stage 2 needs one patch layout for all domains")
        names.append(run["domain"])
    if len(set(names)) != len(names):
        raise ValueError(f"the domain adapter folders hold the domains {names}: each name may appear once")
    data = base.to_dict()
    data.update(domains=names, num_domains=len(names))
    return MixDAConfig.from_dict(data)


def build_stage2_model(base: Union[str, os.PathLike, nn.Module], *, task: str = "classification",
                       num_labels: int = 2, domain_runs: Sequence[Union[str, os.PathLike]] = (),
                       task_adapter: Optional[str] = "pfeiffer", reduction_factor: int = 16) -> nn.Module:
    """A task model (``base``: a local checkpoint folder, or a model with a task head) with the
    domain adapters of ``domain_runs`` (stage-1 output folders; none = no MixDA patch, the
    task-adapter-only baseline) loaded and frozen, and a fresh task adapter
    (``task_adapter=None``: none). Everything but gate, task adapter and head is frozen."""
    if isinstance(base, (str, os.PathLike)):
        if not os.path.isdir(base):
            raise FileNotFoundError(f"model path {str(base)!r} is not a folder; expected a local HuggingFace checkpoint")
        # Weights the checkpoint lacks (the task head, and e.g. BERT's pooler when the checkpoint
        # is a masked LM) are random: run_stage2 saves them with the head so load_run rebuilds them.
        # The head is expected to be new; anything else missing is reported in one line.
        model, missing = load_pretrained(task_model_class(task), base, num_labels=num_labels,
                                         expected=missing_head_keys)
        model._mixda_fresh_keys = sorted(missing)
    elif isinstance(base, nn.Module):
        model = base
    else:
        raise TypeError(f"build_stage2_model: base={base!r} is not accepted: expected a checkpoint folder or an nn.Module")
    if isinstance(domain_runs, (str, os.PathLike)):
        domain_runs = [domain_runs]
    runs = [(Path(d), read_run(d)) for d in domain_runs]
    if runs:
        model_type, _ = family_of(model)
        for d, run in runs:
            if run.get("model_type") != model_type:
                raise ValueError(f"domain adapter folder {str(d)!r} was trained on model_type="
                                 f"{run.get('model_type')!r}; this model is {model_type!r}")
        config = _domain_config(runs)
        if len(runs) == 1 and list(runs[0][1]["config"]["domains"]) == [runs[0][1]["domain"]]:
            from_pretrained(model, runs[0][0])            # stage 1's whole patch: the adapter and its gate
        else:
            patch_model(model, config)
            for d, run in runs:
                load_adapters(model, d / run["files"]["domain_adapter"], domain=run["domain"])
    if task_adapter is not None:
        add_task_adapters(model, task_adapter, reduction_factor)
    freeze_for_task(model)
    return model


def freeze_for_task(model: nn.Module) -> None:
    """Stage 2's trainable set: gates, task adapters and the head; on an unpatched model (the
    task-adapter-only baseline) the task adapters and the head."""
    if is_patched(model):
        mark_trainable(model, "task")
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if getattr(m, "is_task_adapter", False):
            m.requires_grad_(True)
    for p in head_parameters(model):
        p.requires_grad_(True)


@dataclass
class Stage2Result(StageResult):
    """What :func:`run_stage2` returns, with the label names in id order."""

    labels: list = field(default_factory=list)


def run_stage2(model: nn.Module, tokenizer, train, output_dir: Union[str, os.PathLike], *,
               task: str = "classification", labels: Optional[Sequence] = None, eval_data=None,
               k_shot: Optional[int] = None, seed: int = 0, max_length: int = 128,
               warmup_epochs: float = 2.0, training_args: Optional[dict] = None,
               resume_from_checkpoint: Union[None, bool, str] = None, callbacks: Sequence = (),
               base_model_path: Optional[str] = None, domain_runs: Sequence = (), save: bool = True,
               gate_learning_rate: Optional[float] = None) -> Stage2Result:
    """Train ``model`` (from :func:`build_stage2_model`) on a task file or a :func:`load_task`
    ``(dataset, labels)`` pair; ``k_shot``: keep k examples per class (seeded). ``eval_data``
    (file or pair) is evaluated after every epoch (accuracy, macro-F1). ``training_args``
    overrides :func:`training_arguments` (stage-2 defaults: lr 5e-4, 20 epochs, 2 warm-up epochs,
    AdamW with weight decay 0.05, linear decay). ``gate_learning_rate``: a peak learning rate
    for the gate alone."""
    if task not in TASKS:
        raise ValueError(f"run_stage2: task={task!r} is not accepted: expected one of {' | '.join(map(repr, TASKS))}")
    output_dir = Path(output_dir)
    if save:                             # refused now, not after training
        check_writable(output_dir, "run_stage2")
    output_dir.mkdir(parents=True, exist_ok=True)
    source = str(train) if isinstance(train, (str, os.PathLike)) else None
    train_ds, labels = load_task(train, task, labels) if isinstance(train, (str, os.PathLike)) else train
    if k_shot is not None:
        train_ds = kshot_sample(train_ds, k_shot, seed)
    train_ds = encode_task(train_ds, tokenizer, task=task, max_length=max_length)
    eval_ds = None
    if eval_data is not None:
        eval_ds, _ = load_task(eval_data, task, labels) if isinstance(eval_data, (str, os.PathLike)) else eval_data
        eval_ds = encode_task(eval_ds, tokenizer, task=task, max_length=max_length)
    overrides = dict(learning_rate=5e-4, num_train_epochs=20, seed=seed)
    if eval_ds is not None:
        overrides.update(eval_strategy="epoch")
    overrides.update(training_args or {})
    if "warmup_steps" not in overrides and "warmup_ratio" not in overrides and warmup_epochs:
        bs = overrides.get("per_device_train_batch_size", 16) * overrides.get("gradient_accumulation_steps", 1)
        overrides["warmup_steps"] = int(math.ceil(warmup_epochs * len(train_ds) / bs))
    args = training_arguments(str(output_dir), **overrides)
    timer = StepTimer()
    trainer = MixDATrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=TaskCollator(tokenizer, task), callbacks=[timer, *callbacks],
                           compute_metrics=classification_metrics, gate_learning_rate=gate_learning_rate)
    trainable, total = count_parameters(model)
    logger.info("stage 2: %s, %d examples, %d of %d parameters train", task, len(train_ds), trainable, total)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    metrics = {}
    if eval_ds is not None:
        metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    if save and args.should_save:
        files = {}
        if is_patched(model):
            files.update(save_adapter_folder(model, output_dir, base_model_path, "adapters"))
        if has_task_adapters(model):
            files["task_adapters"] = save_task_adapters(model, output_dir).name
        files["head"] = save_head(model, output_dir / "head.safetensors", HEAD, "run_stage2")
        write_run(output_dir, {
            "stage": 2, "base_model": base_model_path, "model_type": family_of(model)[0],
            "task": task, "labels": list(labels), "max_length": max_length, "files": files,
            "config": patch_config(model).to_dict() if is_patched(model) else None,
            "domain_runs": [str(d) for d in domain_runs], "train": source, "k_shot": k_shot, "seed": seed,
            "gate_learning_rate": gate_learning_rate,
            "trainable_parameters": trainable, "total_parameters": total, "metrics": metrics,
            "log_history": trainer.state.log_history,
        })
    return Stage2Result(model=model, trainer=trainer, timer=timer, output_dir=output_dir, labels=list(labels),
                        metrics=metrics)


def load_run(run_dir: Union[str, os.PathLike], base_model: Optional[str] = None):
    """(model, tokenizer, manifest) rebuilt from a stage-1 or stage-2 output folder;
    ``base_model`` overrides the checkpoint folder recorded in the manifest."""
    import transformers as tf

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    base = base_model or run.get("base_model")
    if not base:
        raise ValueError(f"{str(run_dir)!r}: the manifest records no base model; pass base_model (--model)")
    if run["stage"] == 1:
        model, tokenizer, _ = load_lm(base)
        from_pretrained(model, run_dir)
        if "lm_head" in run["files"]:
            load_head(model, run_dir / run["files"]["lm_head"], LM_HEAD)
    else:
        model, missing = load_pretrained(task_model_class(run["task"]), base, num_labels=len(run["labels"]),
                                         expected=lambda m, keys: keys)     # head.safetensors holds them
        model._mixda_fresh_keys = sorted(missing)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if run.get("config"):
            from_pretrained(model, run_dir)
        if "task_adapters" in run["files"]:
            load_task_adapters(model, run_dir / run["files"]["task_adapters"])
        load_head(model, run_dir / run["files"]["head"], HEAD)
    model.eval()
    return model, tokenizer, run
