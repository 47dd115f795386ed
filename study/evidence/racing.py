"""Racing after the search: spend the repeats on the cells that can still be the best.

After every cell's search, its best configuration has one test evaluation. Uniform seed re-runs
(``--seeds N``) give every cell N more, most of them to cells that are already clearly worse. A race
(successive elimination, as in F-Race, Birattari et al. 2002, and irace, Lopez-Ibanez et al. 2016)
re-runs only the contenders instead:

1. **Round 0** is the search: every cell with per-case test results enters with its best run.
2. After each round the cells still in the race are compared on the same test subjects (paired), each
   cell's score the mean over its runs; every repeat of a round uses the round's seed. A single run's test-score interval covers the test subjects only;
   between two training runs of the same configuration the score moves more than that (at the laptop
   budget by about 0.09, against intervals of +-0.02: bench/RESULTS.md, "Rank stability"). So the test
   adds the variation between runs, estimated from the race's own repeats (pooled over cells), and
   eliminates nothing before there are repeats: after the search (round 0) the race only ranks. The best is the cell with the highest test
   score; for every other cell the paired bootstrap difference ``best - cell`` of the test score gives
   a 95% interval and a two-sided p-value, and Holm's correction runs over those cells. A cell whose
   adjusted p is below ``alpha`` (and which scores lower) is eliminated; with fewer than ``MIN_SUBJECTS``
   (10) test subjects nothing is, as a bootstrap over so few cannot support it. A cell whose repeats
   failed ``MAX_FAILED_REPEATS`` (2) times leaves the race.
3. The next round re-runs the best configuration of every remaining cell with a new seed. When the
   trial budget left cannot pay for a whole round, the round runs the best and the cells closest to
   it (by the difference in test score) that it can pay for.
4. The race stops when one cell is left (``resolved``), when the budget (trials or minutes) cannot
   pay for another round of at least two cells (``budget``), or when every repeat of a round failed
   (``failed``: another round would fail alike). The minutes are checked between rounds: a round
   that has started runs to its end.

The p-value is the normal test of the paired difference: ``2 * Phi(-|d| / se)`` with ``d`` the
difference of the point estimates and ``se^2`` the variance of its bootstrap resamples over test subjects
(:func:`study.evidence.stats.compare` with every run of a cell in every resample) plus ``s^2 (1/k_best + 1/k_cell)``,
``s`` the pooled between-run standard deviation and ``k`` each cell's runs. Its interval is ``d +- 1.96 se``. A p-value read off the resamples' signs alone
could not go below ``1 / resamples``, too coarse for Holm over tens of cells.

This module knows nothing of Ray or MLflow: the searcher (:mod:`study.run.searcher`) feeds it the per-case
rows of finished trials and asks it which cells to re-run; the report reads the race's record
(``race.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from study.evidence.stats import RESAMPLES, Cases, compare, holm, interval, score_of
from trainables.atomic import atomic_write_text, strict_json
from trainables.task import as_task

ALPHA = 0.05
MIN_SUBJECTS = 10  # fewer test subjects: the bootstrap cannot support an elimination; nothing is eliminated
MAX_FAILED_REPEATS = 2  # a cell whose repeats failed this many times leaves the race
RACE_FILE = "race.json"
FINAL = ("resolved", "budget", "failed", "no_contest")


def paired_p(difference: float, samples: np.ndarray, extra_variance: float = 0.0) -> float:
    """Two-sided p of a paired difference from its bootstrap resamples (normal approximation: the
    resamples' standard deviation, with ``extra_variance`` added, is its standard error)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if s.size < 2 or not math.isfinite(difference):
        return float("nan")
    boot = float(np.var(s, ddof=1))
    if boot == 0.0:  # every resample the same: equal cells, or too few subjects to resample (undefined)
        return 1.0 if difference == 0.0 else float("nan")
    return float(2 * scipy_stats.norm.sf(abs(difference) / math.sqrt(boot + extra_variance)))


def run_scores(runs: list[Cases]) -> list[float]:
    """The test score of each run, on all its test cases."""
    return [float(score_of(c, np.arange(len(c.subjects))[None, :])[0]) for c in runs]


def pooled_seed_sd(runs: dict[str, list[Cases]]) -> float | None:
    """The standard deviation of one run's test score between seeds, pooled over the cells with two runs or
    more (None when no cell has two)."""
    num = den = 0.0
    for rs in runs.values():
        if len(rs) > 1:
            scores = run_scores(rs)
            num += (len(scores) - 1) * float(np.var(scores, ddof=1))
            den += len(scores) - 1
    return math.sqrt(num / den) if den else None


def evaluate(runs: dict[str, list[Cases]], alpha: float = ALPHA, resamples: int = RESAMPLES,
             seed: int = 0, seed_sd: float | None = None) -> tuple[str | None, dict[str, dict]]:
    """Compare the cells of ``runs`` (cell -> its runs' per-case results): the best cell, and for every other
    cell its evidence ``{difference, ci, p, holm_p, eliminated}`` (difference = best - cell, test score,
    each cell's score the mean over its runs).

    The test covers two sources of variation: the test subjects (the bootstrap, paired, every run of a
    cell in every resample) and the training run (``seed_sd``, one run's standard deviation between
    seeds: ``seed_sd^2 (1/k_best + 1/k_cell)`` is added to the variance of the difference, ``k`` the runs
    of each). With ``seed_sd`` None (no repeats yet, so the
    variation between runs is unknown) or fewer than ``MIN_SUBJECTS`` test subjects, nothing is eliminated.
    """
    if not runs:
        return None, {}
    comparison = compare(runs, resamples=resamples, seed=seed, resample_seeds=False)
    best = comparison.best
    if best is None:
        return None, {}
    evidence: dict[str, dict] = {}
    for cell, stat in comparison.cells.items():
        if cell == best:
            continue
        diff = comparison.samples[best]["score"] - comparison.samples[cell]["score"]
        point = comparison.cells[best].estimate["score"] - stat.estimate["score"]
        if seed_sd is None:
            p, ci = float("nan"), [float("nan")] * 2
        else:
            extra = seed_sd**2 * (1 / comparison.cells[best].runs + 1 / stat.runs)
            p = paired_p(point, diff, extra)
            finite = diff[np.isfinite(diff)]
            se = math.sqrt(float(np.var(finite, ddof=1)) + extra) if finite.size > 1 else float("nan")
            z = float(scipy_stats.norm.ppf(0.5 + comparison.confidence / 2))
            ci = [point - z * se, point + z * se]
        evidence[cell] = {"difference": float(point), "ci": ci, "subjects_ci": list(interval(diff, comparison.confidence)),
                          "p": p, "runs": stat.runs}
    # an undefined p counts as 1 in Holm's correction: the family is every cell compared
    pvalues = [e["p"] if math.isfinite(e["p"]) else 1.0 for e in evidence.values()]
    enough = len(comparison.subjects) >= MIN_SUBJECTS
    for cell, adjusted in zip(evidence, holm(pvalues), strict=True):
        e = evidence[cell]
        e["holm_p"] = adjusted if math.isfinite(e["p"]) else float("nan")
        e["eliminated"] = bool(enough and math.isfinite(e["holm_p"]) and e["holm_p"] < alpha and e["difference"] > 0)
    for cell in comparison.missing:  # no per-case results: cannot be compared, so cannot stay in the race
        evidence[cell] = {"difference": float("nan"), "ci": [float("nan")] * 2, "p": float("nan"),
                          "holm_p": float("nan"), "eliminated": True, "reason": "no per-case test results"}
    return best, evidence


@dataclass
class Race:
    """The state of one race (picklable: the searcher saves it with its own state for ``--resume``).

    Args:
        max_trials: repeats the race may run (0: no limit on trials).
        max_minutes: minutes the race may take, counted from its start while the study runs (0: no limit).
        alpha: the family-wise error rate of each round's eliminations (Holm).
        seed: seeds the bootstrap, so that a race is reproducible.
    """

    max_trials: int = 0
    max_minutes: float = 0.0
    alpha: float = ALPHA
    seed: int = 0
    status: str = "waiting"  # waiting (the search runs) | racing | resolved | budget | failed | no_contest
    round: int = 0  # the round under way or last finished; 0 is the search
    alive: list[str] = field(default_factory=list)
    best: str | None = None
    runs: dict[str, list[list[dict]]] = field(default_factory=dict)  # cell -> per-case rows of each run
    rounds: list[dict] = field(default_factory=list)  # per finished round: cells, best, evidence
    eliminated: dict[str, dict] = field(default_factory=dict)  # cell -> {round, difference, ci, p, holm_p}
    queue: list[str] = field(default_factory=list)  # cells of the current round not yet suggested
    waiting_for: list[str] = field(default_factory=list)  # cells of the current round not yet ended
    trials_used: int = 0
    elapsed_s: float = 0.0
    failed: list[dict] = field(default_factory=list)  # repeats that failed: {cell, round, reason}
    task: dict | None = None  # the study's task spec (its dict form): how a run's per-case rows read; None: PCS
    _round_size: int = 0
    _tick: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    # -- the clock: time counts while the study runs, not while it is interrupted --------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if self.status == "racing" and self._tick is not None:
            self.elapsed_s += now - self._tick
        self._tick = now

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tick": None}

    # -- the race ---------------------------------------------------------------------------------------------
    def start(self, best_rows: dict[str, list[dict] | None]) -> None:
        """Round 0: every cell's best search run (``None``: a cell without per-case results)."""
        self.runs = {cell: [rows] for cell, rows in best_rows.items() if rows}
        for cell, rows in best_rows.items():
            if not rows:
                self.eliminated[cell] = {"round": 0, "reason": "no finished search trial with per-case test results"}
        self.alive = list(self.runs)
        if not self.alive:
            self.status = "no_contest"
            return
        self.status = "racing"
        self.tick()
        self._evaluate()

    def suggest(self) -> str | None:
        """The next cell to re-run in the current round, or None (the round is fully suggested)."""
        return self.queue.pop(0) if self.status == "racing" and self.queue else None

    def record(self, cell: str, rows: list[dict] | None, reason: str = "") -> None:
        """A repeat of the current round ended: its per-case rows, or None and why it failed."""
        self.tick()
        if cell in self.waiting_for:
            self.waiting_for.remove(cell)
        if rows:
            self.runs.setdefault(cell, []).append(rows)
        else:
            self.failed.append({"cell": cell, "round": self.round, "reason": reason or "the repeat failed"})
            if sum(f["cell"] == cell for f in self.failed) >= MAX_FAILED_REPEATS and cell in self.alive:
                self.alive.remove(cell)
                self.eliminated[cell] = {"round": self.round, "reason": f"{MAX_FAILED_REPEATS} of its repeats failed"}
        if self.status == "racing" and not self.queue and not self.waiting_for:
            if sum(f["round"] == self.round for f in self.failed) >= self._round_size > 0:
                self.status = "failed"  # every repeat of the round failed: more rounds would fail alike
                return
            self._evaluate()

    def _evaluate(self) -> None:
        task = as_task(getattr(self, "task", None))  # a race pickled before tasks existed has none: PCS
        runs = {c: [Cases.from_rows(r, task) for r in self.runs[c]] for c in self.alive}
        # the variation between training runs, from every cell's repeats so far (eliminated cells' too)
        seed_sd = pooled_seed_sd({c: [Cases.from_rows(r, task) for r in rs] for c, rs in self.runs.items()
                                  if len(rs) > 1})
        best, evidence = evaluate(runs, self.alpha, seed=self.seed + self.round, seed_sd=seed_sd)
        if best is None:  # the cells were tested on different subjects: nothing can be paired
            self.status = "no_contest"
            return
        self.best = best
        out = [c for c, e in evidence.items() if e["eliminated"]]
        for cell in out:
            self.eliminated[cell] = {"round": self.round, **evidence[cell]}
        self.alive = [c for c in self.alive if c not in out]
        self.rounds.append({"round": self.round, "cells": sorted(runs), "best": best, "evidence": evidence,
                            "eliminated": sorted(out), "seed_sd": seed_sd})
        self._next_round(evidence)

    def _next_round(self, evidence: dict[str, dict]) -> None:
        if len(self.alive) <= 1:
            self.status = "resolved"
            return
        left = self.max_trials - self.trials_used if self.max_trials else len(self.alive)
        if left < 2 or (self.max_minutes and self.elapsed_s >= 60 * self.max_minutes):
            self.status = "budget"
            return
        # the best first, then the cells closest to it
        contenders = sorted((c for c in self.alive if c != self.best),
                            key=lambda c: d if math.isfinite(d := evidence[c]["difference"]) else math.inf)
        cells = [self.best, *contenders][:left]
        self.round += 1
        self._round_size = len(cells)
        self.queue, self.waiting_for = list(cells), list(cells)
        self.trials_used += len(cells)

    # -- the record ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("runs", "_tick", "queue", "_round_size", "task")}
        d["repeats"] = {cell: len(runs) - 1 for cell, runs in self.runs.items()}
        return d

    def write(self, path: str | Path) -> None:
        """``race.json``: the race's record for the report (strict JSON: NaN written as null)."""

        atomic_write_text(Path(path), strict_json(self.to_dict()))


def read_race(folder: str | Path) -> dict | None:
    """A study folder's race record, or None (no race ran)."""
    path = Path(folder) / RACE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
