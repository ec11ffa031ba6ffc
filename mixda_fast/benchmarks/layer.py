"""Layer speed as docs/design.md section 5 measures it: interleaved medians in one process.

The headline is the *fraction of peak*: a contender's FLOPs per second divided by those of a
2048^3 GEMM of the same dtype (1.0 is this machine's limit). For every case with at least 128
tokens the peak GEMM is timed *inside* the case's interleaved loop, so load from other processes
hits the layer and its peak alike; decode cases use the dtype's peak timed at the start.

Contenders, each one patched HuggingFace layer built from a config (no weights downloaded):

- ``plain``     the host's own FFN (the unpatched layer's arithmetic)
- ``paper``     MixDA in the paper's formulation, backend "torch" (the eager reference)
- ``compiled``  ``torch.compile`` of that same reference (compiled once per case, outside timing)
- ``folded``    the folded three-GEMM torch formulation, backend "torch"
- ``fused``     the layer as shipped: the fused formulation on the compiled kernels when the
                package has one, else its default formulation with backend "auto" (its label says which)

FLOPs count GEMMs only: FFN + K adapters + gate (the gate on B rows for the sequence gate, on every
token for the token gate). A training step is forward + backward as stage 1 runs it: host weights
frozen, adapters and gate trainable, the layer input requiring grad (a patched layer that is not
the first one passes gradients on), so step FLOPs = 2 x FFN + 3 x (adapters + gate): the host's
weight gradients are never computed. Decode cases (one token per sequence) are compared with the
weight-bytes floor = t(plain FFN) x bytes of every weight the layer reads / bytes of the FFN's.

``python -m mixda_fast.benchmarks.layer --help``; with no arguments it runs the default subset
(:data:`DEFAULT_CASES`) that the README's main job shows, prints the table and the targets and
writes a PNG plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .layer_report import CONTENDERS, LABELS, check_targets, format_table, format_targets, plot_rows
from .timing import PEAK_N, interleaved_medians, peak_flops, peak_gemm

__all__ = ["SHAPES", "DTYPES", "CONTENDERS", "CaseSpec", "DEFAULT_CASES", "Case", "interleaved_medians",
           "peak_flops", "build_case", "run_layer_bench", "format_table", "format_targets",
           "check_targets", "profile_case", "gemm_ceiling", "format_ceiling", "plot_rows", "main"]
# (format_table, check_targets, format_targets, plot_rows: layer_report.py, imported here for main)

logger = logging.getLogger(__name__)

# name -> (model_type, hidden d, intermediate ff). Any "family:DxFF" (e.g. "bert:64x256") also works.
SHAPES = {
    "bert-base": ("bert", 768, 3072),
    "roberta-large": ("roberta", 1024, 4096),
    "llama-gated": ("llama", 2048, 5632),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("inference", "training")

@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case; ``contenders`` None = all of :data:`CONTENDERS`."""

    shape: str = "bert-base"
    dtype: str = "fp32"
    domains: int = 4
    batch: int = 8
    seq: int = 128
    mode: str = "inference"
    gate: Optional[str] = None    # None: the host's default (sequence for BERT/RoBERTa, token for Llama)
    contenders: Optional[tuple[str, ...]] = None
    gate_dropout: float = 0.0     # the gate's dropout p; active in training cases only

    @property
    def gate_kind(self) -> str:
        """The gate ``patch_model`` gives this host: ``gate``, or the family's default for None."""
        from ..core.families import FAMILIES

        return self.gate or ("token" if FAMILIES[_shape_dims(self.shape)[0]].causal else "sequence")

    @property
    def tokens(self) -> str:
        return f"{self.batch}x{self.seq}"

    @property
    def decode(self) -> bool:
        return self.seq == 1


