"""Several domains (the paper's multi-domain claim): two knowledge bases ("places", "jobs"), each
trained alone in its own stage-1 run with the recipe, then composed in one model.

The composed model holds both domain adapters, frozen, and a fresh gate over them. Its gate is
trained alone (adapters and model frozen; a quarter of stage 1's steps) on both knowledge bases,
with L_old on general text: the one place where it can learn which text goes to which adapter.
Measured: fact exact-match per domain, composed against alone; the mean gate weight of each
expert per domain and text type (each domain's facts, held-out general text), averaged over the
patched layers; and stage 2 on the task with both adapters (the gate fresh again, as stage 2
builds it).
"""

from __future__ import annotations

import copy

import torch

from .quality_methods import Method, Seed, mean_gate_weights, mixda_config, run_mixda_stage1, train_task

__all__ = ["run_domains"]

DOMAIN_NAMES = ("places", "jobs")


def _compose(s: Seed, settings, runs: dict):
    """The masked LM with both domain adapters loaded (frozen) and a fresh gate."""
    from ..core.patch import patch_model
    from ..mixda.saving import load_adapters

    m = copy.deepcopy(s.mlm)
    torch.manual_seed(s.seed)                           # the fresh gate's initialisation
    patch_model(m, mixda_config(settings, {}, domains=list(runs)))
    for name, res in runs.items():
        load_adapters(m, res.output_dir / res.files["domain_adapter"], domain=name)
    return m


def _train_gate(m, s: Seed, settings) -> None:
    """The composed gate alone, on both knowledge bases with L_old (run_stage1's Trainer)."""
    import datasets

    from ..mixda.modules import MixDAGate
    from ..training.data import (KnowledgeCollator, Stage1Collator, encode_knowledge, encode_texts, load_knowledge,
                                 load_texts)
    from ..training.losses import Stage1Model
    from ..training.trainer import MixDATrainer, training_arguments
    from .quality_methods import stage1_args

    for p in m.parameters():
        p.requires_grad_(False)
    for g in (mod for mod in m.modules() if isinstance(mod, MixDAGate)):
        g.requires_grad_(True)
    kds = datasets.concatenate_datasets([load_knowledge(s.data.knowledge[d]) for d in DOMAIN_NAMES])
    ds = encode_knowledge(kds, s.tok, causal=False, max_length=settings.max_length)
    gen = encode_texts(load_texts(s.data.general_train), s.tok, max_length=settings.max_length)
    steps = max(1, settings.stage1_steps // 4)          # a small gate: a quarter of stage 1's steps
    args = training_arguments(str(s.out / "domains" / "gate"),
                              **dict(stage1_args(settings, settings.lr_mixda, s.seed), max_steps=steps))
    collator = Stage1Collator(KnowledgeCollator(s.tok, False, seed=s.seed), gen, settings.general_batch,
                              mask_general=settings.mask_general)
    torch.manual_seed(s.seed)
    MixDATrainer(model=Stage1Model(m, False, old_loss=settings.old_loss), args=args, train_dataset=ds,
                 data_collator=collator).train()
    m.eval()


def run_domains(s: Seed, settings, echo=print) -> dict:
    """Each domain alone, then composed: fact exact-match, gate weights, stage-2 accuracy."""
    from ..training.evaluate import fact_exact_match, hidden_states
    from ..training.mixda_stage2 import build_stage2_model

    kw = dict(max_length=settings.eval_length)
    runs, alone = {}, {}
    for d in DOMAIN_NAMES:
        m, res = run_mixda_stage1(s, settings, Method("mixda"), "domains", domain=d)
        runs[d] = res
        alone[d] = fact_exact_match(m, s.tok, s.data.knowledge[d], **kw)["exact_match"]
        del m
    m = _compose(s, settings, runs)
    _train_gate(m, s, settings)
    composed = {d: fact_exact_match(m, s.tok, s.data.knowledge[d], **kw)["exact_match"] for d in DOMAIN_NAMES}
    experts = list(DOMAIN_NAMES) + (["FFN"] if settings.mixing == "paper" else [])
    weights = {f"{d} facts": mean_gate_weights(m, lambda d=d: fact_exact_match(m, s.tok, s.data.knowledge[d], **kw))
               for d in DOMAIN_NAMES}
    weights["general text"] = mean_gate_weights(m, lambda: hidden_states(m, s.tok, s.data.general_eval, **kw))
    torch.manual_seed(s.seed)                           # the task adapter's and classifier's initialisation
    both = build_stage2_model(copy.deepcopy(s.cls), num_labels=len(s.data.labels),
                              domain_runs=[runs[d].output_dir for d in DOMAIN_NAMES])
    s2 = train_task(both, s, settings, settings.lr_stage2_adapters, "domains")
    echo(f"  domains: EM alone {alone}, composed {composed}; gate weights ({', '.join(experts)}): "
         + "; ".join(f"{k} {[round(w, 3) for w in v]}" for k, v in weights.items())
         + f"; task acc with both {s2['accuracy']:.3f}")
    ratio = {d: composed[d] / alone[d] if alone[d] > 0 else None for d in DOMAIN_NAMES}
    return {"alone": alone, "composed": composed, "ratio": ratio, "experts": experts, "gate_weights": weights,
            "stage2_both": {k: v for k, v in s2.items() if k != "history"}}
