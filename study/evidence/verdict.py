"""What the report says first: the verdict (the cell chosen on validation, the set that may be best, its
confirmation on test against the reference, what it would take), and the source study's four findings tested
on this study's data, as exploratory claims.

The numbers come from :mod:`study.evidence.inference` (and :mod:`study.evidence.stats` for the test split's
ranking table); this module only words them. The four findings are those of
the PCS study this tool grew from (arXiv 2405.19204): reconstruction and adversarial pre-training
balance accuracy and cost; diffusion pre-training is the most resource-intensive; top-level tuning gives
strong segmentation at low cost; LoRA is weaker on this small-region task.
"""

from __future__ import annotations

import math
import statistics

from study.evidence.inference import (
    CONTRADICTED,
    MARGIN,
    NEEDS_REPEATS,
    NOT_RESOLVED,
    SUPPORTED,
    claim_status,
    group_difference,
)
from study.evidence.stats import Comparison

NOT_TESTED = "not tested"
# a cell whose mean validation score is not above the chance score (trainables.metrics.chance_score) by this much
# did not learn within the budget: its place in the ranking says nothing about its strategy
LEARN_MARGIN = 0.05


def learning(cells: list) -> dict[str, dict]:
    """Per cell with runs: its mean validation score over its runs (``score``), the validation split's chance
    score (logged by every run since it was added, else None) and ``learned``: True, False, or None where the
    chance score is unknown."""
    out = {}
    for cell in cells:
        if cell.best is None:
            continue
        mean = cell.stat("score")[0]
        chance = cell.best.data.metrics.get("val_chance_score")
        learned = None if chance is None or not math.isfinite(mean) else bool(mean >= chance + LEARN_MARGIN)
        out[cell.id] = {"val_score": mean, "chance": chance, "learned": learned}
    return out


def learning_line(status: dict[str, dict]) -> str | None:
    """The verdict's line on the cells that did not learn within the budget (None when every cell learned)."""
    known = {k: v for k, v in status.items() if v["learned"] is not None}
    idle = sorted(k for k, v in known.items() if not v["learned"])
    if not idle:
        return None
    chance = statistics.fmean(v["chance"] for v in known.values())
    return (f"{len(idle)} of {len(known)} cells did not learn within the budget (mean validation score below "
            f"{chance:.3f} + {LEARN_MARGIN:g}, where {chance:.3f} is what a model that learned nothing scores: an "
            f"empty segmentation and a constant presence probability): " + ", ".join(idle[:12])
            + ("…" if len(idle) > 12 else "") + ". Their rank says nothing about their strategy: they are not "
            "'worse than the reference', they are untested at this budget.")


def _ci(ci: tuple[float, float]) -> str:
    lo, hi = ci
    return "[–]" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"


