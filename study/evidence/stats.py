"""The report's descriptive statistics, from per-case test results: bootstrap confidence intervals over test
subjects (and seeds), paired differences from a reference cell and from the highest test score. These are the
ranking table's exploratory figures, measured on the test split after the choice on validation; the choice, the set
that may be best and the confirmation are :mod:`study.evidence.inference`'s. (A Wilcoxon test on one trained
model's Dice per cell and the share of resamples a cell wins, "P(best)", were dropped: the first tests two models,
not two configurations, and the second was far from calibrated in a simulation with known truth (issue 26);
``bench/inference.py`` checks what replaced them.)

Every statistic is a function of the per-case rows a fine-tuning trial logs (``test_cases.json``: one row
per subject, classification target and region with ``dice``, ``truth`` and the called probabilities;
:func:`trainables.metrics.per_case_rows`), so every number here can be recomputed from MLflow alone. The task
spec (:mod:`trainables.task`) says which rows make a subject and how the score weighs the metrics:

- ``dice``: mean Dice over the (subject, region) cases;
- the classification metrics (``auc``, ``balanced_accuracy``, ``accuracy``, ...): the registered functions of
  :mod:`trainables.classification_metrics`, the very ones the training loop logs, applied to every resample
  at once and averaged over the task's targets (``auc``: Mann-Whitney U / (n1 n0), ties counted half; K
  classes: the mean one-vs-rest AUC over the classes it is defined for);
- ``score``: the task's selection score on the test split (the PCS task: ``(dice + balanced accuracy) / 2``;
  ``TaskSpec.score_of``, a missing part counting 0).

Resampling is by test subject (all regions of a subject move together, as they are not independent)
with one matrix of resampled subject indices shared by every cell, so that differences between cells are
paired. With seed re-runs, each
resample also draws, for every cell, as many of its runs as it has, with replacement, and averages the
statistic over them (seeds and subjects resampled together). Intervals are percentile intervals
(Efron & Tibshirani 1993).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats

from trainables.classification_metrics import CLASSIFICATION_METRICS, called_class
from trainables.task import TaskSpec, as_task

METRICS = ("score", "dice", "auc")
CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass
class Cases:
    """One run's test cases aligned by subject: ``dice`` and ``truth`` ``(subjects, regions)`` over every
    target's regions in the task's order, ``probability`` ``(subjects, regions, classes)`` (a 2D array of
    binary P(class 1) is taken as ``[1 - p, p]``; a target with fewer classes than the widest leaves the rest 0)."""

    subjects: list[str]
    dice: np.ndarray
    probability: np.ndarray
    truth: np.ndarray
    task: TaskSpec | None = None  # None: the PCS task

    def __post_init__(self) -> None:
        self.task = as_task(self.task)
        p = np.asarray(self.probability, dtype=float)
        self.probability = np.stack([1 - p, p], axis=-1) if p.ndim == 2 else p

    @classmethod
    def from_rows(cls, rows: list[dict], task: TaskSpec | None = None) -> Cases:
        """From ``test_cases`` rows (``subject_id``, ``target``, ``region``, ``dice``, ``truth``, ``probability``
        or ``probabilities``). Rows written before tasks existed (``hemisphere``, no ``target``) read as the
        PCS task's."""
        task = as_task(task)
        subjects = sorted({str(r["subject_id"]) for r in rows})
        where = {s: i for i, s in enumerate(subjects)}
        slots = [(t.name, region) for t in task.targets for region in t.regions] or [("", "")]
        column = {slot: j for j, slot in enumerate(slots)}
        widest = max((len(t.classes) for t in task.targets), default=2)
        only = task.targets[0].name if len(task.targets) == 1 else ""
        dice = np.full((len(subjects), len(slots)), np.nan)
        prob = np.zeros((len(subjects), len(slots), widest))
        truth = np.full((len(subjects), len(slots)), np.nan)
        for r in rows:
            region = str(r.get("region", r.get("hemisphere", "")))
            i, j = where[str(r["subject_id"])], column[(str(r.get("target") or only), region)]
            dice[i, j] = float(r["dice"])
            if "truth" in r:
                truth[i, j] = float(r["truth"])
            if "probabilities" in r:
                values = [float(v) for v in r["probabilities"]]
                prob[i, j, :len(values)] = values
            elif "probability" in r:
                prob[i, j, :2] = (1 - float(r["probability"]), float(r["probability"]))
        return cls(subjects, dice, prob, truth, task)

    def subset(self, subjects: list[str]) -> Cases:
        index = [self.subjects.index(s) for s in subjects]
        return Cases(list(subjects), self.dice[index], self.probability[index], self.truth[index], self.task)

    def targets(self):
        """Per classification target: (target, its region columns)."""
        start = 0
        for t in self.task.targets:
            yield t, slice(start, start + len(t.regions))
            start += len(t.regions)


