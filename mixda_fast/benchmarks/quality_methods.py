"""The quality benchmark's contenders, each trained and measured the same way for one seed.

A contender is a :class:`Method`: MixDA (with its config and L_old overrides), PEFT LoRA at
MixDA's trainable-parameter count, full fine-tuning, or the task adapter alone. :func:`run_method`
trains its stage 1 on the "places" knowledge base (none for the task adapter alone) and its
stage 2 on the task, and returns the measures of both stages.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = ["Method", "Seed", "run_method", "stage1_measures", "seed_setup", "stage1_args", "train_task",
           "mixda_config", "patched_copy", "run_mixda_stage1", "mean_gate_weights"]


@dataclass(frozen=True)
class Method:
    """``kind``: "mixda", "lora", "full" or "adapter" (the task adapter alone). For MixDA,
    ``config`` overrides fields of the benchmark's MixDAConfig and ``stage1`` the keyword
    arguments of ``run_stage1`` (``old_loss``, ``old_weight``, ``gate_learning_rate``,
    ``mask_general``); ``settings`` overrides steps and learning rates for this contender."""

    kind: str
    config: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)      # QualitySettings fields this contender changes


@dataclass
class Seed:
    """What every contender of one seed starts from: the data, the masked LM with its fitted
    head, the classifier with its (seeded) fresh head, and the base model's measures."""

    seed: int
    data: object
    path: str
    mlm: torch.nn.Module
    tok: object
    cls: torch.nn.Module
    ref: list
    base: dict
    out: Path
    trainable: dict = field(default_factory=dict)     # MixDA's counts, for LoRA's rank


def mean_gate_weights(model, run) -> list:
    """The mean softmax weight of each expert over every gate row (sequence or token) of every
    patched layer in every forward call that ``run()`` makes (``mixda_fast.gate_weights``)."""
    from ..mixda.routing import gate_weights

    with gate_weights(model) as calls:
        run()
    seen = [w.reshape(-1, w.shape[-1]) for call in calls for w in call.values()]
    return torch.cat(seen).mean(0).tolist() if seen else []


def stage1_measures(model, s: Seed, settings) -> dict:
    """Fact exact-match (trained and held-out phrasings), drift and masked-LM loss on held-out
    general text; with paper mixing, the mean gate weight of the FFN (the last expert) on the
    facts and on general text."""
    from ..core.patch import is_patched
    from ..mixda.patching import patch_config
    from ..training.evaluate import fact_exact_match, general_drift, hidden_states, masked_lm_loss

    kw = dict(max_length=settings.eval_length)
    facts = s.data.knowledge["places"]
    out = {"em_trained": fact_exact_match(model, s.tok, facts, **kw)["exact_match"],
           "em_held_out": fact_exact_match(model, s.tok, s.data.held_out["places"], **kw)["exact_match"],
           "drift": general_drift(model, s.tok, s.data.general_eval, s.ref, measure="cosine", **kw),
           "drift_relative": general_drift(model, s.tok, s.data.general_eval, s.ref, **kw),
           "mlm_loss": masked_lm_loss(model, s.tok, s.data.general_eval, seed=s.seed, **kw)}
    if is_patched(model) and patch_config(model).mixing == "paper":
        out["gate_ffn_facts"] = mean_gate_weights(model, lambda: fact_exact_match(model, s.tok, facts, **kw))[-1]
        out["gate_ffn_general"] = mean_gate_weights(
            model, lambda: hidden_states(model, s.tok, s.data.general_eval, **kw))[-1]
    return out


def patched_copy(s: Seed, settings, method: Method, domain: str = "places"):
    """A copy of the seed's masked LM patched for ``method`` (seeded), before any training.
    ``settings.gate_ffn_logit`` (paper mixing; the experiment of issue 12, item 4) raises the
    FFN's gate logit, so that paper mixing starts near the unpatched model instead of halving
    every patched FFN."""
    from ..core.patch import patch_model
    from ..mixda.patching import mixda_modules

    m = copy.deepcopy(s.mlm)
    torch.manual_seed(s.seed)
    config = mixda_config(settings, method.config, [domain])
    patch_model(m, config)
    if settings.gate_ffn_logit and config.mixing == "paper":
        with torch.no_grad():
            for layer in mixda_modules(m).values():
                layer.gate[-1].bias[-1] += settings.gate_ffn_logit
    return m


