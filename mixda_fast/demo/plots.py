"""PNG plots of the demo (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_all", "plot_gate_weights"]

COLORS = {"MixDA": "#1f77b4", "task adapter only": "#7f7f7f", "LoRA": "#ff7f0e", "full fine-tuning": "#d62728"}


def _curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_gate_weights(gate: dict, path) -> Path:
    """One panel per gate entry (domain, or the FFN under paper mixing): its mean softmax weight
    per patched layer, one bar per kind of text; and a last panel: the mean relative change the
    patch makes to each layer's FFN output, ||y - f|| / ||f||. ``gate`` is what
    ``demo.mixda.gate_weight_means`` returns. A gate of one entry (K = 1, residual mixing, the
    demo's default) weighs it 1 by construction: its panel is left out and the title says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries, texts = gate["entries"], gate["texts"]
    layers = list(next(iter(texts.values())))
    panels = [(f"gate weight of {entry!r}", "mean softmax weight", (0, 1.05),
               {kind: {l: w[l][e] for l in layers} for kind, w in texts.items()})
              for e, entry in enumerate(entries)] if len(entries) > 1 else []
    panels.append(("the patch's change of the FFN output", "mean ||y - f|| / ||f||", None, gate["change"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 3.4 * len(panels), 3.4), squeeze=False)
    width = 0.8 / len(texts)
    for ax, (title, ylabel, ylim, values) in zip(axes[0], panels):
        for i, (kind, per_layer) in enumerate(values.items()):
            ax.bar([j + i * width for j in range(len(layers))], [per_layer[l] for l in layers], width, label=kind)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [str(l) for l in layers])
        ax.set(title=title, xlabel="layer", ylabel=ylabel, ylim=ylim)
    axes[0][-1].legend(fontsize=7)
    if len(entries) == 1:
        fig.suptitle(f"one gate entry ({entries[0]!r}): its weight is 1 by construction", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, out_dir) -> list[Path]:
    """loss_curves.png, accuracy.png, speed.png (and gate_weights.png where the results hold gate
    weights) from the demo's results dict; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    methods = list(results["methods"])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in methods:
        r = results["methods"][name]
        if r.get("stage1"):
            x, y = _curve(r["stage1"]["history"], "loss_knowledge")
            axes[0].plot(x, y, label=name, color=COLORS.get(name))
        x, y = _curve(r["stage2"]["history"], "loss")
        axes[1].plot(x, y, label=name, color=COLORS.get(name))
    axes[0].set(title="stage 1: knowledge loss (masked-LM CE on facts)", xlabel="step", ylabel="cross-entropy",
                yscale="log")
    axes[1].set(title="stage 2: task loss (k-shot classification)", xlabel="step", ylabel="cross-entropy")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    metrics = [("fact exact-match\n(after stage 1)",
                lambda r: r["stage1"]["fact_exact_match"] if r.get("stage1") else results["base"]["fact_exact_match"]),
               ("task accuracy\n(held-out people)", lambda r: r["stage2"]["accuracy"]),
               ("task macro-F1\n(held-out people)", lambda r: r["stage2"]["macro_f1"])]
    width = 0.8 / len(methods)
    for i, name in enumerate(methods):
        r = results["methods"][name]
        vals = [f(r) for _, f in metrics]
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, vals, width, label=name, color=COLORS.get(name))
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(results["chance_accuracy"], color="black", lw=0.8, ls="--", label="chance (task)")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(metrics))], [m for m, _ in metrics])
    ax.set(ylim=(0, 1.08), title="knowledge and task (higher is better)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=5, frameon=False)
    names = [n for n in methods if results["methods"][n].get("stage1")]
    drift = [results["methods"][n]["stage1"]["drift"] for n in names]
    ax2.bar(names, drift, color=[COLORS.get(n) for n in names])
    for i, v in enumerate(drift):
        ax2.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.set(title="general-text drift after stage 1\n(lower is better)", ylabel="mean ||h - h_base|| / ||h_base||")
    ax2.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, ("stage1", "stage2")):
        names = [n for n in methods if results["methods"][n].get(stage)]
        vals = [1000 * results["methods"][n][stage]["step_time"] for n in names]
        labels = [n + ("\n(facts + general-text\npass for L_old)" if n == "MixDA" and stage == "stage1" else "")
                  for n in names]
        ax.bar(labels, vals, color=[COLORS.get(n) for n in names])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set(title=f"{'stage 1' if stage == 'stage1' else 'stage 2'}: median time per training step",
               ylabel="ms / step")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    paths.append(out / "speed.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if results.get("gate_weights"):
        paths.append(plot_gate_weights(results["gate_weights"], out / "gate_weights.png"))
    return paths
