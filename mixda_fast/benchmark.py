"""Layer speed as DESIGN.md section 5 measures it: interleaved medians in one process.

The headline is the *fraction of peak*: a contender's FLOPs per second divided by those of a
2048^3 GEMM of the same dtype timed in the same run (1.0 is this machine's limit). The FFN
under test comes from a real HuggingFace layer built from a config (no weights downloaded).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["SHAPES", "Case", "interleaved_medians", "peak_flops", "build_case", "run_layer_bench",
           "format_table"]

# name -> (model_type, hidden d, intermediate ff)
SHAPES = {
    "bert-base": ("bert", 768, 3072),
    "roberta-large": ("roberta", 1024, 4096),
    "llama-gated": ("llama", 2048, 5632),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2,
                        min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each fn, timing them round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    while r < reps or time.perf_counter() - start < min_time:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        r += 1
    return {k: statistics.median(v) for k, v in times.items()}


def peak_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n^3 GEMM in the layout every nn.Linear uses (x @ W^T). On CPUs without
    native bf16 dot products, torch.mm(a, b) in bf16 takes a path ~50x slower than x @ W^T, which
    would flatter every bf16 figure; the layout layers actually use is the fair peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = interleaved_medians({"gemm": lambda: torch.nn.functional.linear(a, b)}, reps=reps)["gemm"]
    return 2 * n**3 / t


@dataclass
class Case:
    shape: str
    dtype: str
    domains: int
    batch: int
    seq: int
    gate: str
    plain: Callable[[], torch.Tensor]
    contenders: dict[str, Callable[[], torch.Tensor]]
    flops_plain: float
    flops_mixda: float


def _tiny_host(model_type: str, d: int, ff: int):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=d, intermediate_size=ff, num_hidden_layers=1,
                  num_attention_heads=max(1, d // 64))
    if model_type == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=max(1, d // 256), **common)
    elif model_type == "roberta":
        cfg = tf.RobertaConfig(pad_token_id=1, **common)
    else:
        cfg = tf.BertConfig(**common)
    return tf.AutoModel.from_config(cfg).eval()


def build_case(shape: str = "bert-base", dtype: str = "fp32", domains: int = 4, batch: int = 8,
               seq: int = 128, gate: str = "sequence", training: bool = False) -> Case:
    """A one-layer host model of ``shape``, its plain FFN and the patched MixDA layer."""
    from .config import MixDAConfig
    from .patching import mixda_modules, patch_model

    model_type, d, ff = SHAPES[shape]
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    model = _tiny_host(model_type, d, ff).to(dt)
    patch_model(model, MixDAConfig(num_domains=domains, gate=gate, adapter_init="normal", gate_dropout=0.0))
    layer = mixda_modules(model)[0]
    x = torch.randn(batch, seq, d, dtype=dt, requires_grad=training)

    def plain_ffn():
        h = layer.host_intermediate(x)
        return layer._post(layer._down()(h))

    def run(form: str):
        def fn():
            layer.formulation = form
            y = layer(x)
            if training:
                y.float().sum().backward()
            return y
        return fn

    def run_plain():
        y = plain_ffn()
        if training:
            y.float().sum().backward()
        return y

    n = batch * seq
    r = layer.bottleneck
    ffn = 2 * n * d * ff * (3 if model_type == "llama" else 2)
    z = ff if layer.mixda_config.adapter_input == "intermediate" else d
    gate_rows = n if gate == "token" else batch
    gate_flops = 2 * gate_rows * (z * 768 + 2 * 768 * 768 + 768 * (domains + 1))
    mixda = ffn + 2 * n * domains * r * (z + d) + gate_flops
    mult = 3 if training else 1
    return Case(shape, dtype, domains, batch, seq, gate, run_plain,
                {"paper (eager)": run("paper"), "folded (torch)": run("folded")},
                ffn * mult, mixda * mult)


def run_layer_bench(shapes: Sequence[str] = ("bert-base",), dtypes: Sequence[str] = ("fp32", "bf16"),
                    domains: Sequence[int] = (4,), tokens: Sequence[tuple[int, int]] = ((8, 128),),
                    gate: str = "sequence", training: bool = False, reps: int = 10) -> list[dict]:
    """Time plain FFN and every contender for each case; rows for :func:`format_table`."""
    rows = []
    peaks = {dt: peak_flops(DTYPES[dt]) for dt in dtypes}
    for shape in shapes:
        for dt in dtypes:
            for k in domains:
                for b, t in tokens:
                    case = build_case(shape, dt, k, b, t, gate, training)
                    ctx = torch.enable_grad() if training else torch.inference_mode()
                    with ctx:
                        times = interleaved_medians({"plain FFN": case.plain, **case.contenders}, reps=reps)
                    for name, sec in times.items():
                        flops = case.flops_plain if name == "plain FFN" else case.flops_mixda
                        rows.append(dict(shape=shape, dtype=dt, K=k, tokens=f"{b}x{t}", contender=name,
                                         ms=sec * 1e3, frac_peak=flops / sec / peaks[dt],
                                         overhead=sec / times["plain FFN"]))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'shape':<14}{'dtype':<6}{'K':>3} {'tokens':<9}{'contender':<18}{'ms':>9}{'frac peak':>11}{'x plain':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<14}{r['dtype']:<6}{r['K']:>3} {r['tokens']:<9}{r['contender']:<18}"
                     f"{r['ms']:>9.3f}{r['frac_peak']:>11.2f}{r['overhead']:>9.2f}")
    return "\n".join(lines)