def at_init_mlm_loss(s: Seed, settings, method: Method) -> float:
    """The masked-LM loss on held-out general text of the model just patched (before training)."""
    from ..training.evaluate import masked_lm_loss

    m = patched_copy(s, settings, method).eval()
    return masked_lm_loss(m, s.tok, s.data.general_eval, seed=s.seed, max_length=settings.eval_length)


def seed_setup(seed: int, settings, path: str, out: Path) -> Seed:
    """Data, the masked LM with a head fitted on general text, the classifier base, the base
    model's measures."""
    import transformers as tf

    from ..training.evaluate import hidden_states
    from ..training.lm_head import fit_mlm_head
    from ..training.runs import load_lm
    from .quality_data import build_quality_data

    data = build_quality_data(out / "data", classes=settings.classes, train_per_class=settings.train_per_class,
                              test_per_class=settings.test_per_class, people_jobs=settings.people_jobs,
                              general_train=settings.general_train, general_eval=settings.general_eval, seed=seed)
    torch.manual_seed(seed)                    # the head's fresh weights, then its fitting
    mlm, tok, _ = load_lm(path)
    fit_mlm_head(mlm, tok, data.general_train, steps=settings.head_steps, seed=seed)
    ref = hidden_states(mlm, tok, data.general_eval, max_length=settings.eval_length)
    torch.manual_seed(seed)
    cls = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.labels),
                                                                local_files_only=True)
    s = Seed(seed, data, path, mlm, tok, cls, ref, {}, out)
    s.base = stage1_measures(mlm, s, settings)
    return s