# The default run (no arguments): what the README's main job shows, <= 3 minutes on 2 cores with a
# cold torch.compile cache. bf16 at 1 x 128 rather than 8 x 128 (a bf16 GEMM runs at ~20 GFLOP/s on
# this AVX2-only CPU: 8 x 128 takes ~10 s per round of contenders), torch.compile only where a
# target names it (each cold compile costs ~25 s here), no bf16 training step by default (its
# backward goes through bf16 grad @ W GEMMs with a non-transposed B, ~50x slower than x @ W^T on
# this CPU: one step of one contender takes ~25-50 s at 8 x 128).
_NO_COMPILE = ("plain", "paper", "folded", "fused")
DEFAULT_CASES = (
    CaseSpec("bert-base", "fp32", 4, 16, 1, "inference", contenders=_NO_COMPILE),
    CaseSpec("bert-base", "fp32", 4, 8, 128, "inference", contenders=CONTENDERS),
    CaseSpec("bert-base", "bf16", 4, 16, 1, "inference", contenders=_NO_COMPILE),
    CaseSpec("bert-base", "bf16", 4, 1, 128, "inference", contenders=_NO_COMPILE),
    CaseSpec("bert-base", "fp32", 4, 8, 128, "training", contenders=CONTENDERS),
)


def _shape_dims(shape: str) -> tuple[str, int, int]:
    """(model_type, d, ff) of a name in SHAPES or of a "family:DxFF" string."""
    if shape in SHAPES:
        return SHAPES[shape]
    try:
        family, dims = shape.split(":")
        d, ff = (int(v) for v in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape={shape!r} is not accepted: expected one of {', '.join(SHAPES)} "
                         f"or 'family:DxFF' such as 'bert:64x256'") from None
    if family not in ("bert", "roberta", "llama") or d < 1 or ff < 1:
        raise ValueError(f"shape={shape!r} is not accepted: family must be bert, roberta or llama "
                         f"and D, FF >= 1")
    return family, d, ff


@dataclass
class Case:
    """A built case: zero-argument callables per contender (forward, or forward + backward)."""

    spec: CaseSpec
    fns: dict[str, Callable[[], object]]
    labels: dict[str, str]
    flops_plain: float                 # per call (x 2 for a training step: input gradients)
    flops_mixda: float                 # per call (FFN as above + 3 x adapters and gate in training)
    bytes_plain: int                   # the FFN's weights
    bytes_mixda: int                   # every weight the MixDA layer reads
    notes: list[str] = field(default_factory=list)
    compile_s: Optional[float] = None  # set by compile_now()
    compile_now: Optional[Callable[[], float]] = None
    layer: object = None               # the patched MixDAFFN (for profiling)


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


def _fused_choice(layer) -> tuple[str, str, Optional[str]]:
    """(formulation, label, note) of the fused contender: the layer's fused formulation when the
    package has one, else the layer's default formulation with backend "auto"."""
    forms = tuple(getattr(layer, "FORMULATIONS", ()) or ())
    if "fused" in forms:
        return "fused", "fused (cpp)", None
    default = layer.formulation
    if default not in ("paper", "folded"):
        return default, f"{default} (cpp)", None
    return default, f"layer {default} (auto)", (
        f"no fused MixDA formulation in this build: the 'fused' contender is the layer's default "
        f"formulation ({default!r}) with backend 'auto'")