# -- the statistics, vectorised over resamples: idx is (B, n) subject indices -----------------------------------
def dice_of(c: Cases, idx: np.ndarray) -> np.ndarray:
    return c.dice[idx].reshape(idx.shape[0], -1).mean(axis=1)


def _called(c: Cases, idx: np.ndarray):
    """Per target: (target, truth ``(B, m)`` as int, probabilities ``(B, m, K)``, called class ``(B, m)``)."""
    for t, columns in c.targets():
        k = len(t.classes)
        y = c.truth[idx][:, :, columns].reshape(idx.shape[0], -1)
        p = c.probability[idx][:, :, columns, :k].reshape(idx.shape[0], -1, k)
        yield t, np.rint(y).astype(int), p, called_class(p)


def classification_statistic(name: str):
    """The registered classification metric ``name`` (:mod:`trainables.classification_metrics`) per resample,
    averaged over the task's targets it applies to; NaN where it is undefined."""
    metric = CLASSIFICATION_METRICS.get(name)

    def statistic(c: Cases, idx: np.ndarray) -> np.ndarray:
        values = [metric.fn(y, p, pred) for t, y, p, pred in _called(c, idx) if len(t.classes) == 2
                  or not metric.binary_only]
        if not values:
            return np.full(idx.shape[0], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(values), axis=0)

    return statistic


balanced_accuracy_of = classification_statistic("balanced_accuracy")
accuracy_of = classification_statistic("accuracy")
auc_of = classification_statistic("auc")


def score_of(c: Cases, idx: np.ndarray) -> np.ndarray:
    """The task's selection score per resample (``TaskSpec.score_of`` over resamples; a NaN part counts 0)."""
    parts = {"dice": dice_of}
    return sum(weight * np.nan_to_num((parts.get(metric) or classification_statistic(metric))(c, idx), nan=0.0)
               for metric, weight in c.task.score)


