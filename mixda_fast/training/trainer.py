"""HuggingFace ``Trainer`` for both MixDA stages (docs/design.md section 2).

``MixDATrainer`` is a plain ``transformers.Trainer`` with three changes:

- ``compute_loss``: for a :class:`~mixda_fast.training.losses.Stage1Model` the loss is
  ``knowledge_weight * L_knowledge + old_weight * L_old`` (lambda = 0.5 and 1, the paper's), and
  both terms are logged; any other model (stage 2) uses the Trainer's own loss.
- checkpoints hold only the trainable parameters (adapters, gates, task adapters, head; everything
  for full fine-tuning) in ``trainable.safetensors``, plus the Trainer's optimizer, scheduler, RNG
  and state files, so ``resume_from_checkpoint`` works and a checkpoint of a 22M-parameter model
  with 1M trainable parameters takes 4 MB, not 90;
- a :class:`StepTimer` callback records the wall time of every optimizer step.

Everything else (``accelerate`` / ``torchrun`` across devices, tqdm, gradient accumulation, the
linear schedule) is the Trainer's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import transformers

from .losses import Stage1Model
from ..core.validate import check_float
from ..core.extras import require
from ..core.model import gate_parameters
from ..core.patch import attribute_set, is_patched
from ..core.io import TRAINABLE, load_into, read_safetensors, save_tensors

__all__ = ["MixDATrainer", "StepTimer", "classification_metrics", "accuracy_and_macro_f1",
           "training_arguments", "fp16_supported", "TRAINABLE_FILE"]

TRAINABLE_FILE = "trainable.safetensors"


def accuracy_and_macro_f1(preds, labels) -> dict[str, float]:
    """Accuracy and macro-averaged F1: the F1 of each class present in ``labels`` or ``preds``,
    averaged (scikit-learn's default label set)."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"accuracy_and_macro_f1: preds has {preds.size} entries, labels {labels.size}")
    if labels.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    classes = np.union1d(np.unique(labels), np.unique(preds))
    f1s = []
    for c in classes:
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s))}


def classification_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for Trainer: accuracy and macro-F1 from logits (B, C)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return accuracy_and_macro_f1(np.argmax(logits, axis=-1), labels)


DEFAULT_SEED = 0


def seed_before_init(training_args: Optional[dict]) -> int:
    """``transformers.set_seed`` with the run's seed *before* any module is created (patch,
    heads, task adapters): Trainer seeds only when it starts, after the adapters were drawn."""
    seed = (training_args or {}).get("seed", DEFAULT_SEED)
    transformers.set_seed(seed)
    return seed


