"""The run report's figures, made to be read without the code: one colour per model in every panel (base grey,
then the training arms in the run config's order) with a legend, labelled axes, the preference loss and the NLL
on separate axes (their scales differ ~50x), a margin histogram only for stages whose margins vary, and the
tree search's statistics.

    plot_all(out_dir, evals, curves, stages, loss_configs) -> [file names written]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BASE_COLOUR = "#777777"


def colours(labels: list[str]) -> dict[str, str]:
    """base grey; every other label its own colour of matplotlib's tab10 cycle, in order."""
    from matplotlib import colormaps

    cycle = colormaps["tab10"].colors
    rest = [lb for lb in labels if lb != "base"]
    out = {"base": BASE_COLOUR} if "base" in labels else {}
    return out | {lb: cycle[i % len(cycle)] for i, lb in enumerate(rest)}


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far): per-step losses of 16 pairs are
    noisy enough to hide the trend."""
    x = np.asarray(values, dtype=float)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def preference_loss(rows: list[dict], nll_coef: float) -> list[float]:
    """The preference part of each logged loss: the total minus its NLL term (nll_coef · NLL, RPO's α)."""
    return [r["loss"] - nll_coef * r.get("nll", 0.0) for r in rows]


def plot_all(out: Path, evals: dict, curves: dict[str, list[dict]], stages: dict,
             nll_coefs: dict[str, float]) -> list[str]:
    """nll_coefs: preference arm -> the weight of the NLL term in its logged loss (report._nll_coefs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = colours(list(evals) + [k for k in curves if k not in evals])
    made = []
    for name, fn in (("accuracy.png", lambda: _accuracy(plt, evals, palette)),
                     ("training.png", lambda: _training(plt, curves, palette, nll_coefs)),
                     ("margins.png", lambda: _margins(plt, stages)),
                     ("trees.png", lambda: _trees(plt, stages))):
        fig = fn()
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def _accuracy(plt, evals: dict, palette: dict):
    if not evals:
        return None
    labels = list(evals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    acc = [100 * evals[k]["accuracy"] for k in labels]
    err = [[100 * (evals[k]["accuracy"] - evals[k]["ci_low"]) for k in labels],
           [100 * (evals[k]["ci_high"] - evals[k]["accuracy"]) for k in labels]]
    for i, k in enumerate(labels):
        ax.bar(i, acc[i], yerr=[[err[0][i]], [err[1][i]]], capsize=4, color=palette[k], label=k)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_xlabel("model")
    ax.set_ylabel("greedy accuracy (%), 95 % CI")
    ax.set_title(f"accuracy on {evals[labels[0]]['n']} eval problems")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    others = [k for k in labels if k != "base" and "per_problem" in evals[k]]
    if "base" in evals and others:
        from flows.intervals import paired_delta  # the report's interval, not a second estimate

        base = {r["id"]: r["correct"] for r in evals["base"]["per_problem"]}
        for i, k in enumerate(others):
            got = {r["id"]: r["correct"] for r in evals[k]["per_problem"]}
            ids = [p for p in base if p in got]
            d = paired_delta([base[p] for p in ids], [got[p] for p in ids])
            ax.errorbar(d["delta_pp"], i, xerr=[[d["delta_pp"] - d["ci_low_pp"]], [d["ci_high_pp"] - d["delta_pp"]]],
                        fmt="o", capsize=4, color=palette[k], label=k)
        ax.axvline(0, color=BASE_COLOUR, lw=1, ls="--")
        ax.set_yticks(range(len(others)), others)
        ax.invert_yaxis()
        ax.set_xlabel("change vs base (percentage points), paired 95 % CI")
        ax.set_title("change against the base model")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.set_axis_off()
    return fig


def _training(plt, curves: dict[str, list[dict]], palette: dict, nll_coefs: dict[str, float]):
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    longest = max(len(v) for v in curves.values())
    window = max(1, longest // 20)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    (ax_pref, ax_nll), (ax_logp, ax_margin) = axes
    for name, rows in curves.items():
        c = palette[name]
        x = [r.get("step", i + 1) for i, r in enumerate(rows)]
        if name in nll_coefs:  # a preference arm (an NLL control has no preference loss or trained margin)
            ax_pref.plot(x, smooth(preference_loss(rows, nll_coefs[name]), window), color=c, label=name)
            ax_margin.plot(x, smooth([r["rewards/margins"] for r in rows], window), color=c, label=name)
        if "nll" in rows[0]:
            ax_nll.plot(x, smooth([r["nll"] for r in rows], window), color=c, label=name)
        if "logps/chosen" in rows[0]:
            ax_logp.plot(x, smooth([r["logps/chosen"] for r in rows], window), color=c, label=f"{name}: chosen")
            ax_logp.plot(x, smooth([r["logps/rejected"] for r in rows], window), color=c, ls="--",
                         label=f"{name}: rejected")
    titles = ((ax_pref, "preference (DPO) loss", "loss"), (ax_nll, "NLL of the chosen side", "nats per token"),
              (ax_logp, "policy log-prob (solid: chosen, dashed: rejected)", "log-prob per sequence (nats)"),
              (ax_margin, "reward margin (chosen − rejected)", "β · Δ log-ratio"))
    for ax, title, ylabel in titles:
        ax.set_title(title + (f" — moving average of {window} steps" if window > 1 else ""), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no arm logs this", ha="center", va="center", transform=ax.transAxes)
    return fig


def varying_margins(stages: dict) -> dict[str, list[float]]:
    """Stages whose pair margins take more than one value: a histogram of a constant (e.g. every tree step pair
    has margin 1) says nothing."""
    return {k: v["margins"] for k, v in stages.items() if len(set(v.get("margins") or [])) > 1}


def _margins(plt, stages: dict):
    with_margins = varying_margins(stages)
    if not with_margins:
        return None
    fig, axes = plt.subplots(1, len(with_margins), figsize=(4.2 * len(with_margins), 3.2), squeeze=False)
    for ax, (k, m) in zip(axes[0], with_margins.items()):
        ax.hist(m, bins=20, color="#3a6ea5", label=f"{k} (n={len(m)})")
        ax.set_xlabel("score margin (chosen − rejected)")
        ax.set_ylabel("pairs")
        ax.set_title(f"stage {k}")
        ax.legend(fontsize=7)
    return fig


def _trees(plt, stages: dict):
    trees = {k: v["tree_arrays"] for k, v in stages.items() if v.get("tree_arrays")}
    if not trees:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    tree_colours = colours(list(trees))
    for k, t in trees.items():
        c = tree_colours[k]
        axes[0].hist(t["nodes"], bins=20, color=c, alpha=0.7, label=k)
        axes[1].hist(t["depths"], bins=np.arange(min(t["depths"]), max(t["depths"]) + 2) - 0.5, color=c,
                     alpha=0.7, label=k)
        axes[2].bar([f"{k}\nright answer", f"{k}\nwrong answer"], [t["terminal_correct"], t["terminal_wrong"]],
                    color=[c, c], alpha=0.7, label=k)
    for ax, title, xlabel, ylabel in ((axes[0], "nodes per tree", "nodes", "trees"),
                                      (axes[1], "depth reached per tree", "depth (solution lines)", "trees"),
                                      (axes[2], "finished solutions in the trees", "outcome", "terminal nodes")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return fig
