"""Racing after the search: spend the repeats on the cells that can still be the best, decided on validation.

After every cell's search, its best configuration has one run, chosen by its own validation score (so that
score is biased upward: the race never tests on it). A race (successive elimination, as in F-Race, Birattari
et al. 2002, and irace, Lopez-Ibanez et al. 2016) re-runs the contenders' configurations, one seed per round
shared by every cell of the round, and drops a cell once the data show another cell is better:

1. **Entry.** The cells are ordered by the validation score of their search run. With a budget of ``N``
   repeats, the first ``max(2, N // MIN_RUNS)`` enter (so that each can reach ``MIN_RUNS`` repeats); the rest
   are recorded as not raced. Without a repeat budget every cell enters.
2. **Rounds.** Each round re-runs every cell still in the race (when the budget left cannot pay for a whole
   round, the best and the cells closest to it). Every repeat logs its per-case validation *and* test results;
   the race reads only the validation ones.
3. **Tests.** After a round, the cells with at least ``MIN_RUNS`` (3) repeats are compared on the mean
   validation score of their repeats (:func:`study.evidence.inference.separation`): cell ``i`` is eliminated
   when some cell ``j`` beats it by more than ``q * se_ij``, ``se_ij^2 = s^2 (1/k_i + 1/k_j) + v_ij`` (``s^2`` the
   between-run variance pooled over the repeats, ``v_ij`` the paired bootstrap variance over validation
   subjects) and ``q`` Tukey's studentized-range critical value for the cells tested, with ``df`` the runs'.
   The ``t``-th such test uses ``alpha_t = 6 alpha / (pi^2 t^2)``, so the levels over all the race's tests sum
   to at most ``alpha``. With fewer than ``MIN_SUBJECTS`` (10) validation subjects nothing is eliminated.
4. **Stop.** One cell left (``resolved``); the budget (repeats or minutes) cannot pay for another round of two
   (``budget``); every repeat of a round failed (``failed``). A cell whose repeats failed ``MAX_FAILED_REPEATS``
   times leaves the race.

**The guarantee.** Tukey's procedure controls the family-wise error of all pairwise claims in one test (strongly,
in a balanced design; Tukey-Kramer's form is conservative for unequal runs, Hayter 1984), and the spending of
``alpha`` over tests bounds the error over the whole race: the probability that the race ever eliminates a cell
that no other cell in the race truly beats (on the mean validation score over training runs and validation
subjects) is at most ``alpha``, under the normal approximation of run means. ``bench/inference.py`` measures
it: with every cell equal, the share of races that eliminate any cell. The race chooses; it does not report:
the test split is used once, afterwards, on fresh confirmation runs (:func:`study.evidence.inference.confirm`).

This module knows nothing of Ray or MLflow: the searcher (:mod:`study.run.searcher`) feeds it the per-case
rows of finished trials and asks it which cells to re-run; the report reads the race's record (``race.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from study.evidence.inference import (
    ALPHA,
    MIN_RUNS,
    SUBJECT_RESAMPLES,
    Run,
    bootstrap_subjects,
    run_value,
    run_variance,
    separation,
)
from study.evidence.stats import Cases
from trainables.atomic import atomic_write_text, strict_json
from trainables.task import as_task

MIN_SUBJECTS = 10  # fewer validation subjects: the bootstrap cannot support an elimination
MAX_FAILED_REPEATS = 2  # a cell whose repeats failed this many times leaves the race
RACE_FILE = "race.json"
CONFIRM_FILE = "confirm.json"  # the confirmation runs' record (the searcher writes it)
FINAL = ("resolved", "budget", "failed", "no_contest")


def spent_alpha(alpha: float, look: int) -> float:
    """The level of the race's ``look``-th test: ``6 alpha / (pi^2 look^2)`` (they sum to ``alpha``)."""
    return 6 * alpha / (math.pi**2 * look**2)


def as_split_rows(rows) -> dict | None:
    """A run's rows as ``{"val": rows, "test": rows}`` (a bare list is the test rows of a study from before
    validation rows were kept)."""
    if not rows:
        return None
    if isinstance(rows, dict):
        return rows if rows.get("val") or rows.get("test") else None
    return {"val": None, "test": rows}