STATISTICS = {"score": score_of, "dice": dice_of, "auc": auc_of}


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap ``samples`` (NaNs, from resamples where a statistic is
    undefined, left out)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not s.size:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(s, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass
class CellStats:
    """One cell's estimates and intervals, and its comparison with the reference and the highest test score."""

    cell: str
    runs: int
    subjects: int
    estimate: dict[str, float] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    subjects_ci: tuple[float, float] | None = None  # the test score's interval over the test subjects alone
    vs_reference: dict[str, dict] = field(default_factory=dict)  # metric -> {difference, ci}
    vs_best: dict = field(default_factory=dict)  # {difference, ci} of best - this cell, on the score
    indistinguishable_from_best: bool = False


@dataclass
class Comparison:
    """Every cell's statistics on the test subjects all of them share, and the verdict's ingredients."""

    cells: dict[str, CellStats]
    subjects: list[str]
    reference: str | None
    best: str | None
    resamples: int
    confidence: float
    seeds_resampled: bool
    missing: list[str]  # cells without per-case results (not compared)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    between_run_sd: float | None = None  # the variation between runs added to the differences from the best
    # cell -> test score per resample with every run of the cell in every resample (the test subjects only)
    subject_samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def tied_with_best(self) -> list[str]:
        """The cells the data cannot tell apart from the best (the best included), best score first."""
        tied = [c for c, s in self.cells.items() if s.indistinguishable_from_best]
        return sorted(tied, key=lambda c: -self.cells[c].estimate["score"])

    def spread(self) -> float:
        """The standard deviation of the cells' test scores (0 for a single cell)."""
        scores = [s.estimate["score"] for s in self.cells.values() if np.isfinite(s.estimate["score"])]
        return float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0

    def typical_half_width(self) -> float:
        """The median half-width of the cells' test-score intervals over the test subjects (what a larger
        test split would narrow)."""
        widths = [(lo - hi) / -2 for lo, hi in (s.subjects_ci or s.ci["score"] for s in self.cells.values())
                  if np.isfinite(lo)]
        return float(np.median(widths)) if widths else float("nan")

    def too_small(self) -> bool:
        """True when a typical interval is wider than the spread of the cells: the test split cannot
        separate them."""
        return len(self.cells) > 1 and self.typical_half_width() > self.spread()

    def group_difference(self, group: list[str], others: list[str], metric: str) -> dict | None:
        """Mean ``metric`` over the cells of ``group`` minus the mean over ``others``, paired by resample."""
        group = [c for c in group if c in self.samples]
        others = [c for c in others if c in self.samples]
        if not group or not others:
            return None
        point = (np.mean([self.cells[c].estimate[metric] for c in group])
                 - np.mean([self.cells[c].estimate[metric] for c in others]))
        out = {"difference": float(point), "cells": len(group), "other_cells": len(others)}
        if self.between_run_sd is not None and metric == "score" and self.subject_samples:
            # as for the difference from the best: the test subjects' variance plus each cell's sd^2 / k,
            # averaged over its group (sd^2 * sum(1/k) / n^2 per group)
            d = (np.mean([self.subject_samples[c] for c in group], axis=0)
                 - np.mean([self.subject_samples[c] for c in others], axis=0))
            runs = sum(1 / self.cells[c].runs for c in group) / len(group) ** 2 + sum(
                1 / self.cells[c].runs for c in others) / len(others) ** 2
            return {**out, "ci": with_run_variation(point, d, self.between_run_sd**2 * runs, self.confidence)}
        diff = (np.mean([self.samples[c][metric] for c in group], axis=0)
                - np.mean([self.samples[c][metric] for c in others], axis=0))
        return {**out, "ci": interval(diff, self.confidence)}


def with_run_variation(point: float, subject_samples: np.ndarray, run_variance: float,
                       confidence: float) -> tuple[float, float]:
    """A normal interval around ``point`` whose variance is the bootstrap variance over the test subjects
    (``subject_samples``, every run of a cell in every resample) plus ``run_variance`` (the training runs':
    ``sd^2 / k`` for a cell, summed over the cells of a difference)."""
    finite = subject_samples[np.isfinite(subject_samples)]
    se = np.sqrt((np.var(finite, ddof=1) if finite.size > 1 else 0.0) + run_variance)
    z = scipy_stats.norm.ppf(0.5 + confidence / 2)
    return float(point - z * se), float(point + z * se)


def compare(runs: dict[str, list[Cases]], reference: str | None = None, resamples: int = RESAMPLES,
            seed: int = 0, confidence: float = CONFIDENCE, resample_seeds: bool = True,
            between_run_sd: float | None = None) -> Comparison:
    """Compare cells from their runs' per-case test results.

    Args:
        runs: cell id -> the per-case results of its runs (the best trial, then its seed re-runs).
        reference: the cell every other is compared with (paired differences).
        resamples: bootstrap resamples (shared by all cells).
        seed: seeds the resampling, so a report is reproducible.
        confidence: of every interval.
        resample_seeds: with several runs of a cell, draw its runs with the subjects (True), or average
            every run in each resample (False: the intervals then cover the test subjects only, and a
            caller adds the variation between runs itself, as the race does).
        between_run_sd: one run's standard deviation of the test score between seeds (pooled over cells
            with repeats). Given, each cell's test-score interval and its difference from the best are
            normal intervals over the test subjects (bootstrap, every run of a cell in every resample) and
            this variation (``sd^2 / k`` for a cell, ``sd^2 (1/k_best + 1/k_cell)`` for a difference, ``k``
            the runs), so that a cell with one run does not look surer than it is; so are the test score's
            difference from the reference and :meth:`Comparison.group_difference`.
    """
    missing = sorted(c for c, r in runs.items() if not r)
    runs = {c: r for c, r in runs.items() if r}
    if not runs:
        return Comparison({}, [], None, None, resamples, confidence, False, missing)
    common = sorted(set.intersection(*(set(x.subjects) for rs in runs.values() for x in rs)))
    if not common:  # the cells were tested on different subjects: nothing can be paired
        return Comparison({}, [], None, None, resamples, confidence, False, sorted(set(missing) | set(runs)))
    runs = {c: [x.subset(common) for x in rs] for c, rs in runs.items()}
    n = len(common)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    full = np.arange(n)[None, :]
    seeds_resampled = any(len(r) > 1 for r in runs.values())
    samples: dict[str, dict[str, np.ndarray]] = {}
    subject_only: dict[str, np.ndarray] = {}
    cells: dict[str, CellStats] = {}
    for cell, rs in runs.items():
        stat = CellStats(cell, runs=len(rs), subjects=n)
        if resample_seeds:
            draws = rng.integers(0, len(rs), size=(resamples, len(rs)))  # seeds resampled with the subjects
        else:
            draws = np.broadcast_to(np.arange(len(rs)), (resamples, len(rs)))  # every run, every resample
        samples[cell] = {}
        for metric, fn in STATISTICS.items():
            per_run = np.stack([fn(x, idx) for x in rs])  # (runs, resamples)
            if metric == "score":
                subject_only[cell] = per_run.mean(axis=0)  # every run in every resample: test subjects only
            with warnings.catch_warnings():  # an AUC undefined in every drawn run stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                samples[cell][metric] = np.nanmean(per_run[draws, np.arange(resamples)[:, None]], axis=1) \
                    if len(rs) > 1 else per_run[0]
                stat.estimate[metric] = float(np.nanmean([fn(x, full)[0] for x in rs]))
            stat.ci[metric] = interval(samples[cell][metric], confidence)
            if metric == "score":
                stat.subjects_ci = interval(subject_only[cell], confidence)
                if between_run_sd is not None:  # the training runs' variation too (see vs_best below)
                    stat.ci[metric] = with_run_variation(stat.estimate[metric], subject_only[cell],
                                                         between_run_sd**2 / len(rs), confidence)
        cells[cell] = stat

    reference = reference if reference in cells else None
    if reference is not None:
        for cell, stat in cells.items():
            if cell == reference:
                continue
            for metric in METRICS:
                point = stat.estimate[metric] - cells[reference].estimate[metric]
                if metric == "score" and between_run_sd is not None:  # as for the difference from the best
                    ci = with_run_variation(point, subject_only[cell] - subject_only[reference],
                                            between_run_sd**2 * (1 / stat.runs + 1 / cells[reference].runs), confidence)
                else:
                    ci = interval(samples[cell][metric] - samples[reference][metric], confidence)
                stat.vs_reference[metric] = {"difference": point, "ci": ci}

    best = max(cells, key=lambda c: np.nan_to_num(cells[c].estimate["score"], nan=-1))
    for cell, stat in cells.items():
        if cell == best:
            stat.indistinguishable_from_best = True
            continue
        if between_run_sd is None:
            lo, hi = interval(samples[best]["score"] - samples[cell]["score"], confidence)
        else:
            lo, hi = with_run_variation(cells[best].estimate["score"] - stat.estimate["score"],
                                        subject_only[best] - subject_only[cell],
                                        between_run_sd**2 * (1 / cells[best].runs + 1 / stat.runs), confidence)
        stat.vs_best = {"difference": cells[best].estimate["score"] - stat.estimate["score"], "ci": (lo, hi)}
        stat.indistinguishable_from_best = bool(lo <= 0.0)
    return Comparison(cells, common, reference, best, resamples, confidence, seeds_resampled, missing, samples,
                      between_run_sd, subject_only)
