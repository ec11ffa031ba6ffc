"""The quality benchmark's tables (markdown) and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["format_tables", "plot_all", "ablations_table"]


def _cell(stat, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not stat:
        return "-"
    if stat["n"] == 1:
        return fmt.format(stat["mean"] * scale)
    return f"{fmt.format(stat['mean'] * scale)} ± {fmt.format(stat['std'] * scale)}"


def _table(head: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def _params(stat) -> str:
    return "-" if not stat else f"{stat['mean'] / 1e6:.2f}M"


ABLATION = "ablation: "


def _contenders(results: dict, ablations: bool = False) -> list:
    """(name, summary) of the main table's contenders, or of the ablations (names without prefix)."""
    return [(n[len(ABLATION):] if ablations else n, r) for n, r in results["summary"].items()
            if n.startswith(ABLATION) == ablations]


def ablations_table(results: dict) -> str:
    """The recipe ("MixDA") and each ablation: what stage 1 learned and kept, what stage 2 reached."""
    head = ["MixDA, changed from the recipe", "fact EM (trained)", "fact EM (held-out)", "drift (1 - cos)",
            "MLM loss, general", "task acc", "task train acc", "gate weight of the FFN: facts", "general text"]
    recipe = [("recipe (residual mixing, every layer)", results["summary"]["MixDA"])] \
        if "MixDA" in results["summary"] else []
    rows = []
    for name, r in recipe + _contenders(results, ablations=True):
        s1, s2 = r["stage1"] or {}, r["stage2"]
        rows.append([name, _cell(s1.get("em_trained")), _cell(s1.get("em_held_out")), _cell(s1.get("drift"), "{:.4f}"),
                     _cell(s1.get("mlm_loss"), "{:.2f}"), _cell(s2["accuracy"]), _cell(s2["train_accuracy"]),
                     _cell(s1.get("gate_ffn_facts")), _cell(s1.get("gate_ffn_general"))])
    return _table(head, rows) if len(rows) > len(recipe) else ""


def main_table(results: dict) -> str:
    """One row per contender: stage-1 and stage-2 measures, mean ± std over the seeds."""
    head = ["method", "fact EM (trained)", "fact EM (held-out phrasing)", "drift (1 - cos)", "drift (relative)",
            "MLM loss, general", "task acc", "task macro-F1", "task train acc", "s1 ms/step", "s2 ms/step",
            "s1 trainable", "s2 trainable"]
    b = results["base"]["summary"]
    rows = [["base model (no training)", _cell(b["em_trained"]), _cell(b["em_held_out"]), "0", "0",
             _cell(b["mlm_loss"], "{:.2f}")] + ["-"] * 7]
    for name, r in _contenders(results):
        s1, s2 = r["stage1"] or {}, r["stage2"]
        rows.append([name, _cell(s1.get("em_trained")), _cell(s1.get("em_held_out")),
                     _cell(s1.get("drift"), "{:.4f}"), _cell(s1.get("drift_relative")),
                     _cell(s1.get("mlm_loss"), "{:.2f}"), _cell(s2["accuracy"]), _cell(s2["macro_f1"]),
                     _cell(s2["train_accuracy"]), _cell(s1.get("step_time"), "{:.0f}", 1000),
                     _cell(s2["step_time"], "{:.0f}", 1000), _params(s1.get("trainable")), _params(s2["trainable"])])
    return _table(head, rows)


def mixda_table(results: dict) -> str:
    """MixDA's diagnostics: general masked-LM loss just patched and after stage 1; with paper
    mixing, the mean gate weight of the FFN on the facts and on general text."""
    head = ["MixDA contender", "MLM loss, general: patched, untrained", "after stage 1",
            "gate weight of the FFN: facts", "general text"]
    rows = []
    for name, r in _contenders(results):
        s1 = r["stage1"] or {}
        if "mlm_loss_at_init" in s1:
            rows.append([name, _cell(s1["mlm_loss_at_init"], "{:.2f}"), _cell(s1["mlm_loss"], "{:.2f}"),
                         _cell(s1.get("gate_ffn_facts")), _cell(s1.get("gate_ffn_general"))])
    return _table(head, rows) if rows else ""


