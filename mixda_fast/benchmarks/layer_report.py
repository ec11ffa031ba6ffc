"""The layer benchmark's report: its table, its targets (checked here, never asserted in tests)
and its plot (docs/design.md section 5). Rows come from
:func:`mixda_fast.benchmarks.layer.run_layer_bench`."""

from __future__ import annotations

import os

from .timing import PEAK_N

# The contenders of every case, in table order, and how the table names them.
CONTENDERS = ("plain", "paper", "compiled", "folded", "fused")
LABELS = {"plain": "plain FFN", "paper": "paper (eager)", "compiled": "paper (compiled)",
          "folded": "folded (torch)", "fused": "fused (cpp)"}

__all__ = ["CONTENDERS", "LABELS", "format_table", "check_targets", "format_targets", "plot_rows", "TARGET_FRAC", "TARGET_FLOOR",
           "TARGET_TRAIN"]

# Targets of issue 3, item 6 (checked by format_targets, never asserted in tests).
TARGET_FRAC = {"fp32": 0.90, "bf16": 0.75}     # fused, inference, >= 128 tokens
TARGET_FLOOR = 1.05                             # fused, decode: t / weight-bytes floor
TARGET_TRAIN = {"paper": 1.6, "compiled": 1.5}  # fused training-step speed-up at K = 4


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def format_table(rows: list[dict]) -> str:
    """One line per case and contender. ``/fp32pk`` = 16-bit rows' FLOP/s over the fp32 peak
    GEMM's; ``x plain`` = t / t(plain FFN); ``fused x`` = how many times
    faster the fused contender is than this row; ``x floor`` = t / weight-bytes floor (decode)."""
    head = (f"{'shape':<14}{'dtype':<6}{'K':>2} {'tokens':<7}{'mode':<7}{'contender':<24}"
            f"{'ms':>10}{'frac peak':>10}{'/fp32pk':>8}{'x plain':>8}{'fused x':>8}{'x floor':>8}{'compile s':>10}")
    lines = [head, "-" * len(head)]
    prev = None
    notes: list[str] = []
    for r in rows:
        key = (r["shape"], r["dtype"], r["K"], r["tokens"], r["mode"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        label = r["label"]
        mode = "train" if r["mode"] == "training" else "infer"
        lines.append(f"{r['shape']:<14}{r['dtype']:<6}{r['K']:>2} {r['tokens']:<7}{mode:<7}{label:<24}"
                     f"{r['ms']:>10.3f}{r['frac_peak']:>10.2f}{_fmt(r.get('frac_fp32_peak'), '.2f', 8)}"
                     f"{_fmt(r['overhead'], '.2f', 8)}"
                     f"{_fmt(r['fused_speedup'], '.2f', 8)}{_fmt(r['floor'], '.2f', 8)}"
                     f"{_fmt(r.get('compile_s'), '.1f', 10)}")
        notes.extend(n for n in r.get("notes", ()) if n not in notes)
    if not rows:
        return "\n".join(lines)
    peaks: dict[str, list[float]] = {}
    for r in rows:
        peaks.setdefault(r["dtype"], []).append(r["peak_gflops"])
    lines.append("")
    lines.append(f"peak ({rows[0].get('peak_n', PEAK_N)}^3 GEMM, x @ W^T) GFLOP/s: " + ", ".join(
        f"{dt} {min(v):.1f}-{max(v):.1f}" if min(v) != max(v) else f"{dt} {v[0]:.1f}" for dt, v in peaks.items()))
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets against the fused contender: one dict per applicable (case, target)
    with fields case, target, measured, goal, met."""
    out = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["dtype"], r["K"], r["tokens"], r["mode"]), {})[r["contender"]] = r
    for (shape, dt, k, tokens, mode), rs in by_case.items():
        fused = rs.get("fused")
        if fused is None:
            continue
        b, t = (int(v) for v in tokens.split("x"))
        name = f"{shape} {dt} K={k} {tokens} {mode}"
        if mode == "inference" and t > 1 and b * t >= 128:
            goal = TARGET_FRAC[dt]
            out.append(dict(case=name, target=f"fraction of peak >= {goal:.2f}", measured=fused["frac_peak"],
                            goal=goal, met=fused["frac_peak"] >= goal))
        if t == 1 and mode == "inference" and fused["floor"] is not None:
            out.append(dict(case=name, target=f"time / weight-bytes floor <= {TARGET_FLOOR:.2f}",
                            measured=fused["floor"], goal=TARGET_FLOOR, met=fused["floor"] <= TARGET_FLOOR))
        if mode == "training" and k == 4:
            for ref, goal in TARGET_TRAIN.items():
                if ref in rs:
                    sp = rs[ref]["ms"] / fused["ms"]
                    out.append(dict(case=name, target=f"speed-up vs {LABELS[ref]} >= {goal:.1f}x",
                                    measured=sp, goal=goal, met=sp >= goal))
    return out


def format_targets(rows: list[dict]) -> str:
    checks = check_targets(rows)
    if not checks:
        return "targets: none applicable to these cases"
    w = max(len(c["case"]) for c in checks)
    lines = [f"{'case':<{w}}  {'target (fused contender)':<40}{'measured':>9}  met"]
    for c in checks:
        lines.append(f"{c['case']:<{w}}  {c['target']:<40}{c['measured']:>9.2f}  {'yes' if c['met'] else 'NO'}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str) -> str:
    """Bar charts: fraction of peak per case (with the targets) and, for decode cases, time over
    the weight-bytes floor. Writes a PNG at ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def case_key(r):
        return (r["shape"], r["dtype"], r["K"], r["tokens"], r["mode"])

    keys = list(dict.fromkeys(case_key(r) for r in rows))
    decode = [k for k in keys if k[3].endswith("x1") and k[4] == "inference"]
    dense = [k for k in keys if k not in decode]
    names = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    label_of = {r["contender"]: r["label"] for r in rows}
    panels = [(dense, "frac_peak", "fraction of peak (GEMM FLOP/s)"),
              (decode, "floor", "time / weight-bytes floor")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.6 * max(len(p[0]) for p in panels) + 3), 4.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, (ks, field_, ylabel) in zip(axes[:, 0], panels):
        index = {k: i for i, k in enumerate(ks)}
        for j, c in enumerate(names):
            xs, ys = [], []
            for r in rows:
                k = case_key(r)
                if r["contender"] == c and k in index and r.get(field_) is not None:
                    xs.append(index[k] + (j - (len(names) - 1) / 2) * width)
                    ys.append(r[field_])
            ax.bar(xs, ys, width, label=label_of[c])
        for k, i in index.items():
            if field_ == "frac_peak" and k[4] == "inference":
                ax.hlines(TARGET_FRAC[k[1]], i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1)
            if field_ == "floor":
                ax.hlines(TARGET_FLOOR, i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1)
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([f"{k[0]}\n{k[1]} K={k[2]}\n{k[3]} {k[4]}" for k in ks], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(3, len(names)))
    axes[0, 0].set_title("MixDA layer vs plain FFN (dashed: targets)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line --------------------------------------------------------------------------