def stage1_args(settings, lr: float, seed: int) -> dict:
    return dict(max_steps=settings.stage1_steps, learning_rate=lr, per_device_train_batch_size=settings.stage1_batch,
                logging_steps=max(1, settings.stage1_steps // 20), seed=seed, disable_tqdm=True,
                warmup_steps=max(1, settings.stage1_steps // 20))


def train_task(model, s: Seed, settings, lr: float, name: str) -> dict:
    from ..core.model import count_parameters
    from ..training.data import load_task
    from ..training.evaluate import evaluate_task
    from ..training.mixda_stage2 import run_stage2

    train = load_task(s.data.task_train, labels=s.data.labels)
    torch.manual_seed(s.seed)
    args = dict(num_train_epochs=settings.stage2_epochs, learning_rate=lr, seed=s.seed, disable_tqdm=True,
                per_device_train_batch_size=settings.stage2_batch, logging_steps=5)
    res = run_stage2(model, s.tok, train, s.out / name / "stage2", seed=s.seed, max_length=settings.max_length,
                     training_args=args, save=False)
    test = evaluate_task(model, s.tok, s.data.task_test, labels=s.data.labels, max_length=settings.max_length)
    fit = evaluate_task(model, s.tok, s.data.task_train, labels=s.data.labels, max_length=settings.max_length)
    return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "train_accuracy": fit["accuracy"],
            "step_time": res.timer.median(), "trainable": count_parameters(model)[0],
            "history": res.log_history}


def mixda_config(settings, overrides: dict, domains=("places",)):
    from ..mixda.config import MixDAConfig

    fields = dict(layers=settings.layers, mixing=settings.mixing, reduction_factor=settings.reduction_factor,
                  gate_hidden=settings.gate_hidden, gate_layers=settings.gate_layers)
    fields.update(overrides)
    return MixDAConfig(domains=list(domains), **fields)


def run_mixda_stage1(s: Seed, settings, method: Method, name: str, domain: str = "places"):
    """Stage 1 of a MixDA contender on ``domain``'s knowledge; returns (model, result)."""
    from ..training.mixda_stage1 import run_stage1

    m = patched_copy(s, settings, method, domain)
    kw = dict(old_loss=settings.old_loss, old_weight=1.0, gate_learning_rate=settings.gate_lr,
              mask_general=settings.mask_general)
    kw.update(method.stage1)
    res = run_stage1(m, s.tok, s.data.knowledge[domain], s.out / name / f"stage1_{domain}",
                     general=s.data.general_train, domain=domain,
                     max_length=settings.max_length, general_batch_size=settings.general_batch,
                     training_args=stage1_args(settings, settings.lr_mixda, s.seed), base_model_path=s.path, **kw)
    return m, res


def run_method(name: str, method: Method, s: Seed, settings) -> dict:
    """Both stages of one contender for one seed: {"stage1": measures or None, "stage2": measures}."""
    from ..core.model import count_parameters
    from ..core.extras import require
    from ..training.baselines import lora_config, lora_rank_for, train_masked_lm
    from ..training.mixda_stage2 import build_stage2_model

    settings = replace(settings, **method.settings)
    cls = copy.deepcopy(s.cls)
    torch.manual_seed(s.seed)           # new modules (LoRA, the task adapter) start the same whatever ran before
    if method.kind == "adapter":
        return {"stage1": None, "stage2": train_task(build_stage2_model(cls, num_labels=len(s.data.labels)), s, settings,
                                                  settings.lr_stage2_adapters, name)}
    if method.kind == "mixda":
        m, res = run_mixda_stage1(s, settings, method, name)
        s1 = stage1_measures(m, s, settings)
        s1.update(step_time=res.timer.median(), trainable=count_parameters(m)[0], history=res.log_history,
                  mlm_loss_at_init=at_init_mlm_loss(s, settings, method))
        del m
        model = build_stage2_model(cls, num_labels=len(s.data.labels), domain_runs=[res.output_dir])
        s2 = train_task(model, s, settings, settings.lr_stage2_adapters, name)
        s.trainable.setdefault("stage1", s1["trainable"])
        s.trainable.setdefault("stage2", s2["trainable"])
        return {"stage1": s1, "stage2": s2, "rank": None}
    peft = require("peft", "bench", "the quality benchmark's LoRA contender")
    m = copy.deepcopy(s.mlm)
    rank = None
    if method.kind == "lora":
        if not s.trainable:
            raise ValueError("LoRA takes its rank from MixDA's trainable parameters: run the 'MixDA' contender "
                             "of this seed first")
        rank = lora_rank_for(m, s.trainable["stage1"])
        pm = peft.get_peft_model(m, lora_config(rank, extra="bench"))
        trained = pm.base_model.model
        lr = settings.lr_lora
    else:
        for p in m.parameters():
            p.requires_grad_(True)
        trained, lr = m, settings.lr_full
    torch.manual_seed(s.seed)
    res = train_masked_lm(trained, s.tok, s.data.knowledge["places"], s.out / name / "stage1",
                          max_length=settings.max_length, training_args=stage1_args(settings, lr, s.seed))
    s1 = stage1_measures(trained, s, settings)
    s1.update(step_time=res.timer.median(), trainable=count_parameters(trained)[0], history=res.log_history)
    encoder = pm.merge_and_unload() if method.kind == "lora" else m
    missing, unexpected = cls.base_model.load_state_dict(encoder.base_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):   # only the classifier's pooler is its own
        raise RuntimeError(f"stage 1's encoder does not fit the classifier: missing {missing}, unexpected {unexpected}")
    del m, encoder
    if method.kind == "lora":
        head = sum(p.numel() for p in cls.classifier.parameters())
        rank2 = lora_rank_for(cls, s.trainable["stage2"], extra=head)
        cls = peft.get_peft_model(cls, lora_config(rank2, "SEQ_CLS", ["classifier"], extra="bench"))
        rank = [rank, rank2]
        return {"stage1": s1, "stage2": train_task(cls, s, settings, settings.lr_stage2_lora, name), "rank": rank}
    for p in cls.parameters():
        p.requires_grad_(True)
    return {"stage1": s1, "stage2": train_task(cls, s, settings, settings.lr_stage2_full, name), "rank": None}