def evaluate(repeats: dict[str, list[Cases]], look: int, alpha: float = ALPHA,
             resamples: int = SUBJECT_RESAMPLES, seed: int = 0) -> tuple[str | None, dict[str, dict], bool]:
    """Test the cells of ``repeats`` (cell -> its repeats' validation cases) at the race's ``look``-th test:
    the best (highest mean validation score over its repeats), per cell ``{mean, repeats, difference,
    eliminated, by, threshold}``, and whether a test ran (two cells with ``MIN_RUNS`` repeats and
    ``MIN_SUBJECTS`` shared subjects)."""
    means = {c: sum(run_value(x, "score") for x in v) / len(v) for c, v in repeats.items() if v}
    if not means:
        return None, {}, False
    best = max(means, key=lambda c: (means[c] if math.isfinite(means[c]) else -math.inf, c))
    counts = {c: len(v) for c, v in repeats.items()}
    evidence = {c: {"mean": means[c], "repeats": counts[c], "difference": means[best] - means[c], "eliminated": False}
                for c in means}
    tested = {c: v for c, v in repeats.items() if len(v) >= MIN_RUNS}
    run_var = run_variance({c: [Run(x, None, "race") for x in v] for c, v in tested.items()}, "val", "score")
    if len(tested) < 2 or run_var is None:
        return best, evidence, False
    boot = bootstrap_subjects(tested, "score", resamples, seed)
    if len(boot.subjects) < MIN_SUBJECTS:
        return best, evidence, False
    level = spent_alpha(alpha, look)
    out, critical = separation({c: means[c] for c in tested}, counts, run_var, boot, level)
    for cell, why in out.items():
        evidence[cell].update(eliminated=True, **why)
    for cell in tested:
        evidence[cell].update(alpha=level, critical=critical, run_sd=run_var.sd, df=run_var.df)
    return best, evidence, True