def _signed(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "–"


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdict(comparison: Comparison, evidence: dict | None = None) -> list[str]:
    """The report's first paragraphs: the choice on validation (the best cell and the set that may be best),
    its confirmation on test against the reference (the study's one primary comparison), what it would take
    to resolve it, and a warning when the test split is too small to separate the cells."""
    c = comparison
    if not c.cells or not evidence or not evidence["selection"]["best"]:
        return ["No cell has per-case results, so no interval can be given: the study ran before "
                "per-case results were logged, or every trial failed. Re-run it to get the verdict."]
    lines = [_choice_line(evidence), _best_set_line(evidence), *_confirmation_lines(evidence)]
    if c.too_small():
        lines.append(f"Warning: the test split ({len(c.subjects)} subjects) is too small to separate the cells: a "
                     f"typical interval is ±{c.typical_half_width():.3f} wide, more than the spread of the cells' "
                     f"test scores (standard deviation {c.spread():.3f}). The ranking below is mostly noise.")
    if c.missing:
        lines.append(f"{len(c.missing)} cell(s) have no per-case results and are not compared: "
                     + ", ".join(c.missing[:8]) + ("…" if len(c.missing) > 8 else ""))
    return lines


def _choice_line(evidence: dict) -> str:
    sel = evidence["selection"]
    best, k = sel["best"], sel["runs"].get(sel["best"], 0)
    if sel["chosen_from"] == "repeats":
        how = (f"the highest mean validation score over repeats, {sel['means'][best]:.3f} over {k} runs (the "
               "search's own run, picked for being high, left out)")
    else:
        how = (f"the highest validation score of the search, {sel['means'][best]:.3f}; no cell has "
               f"{evidence['min_runs']} repeats, so the choice rests on runs picked for being high")
    return f"Chosen on validation: {best}, {how}."


def _best_set_line(evidence: dict) -> str:
    sel = evidence["selection"]
    ready = [c for c, k in sel["runs"].items() if k >= evidence["min_runs"]]
    if len(ready) < 2:
        return (f"Which cells may be best is not resolved: needs repeats (fewer than two cells have "
                f"{evidence['min_runs']} runs besides the search's; a race, --race-budget, or --seeds "
                f"{evidence['min_runs']} brings them).")
    may = [c for c in sel["may_be_best"] if c in ready]
    shown = ", ".join(may[:12]) + (f" and {len(may) - 12} more" if len(may) > 12 else "")
    out = [c for c in ready if c not in may]
    return (f"Of the {len(ready)} cells with {evidence['min_runs']}+ repeats, {len(may)} may be best: {shown} "
            f"(Hsu's multiple comparisons with the best, with Tukey-Kramer's critical value at family-wise "
            f"alpha {sel['alpha']:g}, on validation over runs and subjects; between-run sd {sel['run_sd']:.3f}, "
            f"df {sel['df']}); " + (f"{len(out)} are shown worse than another cell." if out else
                                    "none is shown worse than another."))


def _confirmation_lines(evidence: dict) -> list[str]:
    conf = evidence["confirmation"]
    best, ref = conf["best"], conf["reference"]
    est = conf["estimates"]
    primary = "Primary comparison (the only confirmatory one; everything else in this report is exploratory): "
    if not conf["runs"].get(best):
        return [primary + f"not confirmed on test: {best} has no confirmation runs (--confirm-runs N gives it and "
                "the reference N fresh runs each). The test figures below are measured after selection on "
                "validation: the chosen cell's is optimistic (it was chosen because it scored high)."]

    def text(cell: str) -> str:
        e = est.get(cell, {}).get("score")
        if not e:
            return f"{cell} –"
        return f"{cell} {e['value']:.3f} {_ci(tuple(e['ci']))} ({e['runs']} runs)"

    if ref is None:
        return [primary + f"on test, {text(best)}; no reference cell in this study (--reference CELL)."]
    if ref == best:
        return [primary + f"the cell chosen on validation is the reference itself: on test, {text(best)}."]
    d = conf["difference"].get("score")
    if d is None:
        return [primary + f"on test, {text(best)}; the reference {ref} has no confirmation run."]
    verdict_word = {"resolved": "The difference is resolved.",
                    "not resolved": "The difference is not resolved: its interval includes 0.",
                    "not resolved: needs repeats": f"Not resolved: needs repeats ({evidence['min_runs']} "
                    "confirmation runs on each side)."}[d["status"]]
    lines = [primary + f"confirmed on test with fresh runs: {text(best)} against the reference {text(ref)}: "
             f"difference {_signed(d['difference'])} {_ci(tuple(d['ci']))} in test score (t, df {d['df']:.0f}, "
             f"p = {_p(d['p'])}; the runs' and the test subjects' variation). {verdict_word}"]
    take = evidence.get("what_it_would_take")
    if take and d["status"] != "resolved":
        runs, subjects = take["runs_per_side"], take["test_subjects"]
        parts = []
        if runs:
            parts.append(f"{runs} confirmation runs of each (--confirm-runs {runs})")
        if subjects:
            parts.append(f"{subjects} test subjects with the runs there are")
        lines.append(f"What it would take: to resolve a true difference of {_signed(take['difference'])} with "
                     f"{100 * take['power']:.0f}% power, " + (" or ".join(parts) if parts else
                     "more runs alone would not do: the test subjects' variation is too large; add test subjects")
                     + ".")
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


def _mean_metric(runs: list, key: str) -> float:
    values = [r.data.metrics[key] for r in runs if key in r.data.metrics and math.isfinite(r.data.metrics[key])]
    return statistics.fmean(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _claim(name: str, status: str, evidence: str) -> dict:
    return {"claim": name, "status": status, "evidence": evidence, "kind": "exploratory"}


def _balance(diff: dict, cheaper: bool, margin: float) -> str:
    """A "good enough and cheaper" finding: supported only when non-inferiority within ``margin`` is resolved
    and it is cheaper; contradicted when it is not cheaper or resolved as worse by more than ``margin``;
    otherwise not resolved (and never support)."""
    status = claim_status(diff, "non_inferior", margin)
    if not cheaper and status != NEEDS_REPEATS:
        return CONTRADICTED
    return status


def _diff_text(diff: dict) -> str:
    return (f"{_signed(diff['difference'])} {_ci(tuple(diff['ci']))}, fewest runs per cell {diff['fewest_runs']}")


def _cache_note(pretrain_runs: list) -> str:
    """Which pre-training costs were not measured in this study: a checkpoint from the cache reports the
    time and memory measured when it was trained."""
    cached = sorted(r.data.tags.get("pretrain", "?") for r in pretrain_runs if r.data.metrics.get("cache_hit") == 1.0)
    if not cached:
        return ""
    return (f". The checkpoint(s) of {', '.join(cached)} came from the pre-training cache: their cost is the one "
            "measured when they were trained, in an earlier study (maybe on another machine or under another "
            "load); clear the cache (--pretrain-cache) to measure every method here")


def claims(comparison: Comparison, cells: list, pretrain_runs: list, margin: float = MARGIN) -> list[dict]:
    """The source study's four findings, each ``supported``, ``contradicted``, ``not resolved``, ``not
    resolved: needs repeats`` or ``not tested`` here, with its numbers (a list of ``{claim, status, evidence,
    kind}``; every one is exploratory: the primary comparison is the verdict's). The group contrasts are
    :func:`study.evidence.inference.group_difference` over training runs (each cell's unselected runs, at least
    ``MIN_RUNS`` per cell to resolve anything) and :func:`study.evidence.inference.claim_status`: "good enough
    at lower cost" needs non-inferiority within ``margin`` resolved.

    Args:
        comparison: the cells' statistics.
        cells: the report's cell results (``id``, ``pretrain``, ``strategy``, ``best`` run, ``evidence_runs``).
        pretrain_runs: the study's finished pre-training runs (their time and memory).
        margin: the non-inferiority margin, in the compared metric's units.
    """
    by = {x.id: x for x in cells if x.best is not None and x.evidence_runs}
    runs = {i: x.evidence_runs for i, x in by.items()}
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
        return mine, full, group_difference(runs, mine, full, "dice")

    # 1. reconstruction and adversarial pre-training balance accuracy and cost
    name = "Reconstruction and adversarial pre-training balance accuracy and cost"
    group = ids(lambda x: x.pretrain in ("reconstruction", "adversarial"))
    others = ids(lambda x: x.pretrain not in ("reconstruction", "adversarial", "none"))
    diff = group_difference(runs, group, others, "score")
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
        evidence = (f"test score {_diff_text(diff)} against the other pre-training methods ({diff['cells']} vs "
                    f"{diff['other_cells']} cells); pre-training time per epoch {ratio:.2f}x theirs")
        status = _balance(diff, ratio < 1, margin) if math.isfinite(ratio) else NOT_RESOLVED
        out.append(_claim(name, status, evidence + f" (supported needs: resolved as at most {margin:g} below, and cheaper)"
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
        evidence = (f"Dice {_diff_text(diff)} against full fine-tuning; peak memory {memory:.2f}x, time per epoch "
                    f"{time:.2f}x full's")
        status = _balance(diff, memory < 1 and time < 1, margin) if math.isfinite(memory + time) else NOT_RESOLVED
        out.append(_claim(name, status, evidence + f" (supported needs: Dice resolved as at most {margin:g} below, and "
                          "cheaper)"))

    # 4. LoRA is weaker on this small-region task
    name = "LoRA is weaker on this small-region task"
    _, _, diff = against_full("lora")
    if diff is None:
        out.append(_claim(name, NOT_TESTED, "needs lora and full cells"))
    else:
        out.append(_claim(name, claim_status(diff, "lower", margin),
                          f"Dice {_diff_text(diff)} against full fine-tuning ({diff['cells']} vs {diff['other_cells']} "
                          f"cells; supported needs: resolved as lower; contradicted: resolved as at most {margin:g} below)"))
    return out
