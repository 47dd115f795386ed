"""Inference with the training run as the unit: choose on validation, confirm on test.

A claim about a *configuration* (a cell's best hyperparameters) is a claim about what training it again
would give, so its unit is the training run, not the test subject: the per-subject results of one trained
model compare two models, not two configurations. Every figure here combines two sources of variation:

- **between runs**: one run's score moves between training runs of the same configuration (seed: the
  initialisation, the data order, the best epoch). Its variance ``s^2`` is pooled over the cells' runs that
  were *not* chosen for being high (:attr:`Run.selected`, the search's best trial, is left out: it was picked
  by its own validation score), with ``df = sum(k - 1)`` over the cells, per metric (score, Dice and AUC each
  have their own);
- **between subjects**: the subject-clustered bootstrap of :mod:`study.evidence.stats` (one matrix of
  resampled subjects shared by every cell, so differences are paired), applied to each cell's mean over runs.

A cell mean's variance is ``s^2 / k + v_subjects``; a difference's is ``s^2 (1/k_a + 1/k_b) + v_paired``. The
degrees of freedom are Welch-Satterthwaite's (runs: ``df``; subjects: ``n - 1``); intervals use t quantiles
and are built on a scale that respects the metric's range (logit for a score in [0, 1], Fisher's z for a
difference in [-1, 1]), so no interval passes a bound.

What each procedure guarantees (measured by ``bench/inference.py``, which runs this code on synthetic tables
with known truth; the suite runs a small seeded version):

- :func:`select` (validation): the best cell is the highest validation mean; the *set that may be best* is
  Hsu's multiple comparisons with the best (MCB) in its constrained form, with Tukey-Kramer's studentized-range
  critical value instead of Dunnett's one-sided one, so that every exclusion is a strict claim ("some cell is
  better than it") whose family-wise error is at most ``alpha`` even when cells tie. A cell with fewer than
  ``MIN_RUNS`` unselected runs can be neither excluded nor used to exclude.
- :func:`confirm` (test, once): the chosen cell and the reference from their *confirmation runs* only (fresh
  runs after the choice, so the choice's winner's curse does not reach them): each mean with its t interval,
  their difference with its interval and two-sided p. "Resolved" needs ``MIN_RUNS`` confirmation runs on each
  side and an interval that excludes 0; else "not resolved", or "not resolved: needs repeats".
- :func:`group_difference`: the exploratory claims' group contrasts, with the same run-level variance and the
  same ``MIN_RUNS`` rule.
- :func:`rank_intervals`: per cell a bootstrap interval of its rank (subjects resampled and each cell's mean
  moved by a normal draw of its run variance), and Kendall's tau between the ranking and its resamples.
- :func:`runs_to_resolve`: from the variance components, the runs per side that resolve a difference at a
  given power (normal approximation).

Nothing here knows of Ray or MLflow: the race (:mod:`study.evidence.racing`), the report and the bench call it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import stats as scipy_stats

from study.evidence.stats import CONFIDENCE, STATISTICS, Cases

MIN_RUNS = 3  # runs of each side that a "resolved" difference, an exclusion or a claim needs
ALPHA = 0.05
MARGIN = 0.02  # the default non-inferiority margin, in the compared metric's units
SPLITS = ("val", "test")
SUBJECT_RESAMPLES = 1000
SMALLEST = 0.05  # what-it-would-take's difference when the measured one is smaller than this


@dataclass
class Run:
    """One training run of a cell's configuration: its per-case validation and test results.

    ``selected``: the run the search chose the configuration by (its validation score is the maximum over
    the search's trials, so it is biased upward and is left out of variance estimates and confirmations).
    ``phase``: ``search``, ``seeds``, ``race`` or ``confirm`` (:mod:`trainables.phases`)."""

    val: Cases | None
    test: Cases | None
    phase: str = "search"
    selected: bool = False
    round: int | None = None

    def cases(self, split: str) -> Cases | None:
        return self.val if split == "val" else self.test


def run_value(cases: Cases, metric: str) -> float:
    """One run's ``metric`` on all its cases."""
    return float(STATISTICS[metric](cases, np.arange(len(cases.subjects))[None, :])[0])


@dataclass(frozen=True)
class RunVariance:
    """The pooled between-run variance of one metric on one split: ``variance`` with ``df`` degrees of freedom
    from ``cells`` cells' unselected runs."""

    metric: str
    split: str
    variance: float
    df: int
    cells: int

    @property
    def sd(self) -> float:
        return math.sqrt(self.variance)


def run_variance(cells: dict[str, list[Run]], split: str, metric: str) -> RunVariance | None:
    """Pool the variance of ``metric`` between the unselected runs of every cell with two or more of them
    (``df = sum(k - 1)``); None when no cell has two."""
    num = 0.0
    df = used = 0
    for runs in cells.values():
        values = [v for v in (run_value(c, metric) for c in _split_cases(runs, split)) if math.isfinite(v)]
        if len(values) > 1:
            num += (len(values) - 1) * float(np.var(values, ddof=1))
            df += len(values) - 1
            used += 1
    return RunVariance(metric, split, num / df, df, used) if df else None


def _split_cases(runs: list[Run], split: str, include_selected: bool = False) -> list[Cases]:
    return [c for r in runs if (include_selected or not r.selected) and (c := r.cases(split)) is not None]


@dataclass
class SubjectBootstrap:
    """Each cell's mean-over-runs statistic per resample of the shared subjects (``samples[cell]``, shape
    ``(B,)``) and on all of them (``point[cell]``)."""

    subjects: list[str]
    samples: dict[str, np.ndarray]
    point: dict[str, float]

    def variance(self, cell: str) -> float:
        return _var(self.samples[cell])

    def paired_variance(self, a: str, b: str) -> float:
        return _var(self.samples[a] - self.samples[b])


def _var(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.var(x, ddof=1)) if x.size > 1 else 0.0


def bootstrap_subjects(cells: dict[str, list[Cases]], metric: str, resamples: int = SUBJECT_RESAMPLES,
                       seed: int = 0) -> SubjectBootstrap:
    """The subject-clustered bootstrap of every cell's mean over its runs, on the subjects all share."""
    cells = {c: rs for c, rs in cells.items() if rs}
    if not cells:
        return SubjectBootstrap([], {}, {})
    common = sorted(set.intersection(*(set(x.subjects) for rs in cells.values() for x in rs)))
    if not common:
        return SubjectBootstrap([], {}, {})
    n = len(common)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    full = np.arange(n)[None, :]
    fn = STATISTICS[metric]
    samples, point = {}, {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a statistic undefined in every run stays NaN
        for cell, rs in cells.items():
            subset = [x.subset(common) for x in rs]
            samples[cell] = np.nanmean(np.stack([fn(x, idx) for x in subset]), axis=0)
            point[cell] = float(np.nanmean([fn(x, full)[0] for x in subset]))
    return SubjectBootstrap(common, samples, point)


# -- intervals -------------------------------------------------------------------------------------------------
def satterthwaite(parts: list[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variances ``[(variance, df), ...]``."""
    total = sum(v for v, _ in parts)
    denominator = sum(v * v / d for v, d in parts if d > 0 and v > 0)
    return total * total / denominator if denominator > 0 else math.inf


def t_quantile(confidence: float, df: float) -> float:
    p = 0.5 + confidence / 2
    return float(scipy_stats.norm.ppf(p) if not math.isfinite(df) else scipy_stats.t.ppf(p, df))


def bounded_interval(point: float, se: float, df: float, confidence: float = CONFIDENCE,
                     bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """A t interval of ``point`` built on a scale that maps ``bounds`` to the real line (logit for [0, 1],
    Fisher's z for [-1, 1]; the delta method carries ``se`` there), so it never passes a bound."""
    if not (math.isfinite(point) and math.isfinite(se)):
        return float("nan"), float("nan")
    lo_b, hi_b = bounds
    width = hi_b - lo_b
    u = min(max((point - lo_b) / width, 1e-6), 1 - 1e-6)  # the point on [0, 1]
    g, se_g = math.log(u / (1 - u)), (se / width) / (u * (1 - u))
    q = t_quantile(confidence, df)

    def back(x: float) -> float:
        return lo_b + width / (1 + math.exp(-x))

    return back(g - q * se_g), back(g + q * se_g)


@dataclass
class Estimate:
    """A mean over runs with its standard error, degrees of freedom and interval."""

    value: float
    se: float
    df: float
    ci: tuple[float, float]
    runs: int

    def to_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "df": self.df, "ci": list(self.ci), "runs": self.runs}


def _estimate(point: float, run_var: RunVariance | None, runs: int, subject_var: float, n: int,
              confidence: float, bounds: tuple[float, float], runs_b: int = 0) -> Estimate:
    """``point`` with variance ``s^2 (1/runs [+ 1/runs_b]) + subject_var``."""
    if run_var is None or runs < 1:
        return Estimate(point, float("nan"), float("nan"), (float("nan"), float("nan")), runs)
    v_run = run_var.variance * (1 / runs + (1 / runs_b if runs_b else 0.0))
    df = satterthwaite([(v_run, run_var.df), (subject_var, max(n - 1, 1))])
    se = math.sqrt(v_run + subject_var)
    return Estimate(point, se, df, bounded_interval(point, se, df, confidence, bounds), runs)


# -- choosing on validation -------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def tukey_critical(alpha: float, cells: int, df: float) -> float:
    """Tukey's studentized-range critical value over ``sqrt(2)``: the multiple of a difference's standard
    error beyond which any of ``cells`` equal means differs with probability ``alpha``."""
    if cells < 2:
        return math.inf
    df = min(df, 1e4) if math.isfinite(df) else 1e4
    return float(scipy_stats.studentized_range.ppf(1 - alpha, cells, df)) / math.sqrt(2)


@dataclass
class Selection:
    """The choice on validation: the best cell, the set that may be best and why each other cell is out."""

    best: str | None
    metric: str
    means: dict[str, float]
    runs: dict[str, int]  # unselected validation runs per cell
    may_be_best: list[str]
    excluded: dict[str, dict] = field(default_factory=dict)  # cell -> {by, difference, threshold}
    critical: float = math.nan
    alpha: float = ALPHA
    run_sd: float | None = None
    df: int | None = None
    chosen_from: str = "repeats"  # repeats: means over unselected runs; search: over every run (no repeats)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "metric", "means", "runs", "may_be_best", "excluded",
                                               "critical", "alpha", "run_sd", "df", "chosen_from")}


def separation(means: dict[str, float], runs: dict[str, int], run_var: RunVariance, boot: SubjectBootstrap,
               alpha: float) -> tuple[dict[str, dict], float]:
    """The cells (each with ``MIN_RUNS`` runs or more) that another such cell beats by more than the
    Tukey-Kramer threshold ``critical * se`` (``se^2 = s^2 (1/k_i + 1/k_j) + v_paired``), with the cell that
    beats it by the most; and the critical value."""
    tested = [c for c in means if runs.get(c, 0) >= MIN_RUNS and c in boot.samples and math.isfinite(means[c])]
    critical = tukey_critical(alpha, len(tested), float(run_var.df))
    out: dict[str, dict] = {}
    for i in tested:
        worst = None
        for j in tested:
            if j == i:
                continue
            se = math.sqrt(run_var.variance * (1 / runs[i] + 1 / runs[j]) + boot.paired_variance(j, i))
            margin = means[j] - means[i] - critical * se
            if margin > 0 and (worst is None or margin > worst[0]):
                worst = (margin, j, means[j] - means[i], critical * se)
        if worst is not None:
            out[i] = {"by": worst[1], "difference": worst[2], "threshold": worst[3]}
    return out, critical


def select(cells: dict[str, list[Run]], metric: str = "score", alpha: float = ALPHA,
           resamples: int = SUBJECT_RESAMPLES, seed: int = 0) -> Selection:
    """Choose on validation. The best is the highest mean validation ``metric`` over the unselected runs
    (repeats: seeds or race; never the confirmation runs) among the cells that have any, as the race chooses;
    without any repeat, the highest over every run (the search's selected runs: a choice may use them, a claim
    may not). Exclusions need ``MIN_RUNS`` repeats of each cell compared. See the module docstring
    for the set that may be best."""
    # the confirmation runs come after the choice and never feed it
    chooser = {c: [r for r in rs if r.phase != "confirm"] for c, rs in cells.items()}
    repeats = {c: _split_cases(rs, "val") for c, rs in chooser.items()}
    runs = {c: len(v) for c, v in repeats.items()}
    enough = {c: v for c, v in repeats.items() if len(v) >= MIN_RUNS}
    repeated = {c: v for c, v in repeats.items() if v}
    if repeated:  # as the race chooses: the best mean over repeats, whatever their number
        chosen_from, pool = "repeats", repeated
    else:
        chosen_from = "search"
        pool = {c: _split_cases(rs, "val", include_selected=True) for c, rs in chooser.items()}
    means = {c: float(np.nanmean([run_value(x, metric) for x in v])) for c, v in pool.items() if v}
    if not means:
        return Selection(None, metric, {}, runs, [], chosen_from=chosen_from)
    best = max(means, key=lambda c: (np.nan_to_num(means[c], nan=-math.inf), c))
    run_var = run_variance(chooser, "val", metric)
    excluded, critical = {}, math.nan
    if run_var is not None and enough:
        boot = bootstrap_subjects(enough, metric, resamples, seed)
        excluded, critical = separation(means, runs, run_var, boot, alpha)
    may_be_best = sorted((c for c in means if c not in excluded), key=lambda c: -np.nan_to_num(means[c], nan=-1))
    return Selection(best, metric, means, runs, may_be_best, excluded, critical, alpha,
                     run_var.sd if run_var else None, run_var.df if run_var else None, chosen_from)


# -- confirming on test -------------------------------------------------------------------------------------------
NEEDS_REPEATS = "not resolved: needs repeats"
RESOLVED, NOT_RESOLVED = "resolved", "not resolved"


@dataclass
class Confirmation:
    """The chosen cell and the reference on the test split, from their confirmation runs only."""

    best: str | None
    reference: str | None
    runs: dict[str, int]
    estimates: dict[str, dict[str, Estimate]]  # cell -> metric -> estimate
    difference: dict[str, dict]  # metric -> {difference, se, df, ci, p, status}
    status: str  # resolved | not resolved | not resolved: needs repeats | no confirmation runs | best is the reference

    def to_dict(self) -> dict:
        return {"best": self.best, "reference": self.reference, "runs": self.runs, "status": self.status,
                "estimates": {c: {m: e.to_dict() for m, e in ms.items()} for c, ms in self.estimates.items()},
                "difference": {m: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
                               for m, d in self.difference.items()}}


def confirm(cells: dict[str, list[Run]], best: str | None, reference: str | None,
            metrics: tuple[str, ...] = ("score", "dice", "auc"), confidence: float = CONFIDENCE,
            resamples: int = SUBJECT_RESAMPLES, seed: int = 0) -> Confirmation:
    """Confirm ``best`` against ``reference`` on the test split from their ``confirm``-phase runs (see the
    module docstring). The between-run variance of each metric is pooled from every cell's unselected test
    runs (repeats and confirmations: their test results chose nothing)."""
    confirm_runs = {c: [r.test for r in cells.get(c, []) if r.phase == "confirm" and r.test is not None]
                    for c in (best, reference) if c is not None}
    counts = {c: len(v) for c, v in confirm_runs.items()}
    if best is None:
        return Confirmation(None, reference, counts, {}, {}, "no confirmation runs")
    estimates: dict[str, dict[str, Estimate]] = {c: {} for c in confirm_runs}
    difference: dict[str, dict] = {}
    for metric in metrics:
        run_var = run_variance(cells, "test", metric)
        boot = bootstrap_subjects({c: v for c, v in confirm_runs.items() if v}, metric, resamples, seed)
        n = len(boot.subjects)
        for c, v in confirm_runs.items():
            if v and c in boot.samples:
                estimates[c][metric] = _estimate(boot.point[c], run_var, len(v), boot.variance(c), n, confidence,
                                                 (0.0, 1.0))
        if reference is None or reference == best or not all(c in boot.samples for c in (best, reference)):
            continue
        d = boot.point[best] - boot.point[reference]
        est = _estimate(d, run_var, counts[best], boot.paired_variance(best, reference), n, confidence, (-1.0, 1.0),
                        runs_b=counts[reference])
        p = (float(2 * scipy_stats.t.sf(abs(d) / est.se, est.df)) if est.se > 0 and math.isfinite(est.df)
             else float(2 * scipy_stats.norm.sf(abs(d) / est.se)) if est.se > 0 else float("nan"))
        enough = min(counts[best], counts[reference]) >= MIN_RUNS
        lo, hi = est.ci
        status = NEEDS_REPEATS if not enough else RESOLVED if (lo > 0 or hi < 0) else NOT_RESOLVED
        difference[metric] = {"difference": d, "se": est.se, "df": est.df, "ci": est.ci, "p": p, "status": status}
    if not counts.get(best):
        status = "no confirmation runs"
    elif reference is None or reference == best:
        status = "best is the reference" if reference == best else "no reference"
    else:
        status = difference.get("score", {}).get("status", NOT_RESOLVED)
    return Confirmation(best, reference, counts, estimates, difference, status)


# -- group contrasts (the exploratory claims) ------------------------------------------------------------------
def group_difference(cells: dict[str, list[Run]], group: list[str], others: list[str], metric: str,
                     split: str = "test", confidence: float = CONFIDENCE, resamples: int = SUBJECT_RESAMPLES,
                     seed: int = 0) -> dict | None:
    """The mean ``metric`` of ``group``'s cells minus that of ``others`` (each cell's mean over its unselected
    runs), with ``se^2 = s^2 (sum_g 1/k / n_g^2 + sum_o 1/k / n_o^2) + v_paired``; ``status`` reads
    "not resolved: needs repeats" when a cell on either side has fewer than ``MIN_RUNS`` unselected runs
    (those cells are then still in the point estimate). None when a side is empty."""
    group = [c for c in group if c in cells]
    others = [c for c in others if c in cells]
    per_cell = {c: _split_cases(cells[c], split) for c in (*group, *others)}
    group = [c for c in group if per_cell[c]]
    others = [c for c in others if per_cell[c]]
    if not group or not others:
        return None
    boot = bootstrap_subjects({c: per_cell[c] for c in (*group, *others)}, metric, resamples, seed)
    if not boot.subjects:
        return None
    diff_samples = (np.mean([boot.samples[c] for c in group], axis=0)
                    - np.mean([boot.samples[c] for c in others], axis=0))
    point = float(np.mean([boot.point[c] for c in group]) - np.mean([boot.point[c] for c in others]))
    run_var = run_variance(cells, split, metric)
    fewest = min(len(per_cell[c]) for c in (*group, *others))
    out = {"difference": point, "cells": len(group), "other_cells": len(others), "fewest_runs": fewest}
    if run_var is None:
        return {**out, "ci": (float("nan"), float("nan")), "se": float("nan"), "df": float("nan"),
                "status": NEEDS_REPEATS}
    v_run = run_var.variance * (sum(1 / len(per_cell[c]) for c in group) / len(group) ** 2
                                + sum(1 / len(per_cell[c]) for c in others) / len(others) ** 2)
    v_subjects = _var(diff_samples)
    df = satterthwaite([(v_run, run_var.df), (v_subjects, max(len(boot.subjects) - 1, 1))])
    se = math.sqrt(v_run + v_subjects)
    ci = bounded_interval(point, se, df, confidence, (-1.0, 1.0))
    status = NEEDS_REPEATS if fewest < MIN_RUNS else RESOLVED if (ci[0] > 0 or ci[1] < 0) else NOT_RESOLVED
    return {**out, "ci": ci, "se": se, "df": df, "status": status}


# -- rank uncertainty -----------------------------------------------------------------------------------------------
def rank_intervals(cells: dict[str, list[Run]], split: str = "test", metric: str = "score",
                   confidence: float = CONFIDENCE, resamples: int = 500, seed: int = 0) -> dict:
    """Per cell its rank (1 = best) on the mean ``metric`` over every run, a bootstrap interval of that rank
    and how often each rank came up (for a blob plot); and Kendall's tau between the ranking and each
    resample's (median and interval). Each resample draws the subjects (shared) and moves every cell's mean
    by a normal draw of sd ``s / sqrt(k)`` (the pooled between-run sd of ``metric`` on ``split``)."""
    per_cell = {c: _split_cases(rs, split, include_selected=True) for c, rs in cells.items()}
    per_cell = {c: v for c, v in per_cell.items() if v}
    if not per_cell:
        return {"cells": {}, "kendall_tau": None}
    boot = bootstrap_subjects(per_cell, metric, resamples, seed)
    if not boot.subjects:
        return {"cells": {}, "kendall_tau": None}
    names = list(boot.samples)
    run_var = run_variance(cells, split, metric)
    rng = np.random.default_rng(seed + 1)
    draws = np.stack([np.nan_to_num(boot.samples[c], nan=-1.0) for c in names])  # (cells, B)
    if run_var is not None:
        sd = np.array([run_var.sd / math.sqrt(len(per_cell[c])) for c in names])[:, None]
        draws = draws + rng.normal(0.0, 1.0, draws.shape) * sd
    point = np.array([np.nan_to_num(boot.point[c], nan=-1.0) for c in names])
    point_rank = scipy_stats.rankdata(-point, method="min")
    ranks = np.stack([scipy_stats.rankdata(-draws[:, b], method="min") for b in range(draws.shape[1])], axis=1)
    alpha = (1 - confidence) / 2
    out = {}
    for i, c in enumerate(names):
        values, counts = np.unique(ranks[i], return_counts=True)
        lo, hi = np.quantile(ranks[i], [alpha, 1 - alpha], method="inverted_cdf")
        out[c] = {"rank": int(point_rank[i]), "ci": [int(lo), int(hi)], "mean": boot.point[c],
                  "frequency": {int(v): float(n / ranks.shape[1]) for v, n in zip(values, counts, strict=True)}}
    tau = None
    if len(names) > 1:
        taus = np.array([scipy_stats.kendalltau(point_rank, ranks[:, b]).statistic for b in range(ranks.shape[1])])
        taus = taus[np.isfinite(taus)]
        if taus.size:
            lo, hi = np.quantile(taus, [alpha, 1 - alpha])
            tau = {"median": float(np.median(taus)), "ci": [float(lo), float(hi)]}
    return {"cells": out, "kendall_tau": tau, "split": split, "metric": metric}


# -- what it would take ------------------------------------------------------------------------------------------
def runs_to_resolve(difference: float, run_variance_: float, subject_variance: float, alpha: float = ALPHA,
                    power: float = 0.8, max_runs: int = 1000) -> int | None:
    """The runs per side (``k``) at which a true difference ``difference`` is resolved with probability
    ``power`` by a two-sided test at ``alpha`` (normal approximation: ``se^2 = 2 s^2 / k + v_subjects``,
    resolved when ``|d| / se >= z_{1-alpha/2} + z_power``); None when no number of runs reaches it (the
    subjects' variance alone is too large: more test subjects are needed) or the difference is 0."""
    if not (math.isfinite(difference) and difference != 0 and math.isfinite(run_variance_)):
        return None
    target = (abs(difference) / (scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power))) ** 2
    room = target - subject_variance
    if room <= 0:
        return None
    k = max(MIN_RUNS, math.ceil(2 * run_variance_ / room))
    return k if k <= max_runs else None


def subjects_to_resolve(difference: float, run_variance_: float, subject_variance: float, subjects: int,
                        runs: int, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """The test subjects at which ``difference`` is resolved at ``power`` with ``runs`` per side (the subjects'
    variance scales as ``1 / n``); None when the runs' variance alone is too large."""
    if not (math.isfinite(difference) and difference != 0 and subjects > 0 and runs > 0):
        return None
    target = (abs(difference) / (scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power))) ** 2
    room = target - 2 * run_variance_ / runs
    if room <= 0:
        return None
    return max(subjects, math.ceil(subjects * subject_variance / room))


# -- claims -------------------------------------------------------------------------------------------------------
SUPPORTED, CONTRADICTED = "supported", "contradicted"


def claim_status(diff: dict | None, claim: str, margin: float = MARGIN) -> str:
    """What a group difference (:func:`group_difference`, ``A - B``) says of a claim about ``A``:

    - ``"lower"`` (A is worse): supported when the interval lies below 0; contradicted when it lies above
      ``-margin`` (A is shown non-inferior);
    - ``"higher"`` (A is better): supported above 0; contradicted below ``margin``;
    - ``"non_inferior"`` (A is as good, within ``margin``): supported when the interval lies above
      ``-margin``; contradicted when it lies below ``-margin``.

    Anything else is "not resolved", and "not resolved: needs repeats" when a side has fewer than
    ``MIN_RUNS`` runs per cell: "not resolved" never counts as support."""
    if diff is None:
        return "not tested"
    if diff.get("status") == NEEDS_REPEATS:
        return NEEDS_REPEATS
    lo, hi = diff["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_RESOLVED
    if claim == "lower":
        return SUPPORTED if hi < 0 else CONTRADICTED if lo > -margin else NOT_RESOLVED
    if claim == "higher":
        return SUPPORTED if lo > 0 else CONTRADICTED if hi < margin else NOT_RESOLVED
    if claim == "non_inferior":
        return SUPPORTED if lo > -margin else CONTRADICTED if hi < -margin else NOT_RESOLVED
    raise ValueError(f"unknown claim {claim!r}: lower, higher or non_inferior")


# -- the study's evidence, for the report ------------------------------------------------------------------------
def variance_components(cells: dict[str, list[Run]], metrics: tuple[str, ...] = ("score", "dice", "auc"),
                        resamples: int = SUBJECT_RESAMPLES, seed: int = 0) -> dict:
    """Per split and metric the pooled between-run sd (and df), and the median sd over subjects of one run's
    score (bootstrap), with the split's subject count: what ``bench/inference.py --from-report`` simulates."""
    out: dict = {}
    for split in SPLITS:
        for metric in metrics:
            rv = run_variance(cells, split, metric)
            out[f"{split}_{metric}_run_sd"] = rv.sd if rv else None
            out[f"{split}_{metric}_run_df"] = rv.df if rv else None
        ones = {c: [x] for c, rs in cells.items() for x in _split_cases(rs[:1], split, include_selected=True)}
        boot = bootstrap_subjects(dict(list(ones.items())[:20]), "score", min(resamples, 400), seed)
        sds = [math.sqrt(boot.variance(c)) for c in boot.samples]
        out[f"{split}_one_run_subject_sd"] = float(np.median(sds)) if sds else None
        out[f"{split}_subjects"] = len(boot.subjects)
    out["run_sd"] = out.get("test_score_run_sd")
    return out


def what_it_would_take(confirmation: Confirmation, cells: dict[str, list[Run]], alpha: float = ALPHA,
                       power: float = 0.8) -> dict | None:
    """From the confirmation's difference and the study's variance components: the confirmation runs per side
    (and the test subjects) at which that difference would be resolved at ``power`` (a difference under
    ``SMALLEST`` in size is replaced by ``SMALLEST``: what it would take to find one that large)."""
    d = confirmation.difference.get("score")
    if d is None or not math.isfinite(d.get("difference", math.nan)):
        return None
    target = d["difference"] if abs(d["difference"]) >= SMALLEST else SMALLEST
    rv = run_variance(cells, "test", "score")
    if rv is None:
        return None
    k_best, k_ref = confirmation.runs.get(confirmation.best, 0), confirmation.runs.get(confirmation.reference, 0)
    v_subjects = max(d["se"] ** 2 - rv.variance * (1 / max(k_best, 1) + 1 / max(k_ref, 1)), 0.0)
    runs = runs_to_resolve(target, rv.variance, v_subjects, alpha, power)
    n = max((len(r.test.subjects) for rs in cells.values() for r in rs if r.test is not None), default=0)
    subjects = subjects_to_resolve(target, rv.variance, v_subjects, n, max(min(k_best, k_ref), 1), alpha, power)
    return {"difference": target, "measured_difference": d["difference"], "power": power, "alpha": alpha, "runs_per_side": runs,
            "test_subjects": subjects, "current_runs": [k_best, k_ref], "current_test_subjects": n,
            "run_sd": rv.sd, "subject_variance": v_subjects}


def assess(cells: dict[str, list[Run]], reference: str | None, alpha: float = ALPHA, seed: int = 0,
           resamples: int = SUBJECT_RESAMPLES, chosen: str | None = None) -> dict:
    """Everything the report's verdict reads: the choice on validation, its confirmation on test, rank
    intervals, variance components and what it would take (plain dicts). ``chosen``: the cell the study
    confirmed (its ``confirm.json``), which the confirmation then reads (the choice was made when the runs
    were asked for; :func:`select` on the same validation runs gives it again)."""
    selection = select(cells, alpha=alpha, resamples=resamples, seed=seed)
    confirmation = confirm(cells, chosen or selection.best, reference, resamples=resamples, seed=seed)
    return {"selection": selection.to_dict(), "confirmation": confirmation.to_dict(),
            "ranks": rank_intervals(cells, seed=seed), "variance_components": variance_components(cells, seed=seed),
            "what_it_would_take": what_it_would_take(confirmation, cells, alpha), "min_runs": MIN_RUNS,
            "alpha": alpha}