def build_case(shape: str = "bert-base", dtype: str = "fp32", domains: int = 4, batch: int = 8,
               seq: int = 128, gate: Optional[str] = None, training: bool = False,
               contenders: Optional[Sequence[str]] = None, gate_dropout: float = 0.0) -> Case:
    """A one-layer host model of ``shape`` patched with K = ``domains`` adapters, and one callable
    per contender. Each callable sets the ops backend it needs; restore it afterwards
    (:func:`run_layer_bench` does). The compiled contender compiles on ``case.compile_now()``."""
    from .. import ops
    from ..mixda.config import MixDAConfig
    from ..core.patch import patch_model
    from ..mixda.patching import mixda_modules

    contenders = tuple(contenders or CONTENDERS)
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"contenders={sorted(unknown)} are not accepted: expected some of {CONTENDERS}")
    model_type, d, ff = _shape_dims(shape)
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    model = _tiny_host(model_type, d, ff).to(dt)
    patch_model(model, MixDAConfig(num_domains=domains, gate=gate, adapter_init="normal", gate_dropout=gate_dropout))
    layer = mixda_modules(model)[0]
    gate = layer.mixda_config.gate                 # None resolved by patch_model
    layer.gate.train(training)       # the gate's dropout (if any) on in training; the host stays in eval
    # Stage 1: host frozen, adapters + gate train (set directly: only this layer matters here).
    model.requires_grad_(False)
    trainable = [p for m in (layer.adapters, layer.gate) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(training)
    x = torch.randn(batch, seq, d, dtype=dt, requires_grad=training)   # (B, T, D)
    gy = torch.randn(batch, seq, d, dtype=dt)                           # upstream gradient

    def plain_fwd(x):
        host = layer.host
        return host.post(host.down(host.intermediate(x)))

    def step(fwd: Callable[[torch.Tensor], torch.Tensor], backend: str, form: Optional[str]):
        def fn():
            ops.set_backend(backend)
            if form is not None:
                layer.formulation = form
            if not training:
                return fwd(x)
            for p in trainable:
                p.grad = None
            x.grad = None
            y = fwd(x)
            y.backward(gy)
            return y
        return fn

    fused_form, fused_label, fused_note = _fused_choice(layer)
    fns: dict[str, Callable[[], object]] = {}
    labels = dict(LABELS, fused=fused_label)
    notes = [fused_note] if fused_note and "fused" in contenders else []
    case = Case(CaseSpec(shape, dtype, domains, batch, seq, "training" if training else "inference", gate,
                         contenders, gate_dropout), fns, labels, 0.0, 0.0, 0, 0, notes)
    for name in contenders:
        if name == "plain":
            fns[name] = step(plain_fwd, "torch", None)
        elif name == "paper":
            fns[name] = step(layer, "torch", "paper")
        elif name == "folded":
            fns[name] = step(layer, "torch", "folded")
        elif name == "fused":
            fns[name] = step(layer, "auto", fused_form)
        elif name == "compiled":
            holder: dict[str, Callable] = {}

            def compiled_fwd(x):
                return holder["fn"](x)

            def compile_now() -> float:
                """Compile the paper reference (backend "torch") and run it once (forward and
                backward in training); returns the seconds that took."""
                torch._dynamo.reset()    # a fresh cache per case: never hit the recompile limit
                holder["fn"] = torch.compile(lambda x: layer(x), dynamic=False)
                t0 = time.perf_counter()
                fns["compiled"]()
                case.compile_s = time.perf_counter() - t0
                return case.compile_s

            fns[name] = step(compiled_fwd, "torch", "paper")
            case.compile_now = compile_now

    # FLOPs from the actual weight matrices: 2 x rows x (in x out) per Linear.
    n = batch * seq
    host_mods = [layer.host_ffn] + ([layer.down_proj] if layer.down_proj is not None else [])
    host_params = {id(p): p for m in host_mods for p in m.parameters()}
    all_params = {id(p): p for p in layer.parameters()}
    ffn = 2.0 * n * sum(p.numel() for p in host_params.values() if p.dim() == 2)
    adapters = 2.0 * n * sum(p.numel() for p in layer.adapters.parameters() if p.dim() == 2)
    gate_rows = n if gate == "token" else batch
    gate_f = 2.0 * gate_rows * sum(p.numel() for p in layer.gate.parameters() if p.dim() == 2)
    if training:
        case.flops_plain, case.flops_mixda = 2 * ffn, 2 * ffn + 3 * (adapters + gate_f)
    else:
        case.flops_plain, case.flops_mixda = ffn, ffn + adapters + gate_f
    case.bytes_plain = sum(p.numel() * p.element_size() for p in host_params.values())
    case.bytes_mixda = sum(p.numel() * p.element_size() for p in all_params.values())
    case.layer = layer   # kept for profiling
    return case


def _cases_from_grid(shapes, dtypes, domains, tokens, gate, modes, contenders,
                     gate_dropout: float = 0.0) -> list[CaseSpec]:
    return [CaseSpec(s, dt, k, b, t, m, gate, tuple(contenders) if contenders else None, gate_dropout)
            for m in modes for s in shapes for dt in dtypes for k in domains for b, t in tokens]


def run_layer_bench(shapes: Sequence[str] = ("bert-base",), dtypes: Sequence[str] = ("fp32", "bf16"),
                    domains: Sequence[int] = (4,), tokens: Sequence[tuple[int, int]] = ((8, 128),),
                    gate: str = "sequence", training: bool = False, reps: int = 5, *,
                    cases: Optional[Sequence[CaseSpec]] = None, modes: Optional[Sequence[str]] = None,
                    contenders: Optional[Sequence[str]] = None, warmup: int = 1, min_time: float = 1.0,
                    peak_n: int = PEAK_N, progress: Optional[Callable[[str], None]] = None,
                    on_case: Optional[Callable[[Case], None]] = None) -> list[dict]:
    """Time every contender of each case, interleaved; one row (dict) per case and contender.

    ``cases`` (a list of :class:`CaseSpec`) overrides the grid shapes x dtypes x domains x tokens
    x modes (``modes`` None: "training" if ``training`` else "inference"). Row fields: shape, dtype,
    K, tokens, mode, gate, gate_dropout, contender (key), label, ms, gflops, frac_peak, frac_fp32_peak (16-bit
    cases: against the fp32 GEMM, the ceiling when kernels compute in fp32), overhead (t / t plain),
    fused_speedup (t / t fused), floor (t / weight-bytes floor, decode only), compile_s, peak_gflops.
    ``on_case(case)`` runs after each case's timing, inside its grad mode (e.g. to profile it).
    """
    from .. import ops

    if cases is None:
        modes = tuple(modes or ("training" if training else "inference",))
        cases = _cases_from_grid(shapes, dtypes, domains, tokens, gate, modes, contenders)
    say = progress or (lambda s: None)
    rows: list[dict] = []
    peaks: dict[str, float] = {}
    saved = ops.get_backend()
    try:
        for spec in cases:
            # fp32 too for 16-bit cases: kernels may compute 16-bit GEMMs in fp32 on CPUs without
            # native bf16, and then the fp32 GEMM is this machine's real ceiling.
            for dt in dict.fromkeys((spec.dtype, "fp32")):
                if dt not in peaks:
                    say(f"peak: {peak_n}^3 {dt} GEMM")
                    peaks[dt] = peak_flops(DTYPES[dt], peak_n, reps=3, warmup=1)
            train = spec.mode == "training"
            say(f"case: {spec.shape} {spec.dtype} K={spec.domains} {spec.tokens} {spec.mode}")
            case = build_case(spec.shape, spec.dtype, spec.domains, spec.batch, spec.seq, spec.gate,
                              train, spec.contenders, spec.gate_dropout)
            ctx = torch.enable_grad() if train else torch.inference_mode()
            with ctx:
                if case.compile_now is not None:
                    say("  torch.compile of the paper reference ...")
                    case.compile_now()
                fns = dict(case.fns)
                in_loop_peak = not spec.decode and spec.batch * spec.seq >= 128
                peak_flop = {}
                if in_loop_peak:
                    for dt in dict.fromkeys((spec.dtype, "fp32")):
                        fns[f"_peak_{dt}"], peak_flop[dt] = peak_gemm(DTYPES[dt], peak_n)
                times = interleaved_medians(fns, reps=reps, warmup=warmup, min_time=min_time)
                if on_case is not None:
                    on_case(case)
            peak = {dt: (peak_flop[dt] / times.pop(f"_peak_{dt}") if in_loop_peak else peaks[dt])
                    for dt in dict.fromkeys((spec.dtype, "fp32"))}
            rows.extend(_rows_of(case, times, peak[spec.dtype], peak_n, peak["fp32"]))
    finally:
        ops.set_backend(saved)
    return rows


def _rows_of(case: Case, times: dict[str, float], peak: float, peak_n: int = PEAK_N,
             peak_fp32: Optional[float] = None) -> list[dict]:
    s = case.spec
    t_plain = times.get("plain")
    t_fused = times.get("fused")
    decode = s.decode and s.mode == "inference"
    floor = t_plain * case.bytes_mixda / case.bytes_plain if (decode and t_plain) else None
    rows = []
    for name in CONTENDERS:
        if name not in times:
            continue
        sec = times[name]
        flops = case.flops_plain if name == "plain" else case.flops_mixda
        rows.append(dict(
            shape=s.shape, dtype=s.dtype, K=s.domains, tokens=s.tokens, mode=s.mode, gate=s.gate_kind,
            gate_dropout=s.gate_dropout, contender=name, label=case.labels[name], ms=sec * 1e3, gflops=flops / sec / 1e9,
            frac_peak=flops / sec / peak, peak_gflops=peak / 1e9, peak_n=peak_n,
            frac_fp32_peak=(flops / sec / peak_fp32 if peak_fp32 and s.dtype != "fp32" else None),
            overhead=sec / t_plain if t_plain else None,
            fused_speedup=sec / t_fused if t_fused else None,
            floor=sec / floor if floor else None,
            compile_s=case.compile_s if name == "compiled" else None,
            notes=list(case.notes)))
    return rows


def profile_case(case: Case, contenders: Sequence[str] = ("fused",), calls: int = 2, top: int = 15) -> str:
    """torch.profiler tables (ops by self CPU time, ``calls`` calls after one warm-up) of some
    contenders of a built case; call inside the case's grad mode."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name in contenders:
        fn = case.fns.get(name)
        if fn is None:
            continue
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
        s = case.spec
        out.append(f"profile: {s.shape} {s.dtype} K={s.domains} {s.tokens} {s.mode}, {case.labels[name]}, "
                   f"{calls} calls\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return "\n".join(out)


def gemm_ceiling(spec: CaseSpec, reps: int = 5, peak_n: int = PEAK_N) -> dict:
    """What the GEMMs alone allow: each GEMM of the fused formulation (docs/design.md section 4: the
    first GEMM, one GEMM over [W2 | Wdown_1..K], one over the packed [Wup_1..K], the gate MLP;
    in training also every input- and adapter-weight-gradient GEMM in the layout autograd uses)
    timed on its own as one ATen call, interleaved with the peak GEMM. Returns dict(flops,
    seconds, frac_peak, gemms={name: (flops, seconds)}): ``frac_peak`` is the layer's ceiling if it
    were nothing but these GEMMs back to back (adapters read the FFN's intermediate h)."""
    family, d, ff = _shape_dims(spec.shape)
    dt = DTYPES[spec.dtype]
    n, K, r, Dh = spec.batch * spec.seq, spec.domains, ff // 16, 768
    f1 = 2 * ff if family == "llama" else ff
    rows_g = n if spec.gate_kind == "token" else spec.batch
    R = torch.randn

    def lin(m, k, o):                         # (m, k) @ (o, k)^T, as nn.Linear
        a, w = R(m, k, dtype=dt), R(o, k, dtype=dt)
        return (lambda: F.linear(a, w)), 2.0 * m * k * o

    def mm(m, k, o):                          # (m, k) @ (k, o): autograd's grad @ W and W-gradients
        a, b = R(m, k, dtype=dt), R(k, o, dtype=dt)
        return (lambda: torch.mm(a, b)), 2.0 * m * k * o

    gate_dims = [(ff, Dh), (Dh, Dh), (Dh, Dh), (Dh, K + 1)]      # the released code's 4-Linear gate

    def chain(parts):                         # several GEMMs as one entry
        fns_, fl = zip(*parts)
        return (lambda: [f() for f in fns_]), sum(fl)

    g = {"x @ W1^T": lin(n, d, f1), "h @ [W2|Wdown]^T": lin(n, ff, d + K * r),
         "s @ [Wup]^T": lin(n, K * r, d), "gate MLP (4 Linear)": chain([lin(rows_g, i, o) for i, o in gate_dims])}
    if spec.mode == "training":
        if spec.dtype != "fp32":
            raise ValueError("gemm_ceiling: training ceilings are fp32 only (a 16-bit torch.mm with a "
                             "non-transposed B takes minutes on CPUs without native bf16)")
        g.update({"grad_s = gy @ Wup": mm(n, d, K * r), "grad Wup = gy^T s": mm(d, n, K * r),
                  "grad_h = gp @ [W2|Wdown]": mm(n, d + K * r, ff),
                  "grad Wdown = gp^T h": mm(K * r, n, ff), "grad_x = gu @ W1": mm(n, f1, d),
                  "gate MLP backward": chain([mm(rows_g, o, i) for i, o in gate_dims]
                                             + [mm(o, rows_g, i) for i, o in gate_dims])})
    fns = {k: v[0] for k, v in g.items()}
    fns["_peak"], peak_f = peak_gemm(dt, peak_n)
    with torch.inference_mode():
        t = interleaved_medians(fns, reps=reps, warmup=1)
    peak = peak_f / t.pop("_peak")
    flops = sum(v[1] for v in g.values())
    sec = sum(t.values())
    return dict(flops=flops, seconds=sec, frac_peak=flops / sec / peak,
                gemms={k: (g[k][1], t[k], g[k][1] / t[k] / peak) for k in g})


def format_ceiling(spec: CaseSpec, c: dict) -> str:
    lines = [f"GEMM-only ceiling: {spec.shape} {spec.dtype} K={spec.domains} {spec.tokens} {spec.mode}: "
             f"fraction of peak {c['frac_peak']:.2f} ({c['flops'] / 1e9:.2f} GFLOP in {c['seconds'] * 1e3:.1f} ms)"]
    for k, (fl, sec, frac) in c["gemms"].items():
        lines.append(f"  {k:<28}{fl / 1e9:>8.3f} GFLOP{sec * 1e3:>10.2f} ms   frac peak {frac:.2f}")
    return "\n".join(lines)


def _tokens_arg(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: expected BATCHxSEQ, e.g. 8x128") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: batch and sequence length must be >= 1")
    return b, t


def _shape_arg(text: str) -> str:
    try:
        _shape_dims(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _dropout_arg(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"--gate-dropout {text!r}: expected a probability in [0, 1)")
    return p


def build_parser(prog: str = "python -m mixda_fast.benchmarks.layer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time one patched MixDA layer against the host's plain FFN, the eager and "
                    "torch.compile'd paper formulation and the folded torch formulation "
                    "(docs/design.md section 5). With no grid arguments it runs the default subset: "
                    "BERT-base, K=4, fp32 16x1 and 8x128, bf16 16x1 and 1x128, inference, plus the "
                    "fp32 8x128 training step.")
    p.add_argument("--shape", nargs="+", type=_shape_arg, default=None,
                   help=f"{', '.join(SHAPES)} or family:DxFF (e.g. bert:64x256); default bert-base")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES), help="default fp32 bf16")
    p.add_argument("--domains", "-K", nargs="+", type=int, default=None, help="K values; default 4")
    p.add_argument("--tokens", nargs="+", type=_tokens_arg, default=None,
                   help="BATCHxSEQ, e.g. 16x1 (decode) 1x128 8x128; default 16x1 8x128")
    p.add_argument("--mode", nargs="+", choices=list(MODES), default=None, help="default inference")
    p.add_argument("--train", action="store_true", help="same as --mode training")
    p.add_argument("--gate", default=None, choices=["sequence", "token"],
                   help="default: the host's (sequence for BERT/RoBERTa shapes, token for the causal Llama)")
    p.add_argument("--gate-dropout", type=_dropout_arg, default=0.0,
                   help="the gate's dropout p in training cases (default 0; MixDAConfig's default is 0.2)")
    p.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=None,
                   help="default all (plain is always timed: it is the reference of x plain and x floor)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 5, --quick 2)")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep timing rounds until this many seconds passed (default 1, --quick 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--plot", default=os.path.join("bench_out", "layer_bench.png"), help="PNG path")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds, 1x128 instead of 8x128, no torch.compile, no training step "
                        "unless asked for")
    p.add_argument("--profile", nargs="*", choices=list(CONTENDERS), default=None,
                   help="after each case, print a torch.profiler table of these contenders (default: fused)")
    p.add_argument("--ceiling", action="store_true",
                   help="also time each GEMM of the fused formulation alone: the fraction of peak the "
                        "layer could reach if it were nothing but its GEMMs")
    p.add_argument("--peak-n", type=int, default=PEAK_N, help=argparse.SUPPRESS)
    return p


