"""The ``mixda-fast`` command: ``bench`` (layer speed against the plain FFN) and ``info``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _tokens(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: expected BATCHxSEQ, e.g. 8x128") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: batch and sequence length must be >= 1")
    return b, t


def _bench(args: argparse.Namespace) -> int:
    import torch

    from . import benchmark, ops

    if args.backend:
        ops.set_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"mixda_fast layer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"backend {ops.get_backend()}, {'training step' if args.train else 'inference'}, gate {args.gate}")
    print("fraction of peak = layer FLOP/s / FLOP/s of a 2048^3 GEMM of the same dtype, same run\n")
    rows = benchmark.run_layer_bench(args.shape, args.dtype, args.domains, args.tokens, args.gate,
                                     args.train, args.reps)
    print(benchmark.format_table(rows))
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import info

    info.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixda-fast", description="Mixture-of-Domain-Adapters, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time a patched MixDA layer against the plain FFN",
                       description="Time one patched MixDA layer against the host's plain FFN "
                                   "(DESIGN.md section 5).")
    b.add_argument("--shape", nargs="+", default=["bert-base"], choices=["bert-base", "roberta-large", "llama-gated"])
    b.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    b.add_argument("--domains", nargs="+", type=int, default=[4], help="K values")
    b.add_argument("--tokens", nargs="+", type=_tokens, default=[(8, 128)], help="BATCHxSEQ, e.g. 8x128 16x1")
    b.add_argument("--gate", default="sequence", choices=["sequence", "token"])
    b.add_argument("--train", action="store_true", help="time forward + backward")
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    b.add_argument("--backend", choices=["auto", "cpp", "torch"], default=None)
    b.set_defaults(func=_bench)
    i = sub.add_parser("info", help="what was built and why anything is missing")
    i.set_defaults(func=_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
