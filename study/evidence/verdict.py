"""What the report says first: the verdict (the best cell, how sure, what it cannot be told apart from),
and the source study's four findings tested on this study's data.

The numbers come from :mod:`study.evidence.stats`; this module only words them. The four findings are those of
the PCS study this tool grew from (arXiv 2405.19204): reconstruction and adversarial pre-training
balance accuracy and cost; diffusion pre-training is the most resource-intensive; top-level tuning gives
strong segmentation at low cost; LoRA is weaker on this small-region task.
"""

from __future__ import annotations

import math
import statistics

from study.evidence.stats import Comparison

SUPPORTED, CONTRADICTED, NOT_RESOLVED, NOT_TESTED = "supported", "contradicted", "not resolved", "not tested"


def _ci(ci: tuple[float, float]) -> str:
    lo, hi = ci
    return "[–]" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"


def _signed(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "–"


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdict(comparison: Comparison) -> list[str]:
    """The report's first paragraphs: the best cell with its interval, its difference from the reference
    (interval and p), the cells it cannot be told apart from, and a warning when the test split is too
    small to separate the cells."""
    c = comparison
    if not c.cells:
        return ["No cell has per-case test results, so no interval can be given: the study ran before "
                "per-case results were logged, or every trial failed. Re-run it to get the verdict."]
    pct = f"{100 * c.confidence:.0f}%"
    how = (f"{pct} intervals from {c.resamples} bootstrap resamples of the {len(c.subjects)} test subjects"
           + (" and of each cell's repeats, seed re-runs or race rounds" if c.seeds_resampled else "")
           + ("; the test-score intervals and this share also include the variation between training runs"
              if c.between_run_sd is not None else ""))
    best = c.cells[c.best]
    lines = [f"Best cell: {c.best}, test score {best.estimate['score']:.3f} {_ci(best.ci['score'])} "
             f"(Dice {best.estimate['dice']:.3f} {_ci(best.ci['dice'])}, AUC {best.estimate['auc']:.3f} "
             f"{_ci(best.ci['auc'])}); it is best in {100 * best.p_best:.0f}% of the resamples ({how})"
             + _more_often_best(c) + "."]
    if c.reference is None:
        lines.append("No reference cell with per-case results (the default, none__full, the from-scratch "
                     "baseline, is not in this study or has no finished trial, and --reference names none): no "
                     "paired differences or tests.")
    elif c.reference == c.best:
        lines.append(f"The best cell is the reference ({c.reference}): no other cell beat it on the point "
                     "estimate.")
    else:
        d = best.vs_reference["score"]
        resolved = d["ci"][0] > 0 or d["ci"][1] < 0
        lines.append(
            f"Against the reference {c.reference} ({c.cells[c.reference].estimate['score']:.3f}): difference "
            f"{_signed(d['difference'])} {_ci(d['ci'])} in test score, "
            f"{_signed(best.vs_reference['dice']['difference'])} {_ci(best.vs_reference['dice']['ci'])} in Dice; "
            f"Wilcoxon signed-rank p = {_p(best.wilcoxon_p)} on per-subject Dice, {_p(best.holm_p)} after Holm's "
            f"correction over {sum(s.wilcoxon_p is not None and math.isfinite(s.wilcoxon_p) for s in c.cells.values())}"
            " cells. "
            + ("The difference is resolved." if resolved else "The difference is not resolved: the interval "
               "includes 0."))
    tied = [x for x in c.tied_with_best() if x != c.best]
    if tied:
        shown = ", ".join(tied[:12]) + (f" and {len(tied) - 12} more" if len(tied) > 12 else "")
        lines.append(f"The data cannot tell the best cell apart from {len(tied)} other cell(s): {shown} (the "
                     f"{pct} interval of the paired difference in test score includes 0{_runs_note(c)}). Choose "
                     "among them on cost, or add test subjects or seeds.")
    elif len(c.cells) > 1:
        lines.append(f"The best cell is separated from every other cell (each paired difference's {pct} "
                     f"interval excludes 0{_runs_note(c)}).")
    else:
        lines.append("It is the only cell with per-case results: there is nothing to compare it with.")
    if best.runs == 1 and len(c.cells) > 1:
        lines.append("Caution: the best cell's interval comes from one training run, so it covers the choice of "
                     "test subjects, not the variation between training runs, which can be larger (at the laptop "
                     "budget two runs of a configuration differed by about 0.09 in test score, against intervals "
                     "of ±0.02: bench/RESULTS.md, \"Rank stability\"). Repeats bring that variation in: a race "
                     "(--race-budget N) or --seeds N.")
    if c.too_small():
        lines.append(f"Warning: the test split ({len(c.subjects)} subjects) is too small to separate the cells: a "
                     f"typical interval is ±{c.typical_half_width():.3f} wide, more than the spread of the cells' "
                     f"test scores (standard deviation {c.spread():.3f}). The ranking below is mostly noise.")
    if c.missing:
        lines.append(f"{len(c.missing)} cell(s) have no per-case results and are not compared: "
                     + ", ".join(c.missing[:8]) + ("…" if len(c.missing) > 8 else ""))
    return lines


def label_verdict(cells: list, comparison: Comparison) -> list[str]:
    """With several label fractions: at which fraction pre-training (each method against ``none``) and a
    parameter-efficient strategy (against ``full``) stop helping, from paired bootstrap differences of the
    test score at each fraction; or that they never resolved. ``cells``: the report's cells (``pretrain``,
    ``strategy``, ``backbone``, ``fraction``, ``id``)."""
    fractions = sorted({c.fraction for c in cells})
    if len(fractions) < 2:
        return []
    by_key = {(c.pretrain, c.strategy, c.backbone, c.fraction): c.id for c in cells}
    pairs = []  # (what, against, [(fraction, diff dict)])
    for pretrain, strategy, backbone in dict.fromkeys((c.pretrain, c.strategy, c.backbone) for c in cells):
        for other, kind in ((("none", strategy), "pre-training"), ((pretrain, "full"), "strategy")):
            if (pretrain, strategy) == other or (kind == "pre-training" and pretrain == "none") or (
                    kind == "strategy" and strategy == "full"):
                continue
            steps = []
            for f in fractions:
                a, b = by_key.get((pretrain, strategy, backbone, f)), by_key.get((*other, backbone, f))
                diff = comparison.group_difference([a], [b], "score") if a and b else None
                if diff is not None:
                    steps.append((f, diff))
            if len(steps) >= 2:
                pairs.append((f"{pretrain} x {strategy} ({backbone})", f"{other[0]} x {other[1]}", steps))
    lines, never = [], []
    for what, against, steps in pairs:
        helps = [f for f, d in steps if d["ci"][0] > 0]
        hurts = [f for f, d in steps if d["ci"][1] < 0]
        if not helps and not hurts:
            never.append(f"{what} vs {against}")
            continue
        detail = "; ".join(f"{f:g}: {_signed(d['difference'])} {_ci(d['ci'])}" for f, d in steps)
        if helps:
            after = [f for f, _ in steps if f > max(helps)]
            end = (f"it stops helping from fraction {min(after):g} on" if after else
                   "it helps up to the largest fraction")
            lines.append(f"Label efficiency: {what} beats {against} at label fraction(s) "
                         f"{', '.join(f'{f:g}' for f in helps)}; {end} (difference in test score by fraction: {detail}).")
        else:
            lines.append(f"Label efficiency: {what} is worse than {against} at label fraction(s) "
                         f"{', '.join(f'{f:g}' for f in hurts)} and never better (by fraction: {detail}).")
    if never:
        lines.append(f"Label efficiency: not resolved at any label fraction ({len(never)} comparison(s)): "
                     f"{'; '.join(never)}.")
    return lines


def _more_often_best(c: Comparison) -> str:
    """A clause naming the cell best in more resamples than the best on the point estimate, if there is one."""
    rival = max((s for s in c.cells.values() if s.cell != c.best), key=lambda s: s.p_best, default=None)
    if rival is None or rival.p_best <= c.cells[c.best].p_best:
        return ""
    return (f"; {rival.cell} is best in more of them ({100 * rival.p_best:.0f}%), so which of the two is best "
            "is not settled")


def _runs_note(c: Comparison) -> str:
    if c.between_run_sd is None:
        return ""
    return (f"; these intervals include the variation between training runs, a standard deviation of "
            f"{c.between_run_sd:.3f} in test score pooled from the cells' repeats")


def _mean_metric(runs: list, key: str) -> float:
    values = [r.data.metrics[key] for r in runs if key in r.data.metrics and math.isfinite(r.data.metrics[key])]
    return statistics.fmean(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _claim(name: str, status: str, evidence: str) -> dict:
    return {"claim": name, "status": status, "evidence": evidence}


def _balance(diff: dict, cheaper: bool) -> str:
    """A "good enough and cheaper" finding: contradicted when resolved as worse or when not cheaper,
    supported when cheaper and not resolved as worse, not resolved when the interval is undefined."""
    lo, hi = diff["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_RESOLVED
    return CONTRADICTED if hi < 0 or not cheaper else SUPPORTED


def _cache_note(pretrain_runs: list) -> str:
    """Which pre-training costs were not measured in this study: a checkpoint from the cache reports the
    time and memory measured when it was trained."""
    cached = sorted(r.data.tags.get("pretrain", "?") for r in pretrain_runs if r.data.metrics.get("cache_hit") == 1.0)
    if not cached:
        return ""
    return (f". The checkpoint(s) of {', '.join(cached)} came from the pre-training cache: their cost is the one "
            "measured when they were trained, in an earlier study (maybe on another machine or under another "
            "load); clear the cache (--pretrain-cache) to measure every method here")


def claims(comparison: Comparison, cells: list, pretrain_runs: list) -> list[dict]:
    """The source study's four findings, each ``supported``, ``contradicted``, ``not resolved`` or ``not
    tested`` here, with its numbers (a list of ``{claim, status, evidence}``).

    Args:
        comparison: the cells' statistics.
        cells: the report's cell results (``id``, ``pretrain``, ``strategy``, ``best`` run).
        pretrain_runs: the study's finished pre-training runs (their time and memory).
    """
    c = comparison
    by = {x.id: x for x in cells if x.best is not None and x.id in c.cells}
    out = []

    def ids(pred) -> list[str]:
        return [i for i, x in by.items() if pred(x)]

    def cost(group: list[str], key: str) -> float:
        return _mean_metric([by[i].best for i in group], key)

    def matched(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
        """The cells of two strategy groups restricted to the (pre-training, backbone) pairs both have, so
        that a difference between strategies is not one between pre-training methods."""
        pairs = {(by[i].pretrain, by[i].backbone) for i in a} & {(by[i].pretrain, by[i].backbone) for i in b}
        return ([i for i in a if (by[i].pretrain, by[i].backbone) in pairs],
                [i for i in b if (by[i].pretrain, by[i].backbone) in pairs])

    def against_full(strategy: str) -> tuple[list[str], list[str], dict | None]:
        """``strategy``'s cells, the matching full fine-tuning cells, and their paired Dice difference."""
        mine, full = matched(ids(lambda x: x.strategy == strategy), ids(lambda x: x.strategy == "full"))
        return mine, full, c.group_difference(mine, full, "dice")

    # 1. reconstruction and adversarial pre-training balance accuracy and cost
    name = "Reconstruction and adversarial pre-training balance accuracy and cost"
    group = ids(lambda x: x.pretrain in ("reconstruction", "adversarial"))
    others = ids(lambda x: x.pretrain not in ("reconstruction", "adversarial", "none"))
    diff = c.group_difference(group, others, "score")
    method_time = {}
    for r in pretrain_runs:
        m = r.data.tags.get("pretrain", "")
        if math.isfinite(r.data.metrics.get("time_per_epoch_s", math.nan)):
            method_time.setdefault(m, []).append(r.data.metrics["time_per_epoch_s"])
    mine = [statistics.fmean(v) for m, v in method_time.items() if m in ("reconstruction", "adversarial")]
    theirs = [statistics.fmean(v) for m, v in method_time.items() if m not in ("reconstruction", "adversarial", "none")]
    if diff is None or not mine or not theirs:
        out.append(_claim(name, NOT_TESTED, "needs cells of reconstruction or adversarial and of another "
                                            "pre-training method, with their pre-training runs"))
    else:
        ratio = _ratio(statistics.fmean(mine), statistics.fmean(theirs))
        evidence = (f"test score {_signed(diff['difference'])} {_ci(diff['ci'])} against the other pre-training "
                    f"methods ({diff['cells']} vs {diff['other_cells']} cells); pre-training time per epoch "
                    f"{ratio:.2f}x theirs")
        status = _balance(diff, ratio < 1) if math.isfinite(ratio) else NOT_RESOLVED
        out.append(_claim(name, status, evidence + " (supported: not resolved as less accurate, and cheaper)"
                          + _cache_note(pretrain_runs)))

    # 2. diffusion is the most resource-intensive pre-training
    name = "Diffusion pre-training is the most resource-intensive"
    costs = {}
    for r in pretrain_runs:
        m, metrics = r.data.tags.get("pretrain", ""), r.data.metrics
        pair = (metrics.get("time_per_epoch_s", math.nan), metrics.get("peak_memory_mb", math.nan))
        if all(math.isfinite(x) for x in pair):
            costs.setdefault(m, []).append(pair)
    if "diffusion" not in costs or len(costs) < 2:
        out.append(_claim(name, NOT_TESTED, "needs the diffusion pre-training run and another method's"))
    else:
        mean = {m: (statistics.fmean(t for t, _ in v), statistics.fmean(b for _, b in v)) for m, v in costs.items()}
        top_time = max(mean, key=lambda m: mean[m][0])
        top_memory = max(mean, key=lambda m: mean[m][1])
        evidence = "; ".join(f"{m} {t:.2f} s/epoch, {b:.0f} MB" for m, (t, b) in sorted(mean.items()))
        hits = (top_time == "diffusion") + (top_memory == "diffusion")
        status = SUPPORTED if hits == 2 else CONTRADICTED if hits == 0 else NOT_RESOLVED
        out.append(_claim(name, status, f"pre-training cost per method (one measurement each): {evidence}"
                          + _cache_note(pretrain_runs)))

    # 3. top-level tuning: strong segmentation at low cost
    name = "Top-level tuning gives strong segmentation at low cost"
    top, full_for_top, diff = against_full("top")
    if diff is None:
        out.append(_claim(name, NOT_TESTED, "needs top and full cells"))
    else:
        memory = _ratio(cost(top, "peak_memory_mb"), cost(full_for_top, "peak_memory_mb"))
        time = _ratio(cost(top, "time_per_epoch_s"), cost(full_for_top, "time_per_epoch_s"))
        evidence = (f"Dice {_signed(diff['difference'])} {_ci(diff['ci'])} against full fine-tuning; peak memory "
                    f"{memory:.2f}x, time per epoch {time:.2f}x full's")
        status = _balance(diff, memory < 1 and time < 1) if math.isfinite(memory + time) else NOT_RESOLVED
        out.append(_claim(name, status, evidence + " (supported: Dice not resolved as lower, and cheaper)"))

    # 4. LoRA is weaker on this small-region task
    name = "LoRA is weaker on this small-region task"
    _, _, diff = against_full("lora")
    if diff is None:
        out.append(_claim(name, NOT_TESTED, "needs lora and full cells"))
    else:
        status = SUPPORTED if diff["ci"][1] < 0 else CONTRADICTED if diff["ci"][0] > 0 else NOT_RESOLVED
        out.append(_claim(name, status, f"Dice {_signed(diff['difference'])} {_ci(diff['ci'])} against full "
                                        f"fine-tuning ({diff['cells']} vs {diff['other_cells']} cells)"))
    return out