def _specs_from_args(args: argparse.Namespace) -> list[CaseSpec]:
    modes = list(args.mode or [])
    if args.train and "training" not in modes:
        modes.append("training")
    grid_given = any(v is not None for v in (args.shape, args.dtype, args.domains, args.tokens)) or bool(modes)
    contenders = tuple(args.contenders) if args.contenders else CONTENDERS
    if "plain" not in contenders:
        contenders = ("plain",) + contenders
    if args.no_compile or args.quick and not args.contenders:
        contenders = tuple(c for c in contenders if c != "compiled")
    if not grid_given:
        specs = list(DEFAULT_CASES)
        if args.quick:
            specs = [CaseSpec(s.shape, s.dtype, s.domains, s.batch if s.seq == 1 else 1, s.seq, s.mode, s.gate)
                     for s in specs if s.mode == "inference"]
        specs = [CaseSpec(s.shape, s.dtype, s.domains, s.batch, s.seq, s.mode, args.gate,
                          tuple(c for c in contenders if c in (s.contenders or CONTENDERS)), args.gate_dropout)
                 for s in specs]
        return list(dict.fromkeys(specs))
    default_tokens = [(16, 1), (1, 128)] if args.quick else [(16, 1), (8, 128)]
    return _cases_from_grid(args.shape or ["bert-base"], args.dtype or ["fp32", "bf16"], args.domains or [4],
                            args.tokens or default_tokens, args.gate, modes or ["inference"], contenders,
                            args.gate_dropout)