@dataclass
class Race:
    """The state of one race (picklable: the searcher saves it with its own state for ``--resume``).

    Args:
        max_trials: repeats the race may run (0: no limit on repeats).
        max_minutes: minutes the race may take, counted from its start while the study runs (0: no limit).
        alpha: the family-wise error rate of the whole race's eliminations (spent over its tests).
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
    runs: dict[str, list[dict]] = field(default_factory=dict)  # cell -> [{"val": rows, "test": rows}], [0]: search
    rounds: list[dict] = field(default_factory=list)  # per finished round: cells, best, evidence
    eliminated: dict[str, dict] = field(default_factory=dict)  # cell -> {round, by, difference, threshold, ...}
    not_raced: dict[str, dict] = field(default_factory=dict)  # cell -> {val_score, reason}
    looks: int = 0  # tests run so far (each spends its share of alpha)
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
    def _cases(self, rows: dict, split: str) -> Cases | None:
        return Cases.from_rows(rows[split], as_task(self.task)) if rows.get(split) else None

    def _search_score(self, cell: str) -> float:
        first = self.runs[cell][0]
        cases = self._cases(first, "val") or self._cases(first, "test")
        return run_value(cases, "score") if cases is not None else -math.inf

    def start(self, best_rows: dict[str, object]) -> None:
        """Round 0: every cell's best search run (its ``{"val", "test"}`` rows; ``None``: a cell without
        per-case results)."""
        for cell, rows in best_rows.items():
            split_rows = as_split_rows(rows)
            if split_rows:
                self.runs[cell] = [split_rows]
            else:
                self.eliminated[cell] = {"round": 0, "reason": "no finished search trial with per-case results"}
        order = sorted(self.runs, key=lambda c: -self._search_score(c))
        entrants = max(2, self.max_trials // MIN_RUNS) if self.max_trials else len(order)
        self.alive = order[:entrants]
        for cell in order[entrants:]:
            self.not_raced[cell] = {"val_score": self._search_score(cell), "reason":
                                    f"outside the {entrants} best validation scores after the search (the "
                                    f"budget pays for {MIN_RUNS} repeats of {entrants} cells)"}
        if not self.alive:
            self.status = "no_contest"
            return
        self.best = self.alive[0]
        self.status = "racing"
        self.tick()
        self.rounds.append({"round": 0, "cells": list(self.alive), "best": self.best, "tested": False,
                            "evidence": {c: {"search_val_score": self._search_score(c)} for c in self.alive},
                            "eliminated": []})
        self._next_round()

    def suggest(self) -> str | None:
        """The next cell to re-run in the current round, or None (the round is fully suggested)."""
        return self.queue.pop(0) if self.status == "racing" and self.queue else None

    def record(self, cell: str, rows, reason: str = "") -> None:
        """A repeat of the current round ended: its ``{"val", "test"}`` rows, or None and why it failed."""
        self.tick()
        if cell in self.waiting_for:
            self.waiting_for.remove(cell)
        split_rows = as_split_rows(rows)
        if split_rows and split_rows.get("val"):
            self.runs.setdefault(cell, []).append(split_rows)
        else:
            self.failed.append({"cell": cell, "round": self.round,
                                "reason": reason or "the repeat reported no per-case validation results"})
            if sum(f["cell"] == cell for f in self.failed) >= MAX_FAILED_REPEATS and cell in self.alive:
                self.alive.remove(cell)
                self.eliminated[cell] = {"round": self.round, "reason": f"{MAX_FAILED_REPEATS} of its repeats failed"}
        if self.status == "racing" and not self.queue and not self.waiting_for:
            if sum(f["round"] == self.round for f in self.failed) >= self._round_size > 0:
                self.status = "failed"  # every repeat of the round failed: more rounds would fail alike
                return
            self._evaluate()

    def repeats(self, cell: str, split: str = "val") -> list[Cases]:
        """A cell's repeats' cases on ``split`` (its search run left out)."""
        return [c for rows in self.runs.get(cell, [])[1:] if (c := self._cases(rows, split)) is not None]

    def _evaluate(self) -> None:
        repeats = {c: self.repeats(c) for c in self.alive}
        best, evidence, tested = evaluate(repeats, self.looks + 1, self.alpha, seed=self.seed + self.round)
        if tested:
            self.looks += 1
        if best is not None:
            # a cell with repeats outranks the search's choice only once it has them: the best by repeats
            self.best = best
        out = [c for c, e in evidence.items() if e["eliminated"]]
        for cell in out:
            self.eliminated[cell] = {"round": self.round, "look": self.looks, **evidence[cell]}
        self.alive = [c for c in self.alive if c not in out]
        self.rounds.append({"round": self.round, "cells": sorted(repeats), "best": self.best, "tested": tested,
                            "look": self.looks if tested else None, "evidence": evidence, "eliminated": sorted(out)})
        self._next_round()

    def _next_round(self) -> None:
        if len(self.alive) <= 1:
            self.status = "resolved"
            return
        left = self.max_trials - self.trials_used if self.max_trials else len(self.alive)
        if left < 2 or (self.max_minutes and self.elapsed_s >= 60 * self.max_minutes):
            self.status = "budget"
            return
        last = self.rounds[-1]["evidence"] if self.rounds else {}

        def gap(c: str) -> float:  # how far behind the best a cell is (repeats' mean, else the search's score)
            e = last.get(c, {})
            if "difference" in e and math.isfinite(e["difference"]):
                return e["difference"]
            return -e.get("search_val_score", -math.inf)

        contenders = sorted((c for c in self.alive if c != self.best), key=gap)
        cells = [self.best, *contenders][:left] if self.best in self.alive else contenders[:left]
        self.round += 1
        self._round_size = len(cells)
        self.queue, self.waiting_for = list(cells), list(cells)
        self.trials_used += len(cells)

    # -- the record ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("runs", "_tick", "queue", "_round_size", "task")}
        d["repeats"] = {cell: len(runs) - 1 for cell, runs in self.runs.items()}
        d["min_runs"] = MIN_RUNS
        return d

    def write(self, path: str | Path) -> None:
        """``race.json``: the race's record for the report (strict JSON: NaN written as null)."""

        atomic_write_text(Path(path), strict_json(self.to_dict()))


def read_race(folder: str | Path) -> dict | None:
    """A study folder's race record, or None (no race ran)."""
    path = Path(folder) / RACE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_confirmation(folder: str | Path) -> dict | None:
    """A study folder's confirmation record (``confirm.json``: the chosen cell, the reference, the runs asked
    and ended), or None (no confirmation started)."""
    path = Path(folder) / CONFIRM_FILE
    return json.loads(path.read_text()) if path.is_file() else None
