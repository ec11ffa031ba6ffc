"""The layer benchmark's logic (mixda_fast.benchmarks.layer) on tiny shapes: cases, FLOP and byte
counts, rows, table, targets, plot, command line. No timing is asserted anywhere."""

from __future__ import annotations

import pytest
import torch

from mixda_fast.benchmarks import layer as mb
from mixda_fast import ops

TINY = "bert:32x128"          # d 32, ff 128: bottleneck 8
FAST = dict(reps=1, warmup=0, min_time=0.0, peak_n=64)
ROW_FIELDS = {"shape", "dtype", "K", "tokens", "mode", "gate", "contender", "label", "ms", "gflops",
              "frac_peak", "frac_fp32_peak", "peak_gflops", "overhead", "fused_speedup", "floor", "compile_s"}


def test_shape_names():
    assert mb._shape_dims("bert-base") == ("bert", 768, 3072)
    assert mb._shape_dims("llama:64x176") == ("llama", 64, 176)
    with pytest.raises(ValueError, match="family:DxFF"):
        mb._shape_dims("gpt9")


@pytest.mark.parametrize("family,gate", [("bert", "sequence"), ("bert", "token"), ("bert", None), ("llama", "token"),
                                         ("llama", None)])
def test_flop_and_byte_counts(family, gate):
    d, ff, K, B, T = 32, 128, 2, 3, 5
    case = mb.build_case(f"{family}:{d}x{ff}", "fp32", K, B, T, gate, contenders=("plain",))
    assert case.spec.gate_kind == case.layer.mixda_config.gate == (gate or ("token" if family == "llama" else "sequence"))
    n, r = B * T, ff // 16
    ffn = 2 * n * d * ff * (3 if family == "llama" else 2)
    adapters = 2 * n * K * r * (ff + d)
    rows = n if case.spec.gate_kind == "token" else B
    gate_f = 2 * rows * (ff * 768 + 2 * 768 * 768 + 768 * (K + 1))
    assert case.flops_plain == ffn
    assert case.flops_mixda == ffn + adapters + gate_f
    assert case.bytes_mixda > case.bytes_plain > 0
    train = mb.build_case(f"{family}:{d}x{ff}", "fp32", K, B, T, gate, training=True, contenders=("plain",))
    assert train.flops_plain == 2 * ffn                       # input gradients only: host frozen
    assert train.flops_mixda == 2 * ffn + 3 * (adapters + gate_f)


def test_training_step_freezes_the_host():
    case = mb.build_case(TINY, "fp32", 2, 2, 4, training=True, contenders=("plain", "paper", "folded"))
    saved = ops.get_backend()
    case.fns["paper"]()
    assert ops.get_backend() == "torch"                        # the contender sets what it needs
    ops.set_backend(saved)
    layer = case.layer
    assert all(p.grad is not None for p in layer.adapters.parameters())
    assert all(p.grad is not None for p in layer.gate.parameters())
    host = [p for p in layer.parameters() if not any(p is q for m in (layer.adapters, layer.gate)
                                                      for q in m.parameters())]
    assert host and all(p.grad is None and not p.requires_grad for p in host)