def domains_table(results: dict) -> str:
    """Per domain: fact EM alone and composed (mean over seeds), and the mean gate weights."""
    runs = results["domains"]
    if not runs:
        return ""
    import statistics

    def ms(values):
        if None in values:
            return "-"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    experts = runs[0]["experts"]
    rows = [[f"fact EM, {d}", ms([r["alone"][d] for r in runs]), ms([r["composed"][d] for r in runs]),
             ms([r["ratio"][d] for r in runs])] for d in runs[0]["alone"]]
    t1 = _table(["measure", "alone", "composed", "composed / alone"], rows)
    rows = [[text] + [ms([r["gate_weights"][text][i] for r in runs]) for i in range(len(experts))]
            for text in runs[0]["gate_weights"]]
    t2 = _table(["text"] + [f"gate weight: {e}" for e in experts], rows)
    acc = ms([r["stage2_both"]["accuracy"] for r in runs])
    return f"{t1}\n\n{t2}\n\nstage 2 with both domain adapters: task accuracy {acc}"


def format_tables(results: dict) -> str:
    s = results["settings"]
    parts = [f"seeds {list(s['seeds'])}; mean ± std over seeds; {s['classes']} classes, "
             f"{3 * s['train_per_class']} training sentences per class; stage 1: {s['stage1_steps']} steps; "
             f"stage 2: {s['stage2_epochs']} epochs; {results['threads']} threads",
             main_table(results)]
    if mixda_table(results):
        parts.append("MixDA diagnostics (gate weight: residual mixing has no FFN expert):\n\n" + mixda_table(results))
    if ablations_table(results):
        parts.append("Ablations (each changes one thing of the recipe):\n\n" + ablations_table(results))
    if results["domains"]:
        parts.append("Several domains (each trained alone, then composed; gate trained on both):\n\n"
                     + domains_table(results))
    return "\n\n".join(parts)


def _bars(ax, names, stats, title):
    means = [st["mean"] if st else 0.0 for st in stats]
    stds = [st["std"] if st else 0.0 for st in stats]
    ax.barh(range(len(names)), means, xerr=stds, color="#1f77b4", alpha=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def plot_all(results: dict, out_dir) -> list[Path]:
    """quality.png (the main measures, mean ± std), loss_curves.png (stage 1 of the first seed),
    and gate_weights.png when domains ran; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    names = list(results["summary"])
    summ = results["summary"]
    panels = [("stage1", "em_trained", "fact EM, trained phrasings"),
              ("stage1", "em_held_out", "fact EM, held-out phrasing"),
              ("stage1", "drift", "general drift (1 - cos)"),
              ("stage2", "accuracy", "task accuracy (held-out people)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.35 * len(names) + 2), sharey=True)
    for ax, (stage, key, title) in zip(axes, panels):
        _bars(ax, names, [(summ[n][stage] or {}).get(key) for n in names], title)
    fig.tight_layout()
    paths.append(out / "quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        rs = results["per_seed"][n]
        if rs and rs[0]["stage1"]:
            h = [(e["step"], e["loss_knowledge"]) for e in rs[0]["stage1"]["history"] if "loss_knowledge" in e]
            ax.plot([p[0] for p in h], [p[1] for p in h], label=n)
    ax.set(title="stage 1: L_knowledge (first seed)", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if results["domains"]:
        runs = results["domains"]
        experts, texts = runs[0]["experts"], list(runs[0]["gate_weights"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(experts)
        for i, e in enumerate(experts):
            vals = [[r["gate_weights"][t][i] for r in runs] for t in texts]
            means = [sum(v) / len(v) for v in vals]
            ax.bar([j + i * width for j in range(len(texts))], means, width, label=f"expert: {e}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(texts))], texts)
        ax.set(title="mean gate weight per text type (composed model)", ylabel="softmax weight", ylim=(0, 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "gate_weights.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
