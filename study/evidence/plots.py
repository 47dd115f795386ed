"""The report's figures (matplotlib, Agg backend, PNG): cost/accuracy trade-offs with their Pareto
front, a method x strategy heatmap, learning curves and per-cell Optuna hyperparameter importances."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from trainables.atomic import atomic_write  # noqa: E402

DPI = 110
_MARKERS = "osD^v<>Pp*hX"


def pareto_front(costs: list[float], gains: list[float]) -> list[int]:
    """Indices of the points no other point beats (cost no higher and gain no lower, one strictly)."""
    front = []
    for i, (c, g) in enumerate(zip(costs, gains, strict=True)):
        dominated = any(
            (c2 <= c and g2 >= g) and (c2 < c or g2 > g) for j, (c2, g2) in enumerate(zip(costs, gains, strict=True))
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: costs[i])


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # a tall figure (the full grid's forest plot) keeps its own margins, silently
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    return path


def plot_tradeoff(points: list[dict], cost_key: str, cost_label: str, path: Path) -> Path:
    """Test score (with its 95% interval as a bar) against a cost, one point per cell; the Pareto front
    of the point estimates drawn and its cells named; the cells the data cannot tell apart from the best
    ringed in orange.

    Args:
        points: dicts with ``label``, ``strategy``, ``pretrain``, ``score``, ``lo``, ``hi`` (the interval,
            NaN if unknown), ``tied`` (cannot be told apart from the best) and ``cost_key``.
        cost_key: which key holds the cost (lower is better).
        cost_label: the x-axis label.
        path: the PNG to write.
    """
    pts = [p for p in points if _finite(p.get(cost_key)) and _finite(p.get("score"))]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    strategies = sorted({p["strategy"] for p in pts})
    methods = sorted({p["pretrain"] for p in pts})
    cmap = plt.get_cmap("tab20")
    for p in pts:
        colour = cmap(strategies.index(p["strategy"]) % 20)
        if _finite(p.get("lo")) and _finite(p.get("hi")):
            # a percentile interval need not contain the estimate (tiny test splits): clip the bars at it
            ax.errorbar(p[cost_key], p["score"], yerr=[[max(0.0, p["score"] - p["lo"])], [max(0.0, p["hi"] - p["score"])]],
                        color=colour, alpha=0.5, linewidth=0.9, capsize=2, zorder=1)
        ax.scatter(p[cost_key], p["score"], s=46, color=colour, zorder=2,
                   marker=_MARKERS[methods.index(p["pretrain"]) % len(_MARKERS)], edgecolor="black", linewidth=0.4)
        if p.get("tied"):
            ax.scatter(p[cost_key], p["score"], s=170, facecolors="none", edgecolors="darkorange", linewidth=1.6,
                       zorder=3)
    front = pareto_front([p[cost_key] for p in pts], [p["score"] for p in pts]) if pts else []
    if front:
        xs, ys = [pts[i][cost_key] for i in front], [pts[i]["score"] for i in front]
        ax.step(xs, ys, where="post", color="crimson", linewidth=1.2, label="Pareto front (point estimates)")
        for i in front:
            ax.annotate(pts[i]["label"], (pts[i][cost_key], pts[i]["score"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.scatter([], [], s=120, facecolors="none", edgecolors="darkorange", linewidth=1.6,
               label="cannot be told apart from the best")
    for s in strategies:
        ax.scatter([], [], color=cmap(strategies.index(s) % 20), label=f"strategy {s}")
    for m in methods:
        ax.scatter([], [], color="white", edgecolor="black", marker=_MARKERS[methods.index(m) % len(_MARKERS)],
                   label=f"pre-training {m}")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("test score (bars: 95% CI)")
    ax.set_title(f"Test score vs {cost_label} ({len(pts)} cells)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_forest(rows: list[dict], path: Path, reference: str | None = None, between_runs: bool = False) -> Path:
    """Cells sorted by test score, each with its 95% interval: the highest in crimson, the cells that cannot
    be told apart from it on test in orange, the rest grey; the reference cell marked with a diamond. The figures
    are measured after the choice on validation (exploratory), and the title says so.

    Args:
        rows: dicts with ``label``, ``score``, ``lo``, ``hi`` and ``tied``.
        path: the PNG to write.
        reference: the reference cell's label.
        between_runs: the intervals include the variation between training runs (a race or ``--seeds``).
    """
    rows = sorted([r for r in rows if _finite(r.get("score"))], key=lambda r: r["score"])
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * max(1, len(rows))))
    best = rows[-1]["label"] if rows else None
    for y, r in enumerate(rows):
        colour = "crimson" if r["label"] == best else "darkorange" if r.get("tied") else "grey"
        if _finite(r.get("lo")) and _finite(r.get("hi")):
            ax.plot([r["lo"], r["hi"]], [y, y], color=colour, linewidth=1.6)
        ax.scatter(r["score"], y, color=colour, marker="D" if r["label"] == reference else "o", s=28, zorder=3,
                   edgecolor="black" if r["label"] == reference else colour, linewidth=0.8)
    if rows and _finite(rows[-1].get("lo")):
        ax.axvline(rows[-1]["lo"], color="crimson", linestyle=":", linewidth=0.9)
    ax.set_yticks(range(len(rows)), [r["label"] + (" (reference)" if r["label"] == reference else "")
                                     for r in rows], fontsize=7)
    ax.set_xlabel("test score with 95% CI (bootstrap over test subjects"
                  + (",\nand the variation between training runs)" if between_runs else ")"), fontsize=9)
    ax.set_title("Exploratory, on test after the choice on validation: the highest test score (red),\n"
                 "not separated from it on test (orange), the rest (grey)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_heatmap(values: dict[tuple[str, str], float], methods: list[str], strategies: list[str], title: str,
                 path: Path, intervals: dict[tuple[str, str], tuple[float, float]] | None = None,
                 tied: set[tuple[str, str]] | None = None) -> Path:
    """A pre-training method (rows) x strategy (columns) heatmap with each cell's 95% interval written
    under its value; the cells that cannot be told apart from the best are framed; missing ones are grey."""
    intervals, tied = intervals or {}, tied or set()
    grid = np.full((len(methods), len(strategies)), np.nan)
    for (m, s), v in values.items():
        if m in methods and s in strategies and _finite(v):
            grid[methods.index(m), strategies.index(s)] = v
    fig, ax = plt.subplots(figsize=(2.6 + 1.05 * len(strategies), 1.6 + 0.7 * len(methods)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), v in np.ndenumerate(grid):
        key = (methods[r], strategies[c])
        text = "–" if np.isnan(v) else f"{v:.2f}"
        lo, hi = intervals.get(key, (math.nan, math.nan))
        if _finite(lo) and _finite(hi):
            text += f"\n[{lo:.2f}, {hi:.2f}]"
        ax.text(c, r, text, ha="center", va="center", fontsize=6.5,
                color="black" if np.isnan(v) or v > 0.6 else "white")
        if key in tied:
            ax.add_patch(matplotlib.patches.Rectangle((c - 0.48, r - 0.48), 0.96, 0.96, fill=False,
                                                      edgecolor="darkorange", linewidth=2.2))
    ax.set_xticks(range(len(strategies)), strategies, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_title(title + " (framed: cannot be told apart from the best)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Validation selection score per epoch, one line per cell (its best trial)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(curves.items()):
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("validation score")
    ax.set_title("Learning curves of the best trial per cell")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_label_efficiency(curves: dict, path: Path) -> Path:
    """Test score against labelled training subjects: one panel per (strategy, backbone), one line per
    pre-training method, each point with its 95% confidence interval (:func:`study.report.label_efficiency`)."""
    panels = list(curves)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, panels, strict=False):
        for k, (method, points) in enumerate(sorted(curves[key].items())):
            x, y, lo, hi = (np.asarray(v, dtype=float) for v in list(zip(*points, strict=True))[:4])
            x = x * (1.0 + 0.04 * (k - (len(curves[key]) - 1) / 2))  # side by side, so the intervals do not hide
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", markersize=4, capsize=3, linewidth=1.3,
                        label=method)
        strategy, backbone = key
        ax.set_title(f"{strategy} ({backbone})", fontsize=9)
        ax.set_xscale("log")
        xs = sorted({p[0] for points in curves[key].values() for p in points})
        ax.set_xticks(xs, [f"{v:g}" for v in xs], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("labelled training subjects", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("test score (95% CI)")
    fig.suptitle("Label efficiency: test score by labelled subjects, per pre-training method", fontsize=10)
    return _save(fig, path)


def cell_importances(storage: object, study_name: str, min_trials: int) -> dict[str, float] | str:
    """Hyperparameter importances (PED-ANOVA, which handles conditional parameters) of one Optuna study.

    Returns the importances, or a sentence saying why there are none (too few completed trials, ...).
    """
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return "no Optuna study (fixed parameters, or no trial was suggested)"
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < min_trials:
        return f"{len(complete)} completed trial(s), fewer than the {min_trials} needed for importances"
    if not any(t.params for t in complete):
        return "no searched hyperparameters"
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return f"importances could not be computed ({' '.join(str(exc).split())[:160]})"


def plot_importances(cell: str, importances: dict[str, float], path: Path) -> Path:
    """Horizontal bars of one cell's hyperparameter importances."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.35 * max(1, len(items))))
    ax.barh([k for k, _ in items], [v for _, v in items], color="steelblue")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title(cell, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_rank_blobs(ranks: dict[str, dict], path: Path, kendall_tau: dict | None = None) -> Path:
    """A blob plot of rank uncertainty (in the style of challengeR, Wiesenfarth et al. 2021): per cell (x,
    ordered by its rank) a circle at each rank it took in the bootstrap, its area the share of resamples, and
    a black bar over the 95% rank interval; ``ranks`` is :func:`study.evidence.inference.rank_intervals`'s."""
    order = sorted(ranks, key=lambda c: (ranks[c]["rank"], c))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(order) + 2), 4.2))
    for x, cell in enumerate(order):
        freq = ranks[cell]["frequency"]
        ax.scatter([x] * len(freq), list(freq), s=[400 * f for f in freq.values()], color="steelblue", alpha=0.6,
                   edgecolor="none")
        lo, hi = ranks[cell]["ci"]
        ax.plot([x, x], [lo, hi], color="black", linewidth=1.0)
        ax.scatter([x], [ranks[cell]["rank"]], color="black", s=10, zorder=3)
    n = len(order)
    ax.plot([0, n - 1], [1, n], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(range(n), order, rotation=90, fontsize=6)
    ax.set_ylabel("rank (1 = best)", fontsize=9)
    ax.invert_yaxis()
    tau = (f"; Kendall's tau with the resamples: median {kendall_tau['median']:.2f} "
           f"[{kendall_tau['ci'][0]:.2f}, {kendall_tau['ci'][1]:.2f}]") if kendall_tau else ""
    ax.set_title("Rank uncertainty on the test split (bootstrap over subjects and runs)" + tau, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