def test_contenders_agree():
    case = mb.build_case(TINY, "fp32", 2, 2, 4, contenders=("paper", "folded", "fused"))
    saved = ops.get_backend()
    try:
        with torch.inference_mode():
            outs = {k: fn().clone() for k, fn in case.fns.items()}
    finally:
        ops.set_backend(saved)
    torch.testing.assert_close(outs["folded"], outs["paper"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["fused"], outs["paper"], rtol=1e-4, atol=1e-5)


def test_unknown_contender():
    with pytest.raises(ValueError, match="contenders"):
        mb.build_case(TINY, "fp32", 1, 1, 2, contenders=("plain", "magic"))


def test_rows_table_targets_and_plot(tmp_path):
    saved = ops.get_backend()
    specs = [mb.CaseSpec(TINY, "fp32", 4, 4, 1, "inference", contenders=("plain", "paper", "folded", "fused")),
             mb.CaseSpec(TINY, "bf16", 4, 1, 128, "inference", contenders=("plain", "paper", "fused")),
             mb.CaseSpec(TINY, "fp32", 4, 2, 64, "training", contenders=("plain", "paper", "fused"))]
    rows = mb.run_layer_bench(cases=specs, **FAST)
    assert ops.get_backend() == saved
    assert len(rows) == 4 + 3 + 3
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["ms"] > 0 and r["frac_peak"] > 0
    decode = [r for r in rows if r["tokens"] == "4x1"]
    assert all(r["floor"] is not None for r in decode)
    assert all(r["floor"] is None for r in rows if r["tokens"] != "4x1")
    plain = next(r for r in decode if r["contender"] == "plain")
    assert plain["overhead"] == 1.0
    # plain FFN against the floor: exactly the FFN's share of the weight bytes
    case = mb.build_case(TINY, "fp32", 4, 4, 1, contenders=("plain",))
    assert plain["floor"] == pytest.approx(case.bytes_plain / case.bytes_mixda)
    fused = next(r for r in decode if r["contender"] == "fused")
    assert fused["fused_speedup"] == 1.0

    table = mb.format_table(rows)
    assert "frac peak" in table and "paper (eager)" in table and "plain FFN" in table
    assert len([l for l in table.splitlines() if l.startswith(TINY)]) == len(rows)

    checks = mb.check_targets(rows)
    targets = {(c["case"].split()[3], c["target"].split()[0]) for c in checks}
    assert ("4x1", "time") in targets                 # decode: weight-bytes floor
    assert ("1x128", "fraction") in targets           # >= 128 tokens: fraction of peak
    assert ("2x64", "speed-up") in targets            # training step, K = 4: vs eager paper
    assert all(isinstance(c["met"], bool) for c in checks)
    assert "met" in mb.format_targets(rows)

    png = mb.plot_rows(rows, str(tmp_path / "sub" / "plot.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_default_and_quick_case_lists():
    args = mb.build_parser().parse_args([])
    assert mb._specs_from_args(args) == list(mb.DEFAULT_CASES)
    assert any(s.mode == "training" for s in mb.DEFAULT_CASES)
    assert any(s.decode for s in mb.DEFAULT_CASES)
    quick = mb._specs_from_args(mb.build_parser().parse_args(["--quick"]))
    assert quick and all(s.mode == "inference" and "compiled" not in s.contenders for s in quick)
    grid = mb._specs_from_args(mb.build_parser().parse_args(
        ["--shape", "bert-base", "llama-gated", "-K", "1", "8", "--tokens", "16x1", "--train", "--no-compile"]))
    assert len(grid) == 2 * 2 * 2                      # shapes x K x default dtypes
    assert all(s.mode == "training" and "compiled" not in s.contenders for s in grid)


def test_main_prints_table_and_writes_plot(tmp_path, capsys):
    png = tmp_path / "out" / "bench.png"
    rc = mb.main(["--shape", TINY, "--dtype", "fp32", "--tokens", "4x1", "1x128", "--mode", "inference",
                  "training", "--no-compile", "--reps", "1", "--min-time", "0", "--peak-n", "64",
                  "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "frac peak" in out and "fused x" in out and "x floor" in out
    assert "target (fused contender)" in out
    assert png.exists() and png.stat().st_size > 0


def test_bad_tokens_argument():
    with pytest.raises(SystemExit):
        mb.build_parser().parse_args(["--tokens", "8by128"])


def test_gate_dropout_reaches_every_case_and_only_the_gate_trains_with_it(capsys):
    for argv in ([], ["--train", "--tokens", "2x4"]):
        specs = mb._specs_from_args(mb.build_parser().parse_args(argv + ["--gate", "token", "--gate-dropout", "0.2"]))
        assert specs and all(s.gate == "token" and s.gate_dropout == 0.2 for s in specs)
    for bad in ("1", "-0.1", "lots"):
        with pytest.raises(SystemExit):
            mb.build_parser().parse_args(["--gate-dropout", bad])
        assert "--gate-dropout" in capsys.readouterr().err
    case = mb.build_case(TINY, "fp32", 2, 2, 4, gate="token", training=True, contenders=("fused",), gate_dropout=0.2)
    layer = case.layer
    assert case.spec.gate_dropout == 0.2
    assert layer.gate.training and not layer.host_ffn.training   # dropout on in the gate alone
    assert layer._fused_gate_params()[2] == 0.2
    inference = mb.build_case(TINY, "fp32", 2, 2, 4, gate="token", contenders=("fused",), gate_dropout=0.2)
    assert not inference.layer.gate.training


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_gemm_ceiling_counts_the_layers_flops(family, mode):
    spec = mb.CaseSpec(f"{family}:32x128", "fp32", 2, 2, 8, mode)
    c = mb.gemm_ceiling(spec, reps=1, peak_n=64)
    case = mb.build_case(spec.shape, "fp32", 2, 2, 8, training=mode == "training", contenders=("plain",))
    assert c["flops"] == case.flops_mixda
    assert c["frac_peak"] > 0 and "GEMM-only ceiling" in mb.format_ceiling(spec, c)
