"""MoDE demo: two generated domains plus a retention set, MoDE against full fine-tuning and PEFT LoRA.

    python -m mixda_fast.demo.mode [--out mode_demo.png] [--steps 150] [--seed 0]

Everything is generated and small, so it runs on a laptop CPU in a few minutes:

- Data. Sequences of a 64-token vocabulary, each starting with a marker token (0 = general,
  1 = domain A, 2 = domain B) and then following a first-order rule of that source: token t is
  followed by ``succ_source[t]`` with probability 0.9, else by a random token of the source's
  range. General text covers tokens 3..63; domain A tokens 3..32 and domain B tokens 33..63, each
  with its own successor table, so the domains contradict what the general text taught for the
  same tokens. The best possible next-token accuracy is about 0.9 + 0.1 / range.
- Backbone. A small Llama built from a config (d = 64, 6 layers) pretrained on general text only.
- Methods (same optimiser, learning rate and batch size; steps per phase ``--steps``):
  full fine-tuning on mixed A + B; PEFT LoRA r = 16 on the attention projections (q, k, v, o;
  the paper's baseline) on mixed A + B; MoDE (3 blocks, 2-layer experts copied from the backbone):
  stage 1 trains one expert per domain on its own corpus, stage 2 composes both behind 3-way
  gates and trains on mixed A + B (gates and experts). ``--replay p`` mixes a share p of general
  text into the mixed data of every method (no method sees general text by default, so nothing
  tells a gate to keep the backbone for it).
- Measured. Next-token accuracy on held-out A, B and general text (retention: what the backbone
  knew), trainable parameters, and milliseconds per training step (medians of steps timed
  round-robin across the methods in one process after training, so machine load hits all alike).

Prints a table and writes a PNG bar plot. This is an illustration on synthetic data, not a
reproduction of the paper's numbers.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.extras import require
import torch.nn.functional as F

from ..core.model import count_parameters
from ..core.patch import mark_trainable, patch_model
from ..mode import MoDEConfig, compose_experts, save_experts

logger = logging.getLogger(__name__)

VOCAB, SEQ = 64, 24
SOURCES = {"general": (0, 3, 64), "A": (1, 3, 33), "B": (2, 33, 64)}   # marker, first token, end


@dataclass
class Result:
    method: str
    acc: dict
    trainable: int
    ms_per_step: float


class Corpus:
    """The three token sources: a successor table per source, sampled with 10% noise."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.succ = {}
        for name, (_, lo, hi) in SOURCES.items():
            self.succ[name] = lo + torch.randperm(hi - lo, generator=g)   # token t (lo..hi) -> succ[t - lo]
        self.gen = g

    def sample(self, name: str, n: int) -> torch.Tensor:
        marker, lo, hi = SOURCES[name]
        seq = torch.empty(n, SEQ, dtype=torch.long)
        seq[:, 0] = marker
        seq[:, 1] = torch.randint(lo, hi, (n,), generator=self.gen)
        for t in range(2, SEQ):
            follow = self.succ[name][seq[:, t - 1] - lo]
            noise = torch.randint(lo, hi, (n,), generator=self.gen)
            keep = torch.rand(n, generator=self.gen) < 0.9
            seq[:, t] = torch.where(keep, follow, noise)
        return seq

    def mixed(self, names, n: int) -> torch.Tensor:
        parts = [self.sample(name, n // len(names)) for name in names]
        data = torch.cat(parts)
        return data[torch.randperm(len(data), generator=self.gen)]


def _backbone(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                            pad_token_id=0, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(config)


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits[:, 1:-1]   # predict tokens 2.. (after the marker)
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 2:].reshape(-1))


@torch.no_grad()
def accuracy(model, data: torch.Tensor) -> float:
    model.eval()
    correct = total = 0
    for batch in data.split(256):
        pred = model(input_ids=batch, use_cache=False).logits[:, 1:-1].argmax(-1)
        correct += int((pred == batch[:, 2:]).sum())
        total += pred.numel()
    return correct / total


def _optimizer(model, lr: float):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _step(model, opt, batch: torch.Tensor) -> None:
    loss = _loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train(model, data: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Plain AdamW loop over whatever requires grad."""
    opt = _optimizer(model, lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        _step(model, opt, data[torch.randint(0, len(data), (batch_size,), generator=g)])
    model.eval()


def step_times(models: dict, data: torch.Tensor, batch_size: int, rounds: int = 7,
               warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of one training step per model, timed round-robin in this process (so
    a change of machine load hits every method alike), on deep copies (the results stand)."""
    models = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: _optimizer(m, 1e-6) for k, m in models.items()}
    batch = data[:batch_size]
    times: dict[str, list] = {k: [] for k in models}
    for r in range(rounds + warmup):
        for k, m in models.items():
            t0 = time.perf_counter()
            _step(m, opts[k], batch)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run(steps: int = 120, pretrain_steps: int = 300, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
        replay: float = 0.0, n_train: int = 2048, n_eval: int = 256,
        timing_rounds: int = 15) -> tuple[list[Result], dict]:
    corpus = Corpus(seed)
    evals = {name: corpus.sample(name, n_eval) for name in SOURCES}
    train_data = {name: corpus.sample(name, n_train) for name in ("A", "B")}
    mixed = corpus.mixed(["A", "B"], n_train)
    if replay > 0:   # general text mixed into the multi-domain data every method trains on
        general = corpus.sample("general", int(round(n_train * replay / (1 - replay))))
        mixed = torch.cat([mixed, general])[torch.randperm(len(mixed) + len(general), generator=corpus.gen)]

    def evaluate(model):
        return {name: accuracy(model, data) for name, data in evals.items()}

    logger.info("pretraining the backbone on general text (%d steps)", pretrain_steps)
    base = _backbone(seed)
    train(base, corpus.sample("general", 4 * n_train), pretrain_steps, 2e-3, batch_size, seed)
    rows = [("backbone (no adaptation)", base, None)]

    logger.info("full fine-tuning on mixed data (%d steps)", 2 * steps)
    full = copy.deepcopy(base)
    mark_trainable(full, "all")
    train(full, mixed, 2 * steps, lr, batch_size, seed + 1)
    rows.append(("full fine-tuning", full, "full fine-tuning"))

    logger.info("PEFT LoRA r=16 on attention (%d steps)", 2 * steps)
    peft = require("peft", "demo", "the MoDE demo's LoRA baseline")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    train(lora, mixed, 2 * steps, lr, batch_size, seed + 1)
    rows.append(("LoRA r=16 (attention)", lora, "LoRA r=16"))

    logger.info("MoDE stage 1: one expert per domain (%d steps each); stage 2: compose (%d steps)", steps, steps)
    timed = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, name in enumerate(("A", "B")):
            m = patch_model(copy.deepcopy(base), MoDEConfig(num_blocks=3, domains=[name], expert_layers=2))
            mark_trainable(m, "domain")
            train(m, train_data[name], steps, lr, batch_size, seed + 2 + i)
            rows.append((f"MoDE expert {name} alone (stage 1)", m, "MoDE stage 1" if i == 0 else None))
            paths.append(save_experts(m, Path(tmp), domain=name))
        mode = compose_experts(copy.deepcopy(base), paths)
        mark_trainable(mode, "compose")
        train(mode, mixed, steps, lr, batch_size, seed + 4)
        rows.append(("MoDE composed (stage 2)", mode, "MoDE stage 2"))
        for execution in ("batched", "loop"):   # the same model with the other executions, timed only
            other = compose_experts(copy.deepcopy(base), paths, execution=execution)
            mark_trainable(other, "compose")
            timed[f"MoDE stage 2, execution={execution!r}"] = other
    logger.info("timing one training step of every method, round-robin")
    timed.update({key: m for _, m, key in rows if key})
    ms = step_times(timed, mixed, batch_size, rounds=timing_rounds)
    results = [Result(name, evaluate(m), 0 if m is base else count_parameters(m)[0], ms.get(key, float("nan")))
               for name, m, key in rows]
    ms["MoDE stage 2, execution='auto' (default)"] = ms.pop("MoDE stage 2")
    return results, {k: v for k, v in ms.items() if k.startswith("MoDE stage 2")}


def table(results: list[Result], stage_ms: dict) -> str:
    lines = [f"{'method':34s} {'acc A':>7s} {'acc B':>7s} {'general':>8s} {'trainable':>10s} {'ms/step':>8s}"]
    for r in results:
        lines.append(f"{r.method:34s} {r.acc['A']:7.3f} {r.acc['B']:7.3f} {r.acc['general']:8.3f} "
                     f"{r.trainable:10d} {r.ms_per_step:8.1f}")
    lines.append("")
    lines.append("ms per training step of MoDE stage 2 by execution (medians, timed round-robin with the rows above):")
    for k, v in stage_ms.items():
        lines.append(f"  {k:42s} {v:8.1f}")
    lines.append("(best possible accuracy is about 0.90; 'general' is retention of what the backbone knew)")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.method for r in results]
    keys = ("A", "B", "general")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar([i + k * width for i in range(len(names))], [r.acc[key] for r in results], width,
               label="retention (general)" if key == "general" else f"domain {key}")
    ax.set_xticks([i + width for i in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("next-token accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("MoDE vs full fine-tuning vs LoRA (r=16, attention) on generated domains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixda_fast.demo.mode", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="mode_demo.png", help="PNG plot to write (default: mode_demo.png)")
    parser.add_argument("--steps", type=int, default=120, help="training steps per MoDE stage; the baselines "
                        "train 2x this on mixed data, as many as MoDE's two stages (default 120)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="backbone pretraining steps (default 300)")
    parser.add_argument("--replay", type=float, default=0.0, help="share of general text in the mixed-domain data "
                        "that the baselines and MoDE stage 2 train on (default 0: domains A and B only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: on a small, "
                        "shared CPU, small ops with several OpenMP threads can stall many times over)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not 0.0 <= args.replay < 1.0:
        parser.error(f"--replay={args.replay} is not accepted: expected a share in [0, 1)")
    results, stage_ms = run(steps=args.steps, pretrain_steps=args.pretrain_steps, lr=args.lr, seed=args.seed,
                            replay=args.replay)
    print(table(results, stage_ms))
    plot(results, Path(args.out))
    print(f"\nplot: {args.out}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