def _load() -> str:
    """The machine's load averages (other processes' share of the cores skews every timing)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m mixda_fast.benchmarks.layer") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = _specs_from_args(args)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 1.0)
    from .. import ops

    print(f"mixda_fast layer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"kernels {'built' if ops.kernels_available() else 'NOT built'}, {len(specs)} cases, "
          f"{reps} rounds (+1 warm-up), medians, interleaved; {_load()}", flush=True)
    print(f"fraction of peak = layer GEMM FLOP/s / FLOP/s of a {args.peak_n}^3 GEMM (x @ W^T) of the same dtype, "
          f"same run; training step = forward + backward, host frozen, FLOPs = 2 FFN + 3 (adapters + gate); "
          f"gate {args.gate or 'per host'}, gate dropout in training {args.gate_dropout:g}", flush=True)
    t0 = time.perf_counter()
    profiles: list[str] = []
    def collect_profile(case: Case) -> None:
        profiles.append(profile_case(case, args.profile or ("fused",)))

    on_case = collect_profile if args.profile is not None else None
    rows = run_layer_bench(cases=specs, reps=reps, warmup=1, min_time=min_time, peak_n=args.peak_n,
                           progress=lambda s: print("  " + s, file=sys.stderr, flush=True), on_case=on_case)
    print()
    print(format_table(rows))
    print()
    print(format_targets(rows))
    for text in profiles:
        print("\n" + text)
    if args.ceiling:
        for spec in specs:
            if spec.decode or (spec.mode == "training" and spec.dtype != "fp32"):
                continue
            print("\n" + format_ceiling(spec, gemm_ceiling(spec, reps=reps, peak_n=args.peak_n)))
    if not args.no_plot:
        print(f"\nplot: {plot_rows(rows, args.plot)}")
    print(f"took {time.perf_counter() - t0:.0f} s; {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
