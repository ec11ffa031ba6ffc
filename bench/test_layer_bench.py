"""One patched MixDA layer against the plain FFN, the eager and compiled paper formulation and
the folded torch formulation, over docs/design.md section 5's grid (shapes x K x tokens x dtype x
inference / training step). Every contender of a case shares one pytest-benchmark group,
``{shape}-{dtype}-K{K}-T{tokens}-{mode}``, so each group's table reads as a speed-up.

``extra_info`` of every benchmark holds the case's GEMM FLOPs and its fraction of peak (against
a 2048^3 GEMM of the same dtype, timed once per session), see ``--benchmark-json``. For the
interleaved measurement with targets and a plot, use ``python -m mixda_fast.benchmarks.layer``.
"""

from __future__ import annotations

import pytest
import torch

from mixda_fast.benchmarks import layer as mb
from mixda_fast import ops

KS = (1, 2, 4, 8)
TOKENS = ((16, 1), (1, 128), (8, 128))
# Rough GEMM rates of a 2-core AVX2 machine, only to mark slow cases (bf16 backward multiplies by
# non-transposed weights, a path ~50x slower than x @ W^T on CPUs without native bf16).
_RATE = {("fp32", "inference"): 40e9, ("fp32", "training"): 35e9,
         ("bf16", "inference"): 8e9, ("bf16", "training"): 0.8e9}


def _estimate_s(spec: mb.CaseSpec) -> float:
    family, d, ff = mb.SHAPES[spec.shape]
    n = spec.batch * spec.seq
    ffn = 2 * n * d * ff * (3 if family == "llama" else 2)
    adapters = 2 * n * spec.domains * (ff // 16) * (ff + d)
    adapters += 2 * n * (ff * 768 + 2 * 768 * 768) if spec.gate_kind == "token" else 0   # the paper's gate MLP
    flops = ffn + adapters if spec.mode == "inference" else 2 * ffn + 3 * adapters
    return flops / _RATE[(spec.dtype, spec.mode)]


def _specs():
    """The grid with each host's default gate (sequence for BERT/RoBERTa, token for the causal
    Llama), then the per-token gate (with its default dropout in training, p = 0.2) on BERT-base,
    K = 4, against which the sequence gate's groups read as the price of per-token mixing."""
    for shape in mb.SHAPES:
        for dtype in mb.DTYPES:
            for mode in mb.MODES:
                for k in KS:
                    for b, t in TOKENS:
                        yield mb.CaseSpec(shape, dtype, k, b, t, mode)
    for dtype in mb.DTYPES:
        for mode in mb.MODES:
            for b, t in TOKENS[1:]:
                yield mb.CaseSpec("bert-base", dtype, 4, b, t, mode, "token",
                                  gate_dropout=0.2 if mode == "training" else 0.0)


def _group(spec: mb.CaseSpec) -> str:
    """The case's pytest-benchmark group (and the start of its tests' ids)."""
    gate = "" if spec.gate is None else f"-{spec.gate}gate"
    return f"{spec.shape}-{spec.dtype}-K{spec.domains}-T{spec.tokens}-{spec.mode}{gate}"


def _params():
    out = []
    for spec in _specs():
        huge = _estimate_s(spec) > 0.5
        for c in mb.CONTENDERS:                          # contenders innermost: one case built at a time
            marks = [pytest.mark.huge] if huge else []
            if c == "compiled" and spec.domains != 4:
                marks.append(pytest.mark.compile)
            out.append(pytest.param(spec, c, marks=marks, id=f"{_group(spec)}-{c}"))
    return out


_cache: dict = {}


def _case(spec: mb.CaseSpec) -> mb.Case:
    """The built case, kept while its contenders run (one case in memory at a time)."""
    if spec not in _cache:
        _cache.clear()
        _cache[spec] = mb.build_case(spec.shape, spec.dtype, spec.domains, spec.batch, spec.seq,
                                     spec.gate, spec.mode == "training", gate_dropout=spec.gate_dropout)
    return _cache[spec]


@pytest.fixture(scope="session")
def peaks():
    return {name: mb.peak_flops(dt) for name, dt in mb.DTYPES.items()}


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = ops.get_backend()
    yield
    ops.set_backend(saved)


@pytest.mark.parametrize("spec,contender", _params())
def test_layer(benchmark, peaks, spec: mb.CaseSpec, contender: str):
    case = _case(spec)
    benchmark.group = _group(spec)
    benchmark.name = case.labels[contender]
    training = spec.mode == "training"
    with torch.enable_grad() if training else torch.inference_mode():
        if contender == "compiled" and case.compile_s is None:
            case.compile_now()                      # compile + first call, outside timing
            benchmark.extra_info["compile_s"] = case.compile_s
        fn = case.fns[contender]
        rounds = max(3, min(20, int(2.0 / max(_estimate_s(spec), 1e-3))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    flops = case.flops_plain if contender == "plain" else case.flops_mixda
    benchmark.extra_info.update(gemm_flops=flops, label=case.labels[contender],
                                frac_peak=flops / benchmark.stats.stats.median / peaks[spec.dtype])