def training_arguments(output_dir: str, **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` with the paper's optimiser (AdamW, weight decay 0.05, linear decay)
    and CPU-friendly defaults; keyword arguments override any of them."""
    require("accelerate", "train", "training (transformers.Trainer)")
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir), learning_rate=1e-4, weight_decay=0.05, lr_scheduler_type="linear",
        per_device_train_batch_size=16, per_device_eval_batch_size=32, num_train_epochs=10,
        logging_steps=10, save_strategy="no", report_to="none", remove_unused_columns=False,
        dataloader_pin_memory=False, disable_tqdm=False, seed=DEFAULT_SEED,
        # Without a GPU (or other accelerator), use_cpu lets `torchrun --nproc_per_node N` run
        # N CPU processes under DDP (gloo); without it Trainer stays single-process on CPU.
        use_cpu=not _accelerator_available(),
    )
    kw.update(overrides)
    if kw.get("fp16") and not fp16_supported():
        raise ValueError("training_arguments: fp16=True is not accepted on this machine: fp16 mixed precision needs "
                         "a GPU (on CPU Trainer would silently train in float32); use bf16=True (CPU autocast)")
    import inspect

    accepted = set(inspect.signature(transformers.TrainingArguments.__init__).parameters)
    unknown = sorted(k for k in kw if k not in accepted)
    if unknown:
        raise TypeError(f"training_arguments: {unknown} are not TrainingArguments fields")
    return transformers.TrainingArguments(**kw)


def fp16_supported() -> bool:
    """Whether Trainer can train in fp16 mixed precision here: on an accelerator (accelerate
    checks that it has fp16 autocast). On CPU accelerate keeps no loss scaler and no fp16
    autocast, so ``fp16=True`` would silently train in float32; bf16 autocast runs on CPU."""
    return _accelerator_available()


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


class StepTimer(transformers.TrainerCallback):
    """Wall time (seconds) of every optimizer step, in ``.times``."""

    def __init__(self):
        self.times: list[float] = []
        self._t0: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

    def median(self, skip: int = 2) -> Optional[float]:
        """The median step time after ``skip`` warm-up steps (all steps when there are no more;
        None when no step was timed)."""
        t = self.times[skip:] if len(self.times) > skip else self.times
        return float(np.median(t)) if t else None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not isinstance(model, Stage1Model):
        model = model.module
    return model


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _quantized_with_adapters(model) -> contextlib.AbstractContextManager:
    """transformers' Trainer refuses a quantized model ("purely quantized") unless it carries PEFT
    adapters, which it reads from ``_hf_peft_config_loaded`` once, while it is built. A patched
    quantized model with trainable parameters (adapters, gates, head) is such a model: the flag
    is set for that check only."""
    if (getattr(model, "is_quantized", False) and is_patched(model) and hasattr(model, "_hf_peft_config_loaded")
            and any(p.requires_grad for p in model.parameters())):
        return attribute_set([model], "_hf_peft_config_loaded", True)
    return contextlib.nullcontext()


class MixDATrainer(transformers.Trainer):
    """``Trainer`` whose ``compute_loss`` adds ``knowledge_weight * L_knowledge + old_weight *
    L_old`` for stage 1 and whose checkpoints hold the trainable parameters only. With
    ``args.log_level`` "warning" or above it prints nothing per step (the log history is kept)."""

    def __init__(self, *args, knowledge_weight: float = 0.5, old_weight: float = 1.0,
                 gate_learning_rate: Optional[float] = None, **kwargs):
        for name, value in (("knowledge_weight", knowledge_weight), ("old_weight", old_weight)):
            check_float(f"MixDATrainer: {name}", value, 0.0)
        model = kwargs.get("model", args[0] if args else None)
        if gate_learning_rate is not None:      # None: the learning rate of everything else
            check_float("MixDATrainer: gate_learning_rate", gate_learning_rate, 0.0, lo_open=True)
            if model is not None and not any(p.requires_grad for p in gate_parameters(model)):
                raise ValueError(f"MixDATrainer: gate_learning_rate={gate_learning_rate!r} is not accepted: the model "
                                 "has no trainable gate parameter (no gate, a frozen one, or a gate of one entry)")
        self.gate_learning_rate = gate_learning_rate
        with _quantized_with_adapters(model):
            super().__init__(*args, **kwargs)
        if self.args.log_level in ("warning", "error", "critical"):     # quiet: no progress bar, no per-step dicts
            self.remove_callback(transformers.trainer_callback.PrinterCallback)
            self.remove_callback(transformers.trainer_callback.ProgressCallback)
        self.knowledge_weight = float(knowledge_weight)
        self.old_weight = float(old_weight)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False     # our losses are per-batch means
        self._components: dict[str, list[float]] = {"loss_knowledge": [], "loss_old": []}

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not isinstance(_unwrap(model), Stage1Model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        out = model(**inputs)
        loss = self.knowledge_weight * out["loss_knowledge"] + self.old_weight * out["loss_old"]
        if model.training:
            for k in self._components:
                self._components[k].append(float(out[k].detach()))
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            for k, v in self._components.items():
                if v:
                    logs[k] = round(float(np.mean(v)), 6)
                    v.clear()
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with ``gate_learning_rate`` the gate parameters (MixDA gates,
        MoDE block gates) get their own peak learning rate (the schedule scales every group alike)."""
        if self.gate_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        gate = {id(p) for p in gate_parameters(opt_model)}
        groups: dict = {}
        for n, p in opt_model.named_parameters():
            if p.requires_grad:
                lr = self.gate_learning_rate if id(p) in gate else self.args.learning_rate
                groups.setdefault((lr, self.args.weight_decay if n in decay else 0.0), []).append(p)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        self.optimizer = optimizer_cls([{"params": ps, "lr": lr, "weight_decay": wd}
                                        for (lr, wd), ps in groups.items()], lr=self.args.learning_rate, **kwargs)
        return self.optimizer

    # -- checkpoints: trainable parameters only ---------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, TRAINABLE_FILE)
        save_tensors(_trainable(_unwrap(self.model)), path, {"format": TRAINABLE}, "MixDATrainer._save")
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = _unwrap(model if model is not None else self.model)
        path = os.path.join(resume_from_checkpoint, TRAINABLE_FILE)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _, tensors = read_safetensors(Path(path), TRAINABLE, "MixDATrainer._load_from_checkpoint")
        load_into(_trainable(model), tensors, f"resume_from_checkpoint={resume_from_checkpoint!r}: {path!r}")

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, TRAINABLE_FILE)):
            self._load_from_checkpoint(best)
        else:
            super()._load_best_model()


@dataclass
class StageResult:
    """What a stage's ``run_*`` returns: the trained model, its Trainer and step timer, the
    output folder, the files written there (name by role) and the evaluation metrics."""

    model: nn.Module
    trainer: Any
    timer: StepTimer
    output_dir: Path
    files: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def log_history(self) -> list[dict]:
        return self.trainer.state.log_history
