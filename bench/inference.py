"""The statistics checked against ground truth (issue 26, item 8): the real evidence code on synthetic studies.

Each replication builds one synthetic study's per-case tables with numpy (:class:`study.evidence.stats.Cases`, the
PCS task: Dice and a presence call per hemisphere) from known variance components, runs the study's pipeline on
them through the real code, and compares what that code says with the truth:

1. **search**: per cell ``--num-samples`` trials of one configuration (a fresh training run each); the one with the
   highest validation score is the cell's chosen run (``Run(selected=True, phase="search")``), the others are
   dropped, as the report drops them;
2. **repeats**: a race (:class:`study.evidence.racing.Race`, ``max_trials=budget``, fed the runs' ``{"val", "test"}``
   rows exactly as the searcher feeds it: ``start``, then ``suggest`` / ``record`` round by round), or
   ``--seeds K`` uniform re-runs of every cell (``phase="seeds"``);
3. **choice** on validation (:func:`study.evidence.inference.select`; the confirmed cell is the race's best, as the
   searcher asks for its confirmation runs, else the selection's best);
4. **confirmation** on test (:func:`study.evidence.inference.confirm`) from ``--confirm-runs`` fresh runs of the
   chosen cell and of the reference (cell ``c00``);
5. **claims** (:func:`study.evidence.inference.group_difference` on the test split and
   :func:`study.evidence.inference.claim_status` with the default margin) for contrasts fixed in advance.

**The synthetic tables.** Per split, subject ``i`` has a Dice effect ``u_i ~ N(0, subject_sd)``, a presence truth
``y_ij ~ Bernoulli(1/2)`` per hemisphere ``j`` and a classification difficulty ``h_ij ~ N(0, 1)`` (logit units),
shared by every cell and run. Cell ``c`` has a quality ``q_c`` and, per subject, an interaction
``w_ci ~ N(0, interaction_sd)`` shared by its runs. A training run ``r`` of cell ``c`` has one shift
``a_r ~ N(0, shift_sd)``, the same for its validation and its test results (one trained model). With
``m = q_c + a_r + w_ci``:

- ``dice_ij = clip(DICE_BASE + m + u_i + e_ij, 0, 1)``, ``e_ij ~ N(0, case_sd)`` per case and run;
- ``logit_ij = (2 y_ij - 1) (K + beta m + h_ij) + eps_ij``, ``eps_ij ~ N(0, CLS_NOISE_SD)`` per case and run; the
  probability is ``sigmoid(logit)``, so the call (``p >= 0.5``) is right when ``logit`` has the truth's sign.
  ``K`` puts the balanced accuracy at ``BA_BASE`` and ``beta`` makes it move one for one with ``m`` there, so the
  classification half of the score responds to the cell's quality, the interaction and the run shift as the
  Dice half does.

**Calibration** (:func:`calibrate`, Monte Carlo with fixed random numbers, so it is deterministic):

- ``case_sd`` (unless given) so that one run's score has the sd over test splits of ``test_subjects`` subjects
  (its shift held at 0) that makes a 95% interval ``+-test_halfwidth`` (``sd = halfwidth / 1.96``): that sd is what
  one run's subject bootstrap estimates. The balanced accuracy alone has a binomial floor (about 0.0088 at 120
  subjects and BA 0.92), so with a large ``subject_sd`` the target cannot be reached: ``case_sd`` is then 0 and
  the achieved half-width is reported;
- ``shift_sd`` so that the expected variance between runs of one cell's test score, on one fixed test split, is
  ``run_sd^2`` (what ``run_variance`` pools in a study; it includes the case noise's share).

**The truth.** A cell's true mean is the expected test score of one run of it on a fresh test split of
``test_subjects`` subjects (the expectation the confirmation's point estimate has): a Monte Carlo over
``--truth-runs`` runs, each on its own split, antithetic in the run shift, with common random numbers across
qualities (so differences are precise); its standard error is reported. The qualities of the alternative
scenarios are solved from the same Monte Carlo so that the *true means* differ by the stated amounts. The
large-split limit (5000 subjects per run) is reported beside it.

**Scenarios** (every cell ``c00..``; the reference is ``c00``):

- ``null10`` / ``null84``: every cell equal; race at ``--race-budget`` (12, the laptop's) / ``--large-race-budget``
  (100, the paper budget's) repeats; ``null10_b40``: ten equal cells and a race of 40 repeats (every cell enters,
  two tests, so the spending of alpha over tests is exercised);
- ``null10_seeds``: every cell equal, ``--claim-seeds`` (3) uniform repeats of every cell: the claims' null (a
  claim about a group needs repeats of every cell in it, which a race gives only to its entrants);
- ``better10``: ``c05`` better than the nine others by ``--difference`` (0.05) in true mean, the laptop race:
  power, the chance to pick the true best, eliminations of the true best, coverage and bias;
- ``worse_group10``: ``c01..c03`` worse than the others by twice the margin, uniform repeats: how often
  "non-inferior" is wrongly supported (and the power of "lower");
- ``power_check``: two cells ``--difference`` apart, each confirmed with the runs that
  :func:`study.evidence.inference.runs_to_resolve` says give 80% power (no selection): is its promise kept.

Figures (a rate's simulation error is binomial; a mean's is its sd over replications / sqrt(reps)):

- ``select_excluded``: ``select()`` excluded any cell that no cell truly beats (under the null: any exclusion);
- ``confirm_resolved``: ``confirm()`` read "resolved" though the confirmed cell equals the reference in truth;
- ``race_false_elimination``: the race eliminated a cell that no cell in it truly beats (null: any elimination);
- ``claim_supported[label]``: a claim read "supported" (a false rate where the claim is false, power where true);
- ``coverage``: the confirmed cell's 95% test-score interval (``confirm().estimates[best]["score"].ci``) holds
  its true mean; ``bias``: its point estimate minus its true mean;
- ``power``: the confirmed cell is the true best and its difference from the reference is resolved as positive;
  ``select(): best is the true best``; ``race: its best is the true best``;
- for the record (no target): how often ``select().best`` is the race's best, how often ``confirm()``'s p < 0.05
  disagrees with its interval (the p is a t test on the score's scale, the interval is built on Fisher's z),
  how often a claim was tested at all (every cell of both groups with ``MIN_RUNS`` repeats) and tested on part
  of a group (:func:`study.evidence.inference.group_difference` drops a cell without any unselected run), and,
  under the null, the union of every statement above (each procedure controls its own rate, not the union).

Targets (issue 26): every false-statement rate <= 0.05, coverage >= 0.93, |bias| <= 0.01. A figure PASSES when
it meets its target within twice its simulation error at the target (a rate ``p`` over ``R`` replications:
``p <= 0.05 + 2 sqrt(0.05 * 0.95 / R)``; coverage ``>= 0.93 - 2 sqrt(0.93 * 0.07 / R)``; ``|bias| <= 0.01 + 2 se``),
so that a procedure exactly at its target passes; power figures have no target and read ``-``.

    python -m bench.inference [--reps 200] [--scenarios null10,null84,...] [--from-report report.json]
        [--run-sd 0.065] [--subject-sd 0.08] [--interaction-sd 0.02] [--case-sd X] [--test-halfwidth 0.02]
        [--val-subjects 100] [--test-subjects 120] [--num-samples 2] [--race-budget 12]
        [--large-race-budget 100] [--seeds K] [--claim-seeds 3] [--confirm-runs 3] [--difference 0.05]
        [--resamples 200] [--truth-runs 40000] [--seed 0] [--results DIR]

Writes ``bench/results/inference.json`` (or into ``--results``) and prints the table; the runtime of each
scenario is in the JSON. ``tests/test_inference_bench.py`` runs a small seeded version through these functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from bench.common import print_table, write_result
from study.evidence import inference
from study.evidence.inference import MARGIN, Run
from study.evidence.racing import Race
from study.evidence.stats import Cases
from trainables.task import as_task

TASK = as_task(None)  # the PCS task, loaded once (``as_task(None)`` reads its YAML on every call)
TARGET = TASK.targets[0]
REGIONS = tuple(TARGET.regions)
DICE_BASE = 0.83  # a laptop study's test Dice (bench/results/variance.json)
BA_BASE = 0.92  # high enough that the binomial floor leaves room for a +-0.02 interval at 120 subjects
CLS_SUBJECT_SD = 1.0  # the subjects' classification difficulty, logit units
CLS_NOISE_SD = 0.5  # a run's per-case noise on the logit
PREVALENCE = 0.5
Z95 = float(scipy_stats.norm.ppf(0.975))
REFERENCE = "c00"
FALSE_RATE, COVERAGE, BIAS = 0.05, 0.93, 0.01
LIMIT_SUBJECTS = 5000  # the large-split limit of a true mean, reported beside it


# -- the variance components and the calibrated model --------------------------------------------------------
@dataclass(frozen=True)
class Components:
    """What the synthetic studies are built from (the study's measured figures by default)."""

    run_sd: float = 0.065  # between-run sd of one run's test score on a fixed test split
    subject_sd: float = 0.08  # Dice: the subject's effect, shared by cells, runs and hemispheres
    interaction_sd: float = 0.02  # cell x subject, shared by a cell's runs (Dice and, scaled, the classification)
    case_sd: float | None = None  # per case and run on Dice; None: calibrated to test_halfwidth
    test_halfwidth: float = 0.02  # one run's 95% score interval over the test subjects, +-
    val_subjects: int = 100
    test_subjects: int = 120


@dataclass(frozen=True)
class Model:
    """The calibrated generator: the components plus the latent run shift's sd and the per-case noise."""

    components: Components
    shift_sd: float
    case_sd: float
    cls_offset: float  # K
    cls_slope: float  # beta
    achieved: dict = field(default_factory=dict)  # what calibration reached: one-run half-width, run sd

    @property
    def val_subjects(self) -> int:
        return self.components.val_subjects

    @property
    def test_subjects(self) -> int:
        return self.components.test_subjects


def classification_constants() -> tuple[float, float]:
    """``K`` and ``beta``: the balanced accuracy is ``Phi(K / s)`` at ``m = 0`` (``s`` the logit's spread) and
    moves by ``beta phi(K / s) / s = 1`` per unit of ``m`` there."""
    s = math.hypot(CLS_SUBJECT_SD, CLS_NOISE_SD)
    z = float(scipy_stats.norm.ppf(BA_BASE))
    return z * s, s / float(scipy_stats.norm.pdf(z))


# -- the tables -------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """One split's subjects: ids, Dice effect ``u`` (n,), presence ``truth`` and difficulty ``h`` (n, 2)."""

    ids: list[str]
    u: np.ndarray
    truth: np.ndarray
    h: np.ndarray


def draw_split(model: Model, n: int, prefix: str, rng: np.random.Generator) -> Split:
    return Split([f"{prefix}{i:04d}" for i in range(n)], rng.normal(0, model.components.subject_sd, n),
                 (rng.random((n, len(REGIONS))) < PREVALENCE).astype(float),
                 rng.normal(0, CLS_SUBJECT_SD, (n, len(REGIONS))))


def case_arrays(model: Model, u: np.ndarray, truth: np.ndarray, h: np.ndarray, w: np.ndarray, quality,
                shift, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dice and P(present) ``(..., n, 2)`` of runs with ``shift`` (``(...)``) of a cell of ``quality`` on subjects
    ``u`` (``(..., n)``), ``truth``, ``h`` (``(..., n, 2)``) with interaction ``w`` (``(..., n)``)."""
    m = (np.asarray(quality, dtype=float)[..., None] + np.asarray(shift, dtype=float)[..., None] + w)[..., None]
    dice = np.clip(DICE_BASE + m + u[..., None] + rng.normal(0, model.case_sd, truth.shape), 0.0, 1.0)
    margin = model.cls_offset + model.cls_slope * m + h
    logit = (2 * truth - 1) * margin + rng.normal(0, CLS_NOISE_SD, truth.shape)
    return dice, 1 / (1 + np.exp(-logit))


def score_arrays(dice: np.ndarray, prob: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The PCS score of each run ``(...)`` from its ``(..., n, 2)`` arrays, written here from the task's definition
    (``(mean Dice + balanced accuracy) / 2``, a class absent from the truth counting 0), independently of
    :mod:`study.evidence.stats`; the suite checks the two agree."""
    called = prob >= 0.5
    positive = truth > 0.5
    axes = (-2, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall1 = (called & positive).sum(axis=axes) / positive.sum(axis=axes)
        recall0 = (~called & ~positive).sum(axis=axes) / (~positive).sum(axis=axes)
    ba = (np.nan_to_num(recall1) + np.nan_to_num(recall0)) / 2
    weights = dict(TASK.score)
    return weights["dice"] * dice.mean(axis=axes) + weights["balanced_accuracy"] * ba


def make_cases(model: Model, split: Split, w: np.ndarray, quality: float, shift: float,
               rng: np.random.Generator) -> Cases:
    dice, prob = case_arrays(model, split.u, split.truth, split.h, w, quality, shift, rng)
    return Cases(split.ids, dice, prob, split.truth, TASK)


def rows_of(cases: Cases) -> list[dict]:
    """A run's per-case rows as a trial logs them (:func:`trainables.metrics.per_case_rows`, binary target)."""
    return [{"subject_id": s, "target": TARGET.name, "region": region, "dice": float(cases.dice[i, j]),
             "truth": int(cases.truth[i, j]), "probability": float(cases.probability[i, j, 1])}
            for i, s in enumerate(cases.subjects) for j, region in enumerate(REGIONS)]


# -- Monte Carlo: calibration and the truth ---------------------------------------------------------------------
def _fresh_scores(model: Model, quality: float, runs: int, n: int, seed: int, shift: str = "random",
                  chunk: int = 4000) -> np.ndarray:
    """One score per run, each run on its own fresh split of ``n`` subjects. ``shift``: ``random``,
    ``antithetic`` (pairs ``a, -a``: returns the pair means) or ``zero``."""
    rng = np.random.default_rng(seed)
    out = []
    c = model.components
    left = runs
    while left > 0:
        r = min(chunk, left)
        left -= r
        u = rng.normal(0, c.subject_sd, (r, n))
        truth = (rng.random((r, n, len(REGIONS))) < PREVALENCE).astype(float)
        h = rng.normal(0, CLS_SUBJECT_SD, (r, n, len(REGIONS)))
        w = rng.normal(0, c.interaction_sd, (r, n))
        if shift == "zero":
            out.append(score_arrays(*case_arrays(model, u, truth, h, w, quality, np.zeros(r), rng)[:2], truth))
            continue
        a = rng.normal(0, model.shift_sd, r)
        if shift == "random":
            out.append(score_arrays(*case_arrays(model, u, truth, h, w, quality, a, rng), truth))
            continue
        noise_state = rng.bit_generator.state  # the same subjects and noise with -a: the pair's mean
        plus = score_arrays(*case_arrays(model, u, truth, h, w, quality, a, rng), truth)
        rng.bit_generator.state = noise_state
        minus = score_arrays(*case_arrays(model, u, truth, h, w, quality, -a, rng), truth)
        out.append((plus + minus) / 2)
    return np.concatenate(out)


def one_run_subject_sd(model: Model, n: int, runs: int = 3000, seed: int = 11) -> float:
    """The sd over fresh splits of ``n`` subjects of one run's score, its shift held at 0: what one run's subject
    bootstrap estimates."""
    return float(np.std(_fresh_scores(model, 0.0, runs, n, seed, shift="zero"), ddof=1))


def between_run_sd(model: Model, n: int, splits: int = 300, runs: int = 20, seed: int = 12,
                   quality: float = 0.0) -> float:
    """The root of the mean variance between ``runs`` runs of one cell of ``quality`` on the same split of ``n``
    subjects."""
    rng = np.random.default_rng(seed)
    c = model.components
    u = rng.normal(0, c.subject_sd, (splits, 1, n))
    truth = (rng.random((splits, 1, n, len(REGIONS))) < PREVALENCE).astype(float)
    h = rng.normal(0, CLS_SUBJECT_SD, (splits, 1, n, len(REGIONS)))
    w = rng.normal(0, c.interaction_sd, (splits, 1, n))
    shape = (splits, runs)
    u, w = np.broadcast_to(u, (*shape, n)), np.broadcast_to(w, (*shape, n))
    truth, h = np.broadcast_to(truth, (*shape, n, len(REGIONS))), np.broadcast_to(h, (*shape, n, len(REGIONS)))
    a = rng.normal(0, model.shift_sd, shape)
    scores = score_arrays(*case_arrays(model, u, truth, h, w, quality, a, rng), truth)
    return float(math.sqrt(np.mean(np.var(scores, axis=1, ddof=1))))


def calibrate(components: Components) -> Model:
    """``case_sd`` (unless given) to the one-run half-width, then ``shift_sd`` to the between-run sd (see the
    module docstring)."""
    k, beta = classification_constants()
    n = components.test_subjects
    model = Model(components, components.run_sd, components.case_sd or 0.0, k, beta)
    target_sd = components.test_halfwidth / Z95
    if components.case_sd is None:
        floor = one_run_subject_sd(model, n)
        if floor < target_sd:  # bisection: the sd grows with the case noise
            lo, hi = 0.0, 0.6
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if one_run_subject_sd(replace(model, case_sd=mid), n) < target_sd else (lo, mid)
            model = replace(model, case_sd=(lo + hi) / 2)
    noise = between_run_sd(replace(model, shift_sd=0.0), n)  # the case noise's share of the run variance
    wanted = math.sqrt(max(components.run_sd**2 - noise**2, 0.0))
    for _ in range(6):  # the shift's share of the run sd is nearly proportional to the shift's sd
        measured = between_run_sd(model, n)
        if abs(measured - components.run_sd) < 2e-4 or wanted == 0.0:
            break
        model = replace(model, shift_sd=model.shift_sd * wanted / math.sqrt(max(measured**2 - noise**2, 1e-12)))
    achieved = {"one_run_subject_sd": one_run_subject_sd(model, n), "run_sd": between_run_sd(model, n)}
    achieved["test_halfwidth"] = Z95 * achieved["one_run_subject_sd"]
    achieved["val_halfwidth"] = Z95 * one_run_subject_sd(model, components.val_subjects)
    return replace(model, achieved=achieved)


def true_means(model: Model, qualities: list[float], runs: int = 40000, seed: int = 21,
               subjects: int | None = None) -> dict[float, dict]:
    """Per quality, the expected score of one run on a fresh test split of ``subjects`` (default: the study's test
    split; antithetic Monte Carlo, common random numbers across the qualities): ``{mean, se}``."""
    out = {}
    n = subjects or model.test_subjects
    chunk = max(1, 480_000 // n)
    for q in qualities:
        pairs = _fresh_scores(model, q, runs // 2, n, seed, shift="antithetic", chunk=chunk)
        out[q] = {"mean": float(pairs.mean()), "se": float(pairs.std(ddof=1) / math.sqrt(pairs.size))}
    return out


def quality_for(model: Model, gap: float, runs: int = 20000, seed: int = 22) -> float:
    """The quality whose true mean is ``gap`` above that of quality 0 (secant on the Monte Carlo)."""
    if gap == 0:
        return 0.0
    base = true_means(model, [0.0], runs, seed)[0.0]["mean"]
    q, slope = gap, 1.0
    for _ in range(6):
        got = true_means(model, [q], runs, seed)[q]["mean"] - base
        if abs(got - gap) < 1e-4:
            break
        q2 = q + (gap - got) / slope
        got2 = true_means(model, [q2], runs, seed)[q2]["mean"] - base
        slope = (got2 - got) / (q2 - q) if q2 != q else slope
        q = q2
        if abs(got2 - gap) < 1e-4:
            break
    return q


# -- the scenarios ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contrast:
    """A claim about group ``a`` against group ``b`` (cell indices), fixed before the data."""

    label: str
    a: tuple[int, ...]
    b: tuple[int, ...]
    claim: str  # lower | higher | non_inferior


@dataclass(frozen=True)
class Scenario:
    name: str
    cells: int
    gaps: dict[int, float] = field(default_factory=dict)  # cell -> true-mean difference from the rest
    design: str = "race"  # race | seeds | power
    budget: int = 12  # race repeats
    seeds: int = 0  # uniform repeats per cell
    contrasts: tuple[Contrast, ...] = ()
    description: str = ""

    def names(self) -> list[str]:
        return [f"c{i:02d}" for i in range(self.cells)]


def standard_contrasts() -> tuple[Contrast, ...]:
    """The claims fixed in advance: group c01-c03 against c04-c06, "lower" and "non-inferior"."""
    return (Contrast("c01-c03 lower than c04-c06", (1, 2, 3), (4, 5, 6), "lower"),
            Contrast("c01-c03 non-inferior to c04-c06", (1, 2, 3), (4, 5, 6), "non_inferior"))


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    """The bench's scenarios (``--seeds K`` replaces every race by K uniform repeats, as the study's does)."""
    contrasts = standard_contrasts()
    race = {"design": "seeds", "seeds": args.seeds} if args.seeds else {}
    return {s.name: s for s in [
        Scenario("null10", 10, design="race", budget=args.race_budget, contrasts=contrasts,
                 description=f"10 equal cells, race of {args.race_budget}", **race),
        Scenario("null84", 84, design="race", budget=args.large_race_budget, contrasts=contrasts,
                 description=f"84 equal cells, race of {args.large_race_budget}", **race),
        Scenario("null10_b40", 10, design="race", budget=40, contrasts=contrasts,
                 description="10 equal cells, race of 40 (two tests)", **race),
        Scenario("null10_seeds", 10, design="seeds", seeds=args.claim_seeds, contrasts=contrasts,
                 description=f"10 equal cells, {args.claim_seeds} uniform repeats"),
        Scenario("better10", 10, gaps={5: args.difference}, design="race", budget=args.race_budget,
                 contrasts=contrasts, description=f"c05 better by {args.difference}, race of {args.race_budget}",
                 **race),
        Scenario("worse_group10", 10, gaps={1: -2 * args.margin, 2: -2 * args.margin, 3: -2 * args.margin},
                 design="seeds", seeds=args.claim_seeds, contrasts=contrasts,
                 description=f"c01-c03 worse by {2 * args.margin}, {args.claim_seeds} uniform repeats"),
        Scenario("power_check", 2, gaps={1: args.difference}, design="power",
                 description=f"2 cells {args.difference} apart, runs_to_resolve's runs each, no selection"),
    ]}


@dataclass
class Settings:
    num_samples: int = 2
    confirm_runs: int = 3
    resamples: int = 200
    margin: float = MARGIN
    power_runs: int | None = None  # power_check: runs per side (None: runs_to_resolve's)


# -- one replication --------------------------------------------------------------------------------------------
class World:
    """One synthetic study: its splits, its cells' qualities and interactions, and a run maker."""

    def __init__(self, model: Model, qualities: dict[str, float], rng: np.random.Generator) -> None:
        self.model, self.qualities, self.rng = model, qualities, rng
        self.val = draw_split(model, model.val_subjects, "v", rng)
        self.test = draw_split(model, model.test_subjects, "t", rng)
        sd = model.components.interaction_sd
        self.w = {c: (rng.normal(0, sd, model.val_subjects), rng.normal(0, sd, model.test_subjects))
                  for c in qualities}

    def run(self, cell: str, phase: str, round_: int | None = None) -> Run:
        shift = self.rng.normal(0, self.model.shift_sd)
        q, (w_val, w_test) = self.qualities[cell], self.w[cell]
        return Run(make_cases(self.model, self.val, w_val, q, shift, self.rng),
                   make_cases(self.model, self.test, w_test, q, shift, self.rng), phase, round=round_)


def _rows(run: Run) -> dict:
    return {"val": rows_of(run.val), "test": rows_of(run.test)}


def search(world: World, cells: list[str], num_samples: int) -> dict[str, list[Run]]:
    """Each cell's chosen search run: the best of ``num_samples`` by validation score."""
    out = {}
    for cell in cells:
        trials = [world.run(cell, "search") for _ in range(num_samples)]
        best = max(trials, key=lambda r: inference.run_value(r.val, "score"))
        best.selected = True
        out[cell] = [best]
    return out


def race_repeats(world: World, runs: dict[str, list[Run]], budget: int, seed: int) -> Race:
    """Drive a real race as the searcher does; every repeat is appended to ``runs``."""
    race = Race(max_trials=budget, seed=seed, task=TASK)
    race.start({c: _rows(rs[0]) for c, rs in runs.items()})
    while race.status == "racing":
        cells = []
        while (cell := race.suggest()) is not None:
            cells.append(cell)
        if not cells:
            break
        for cell in cells:
            run = world.run(cell, "race", race.round)
            runs[cell].append(run)
            race.record(cell, _rows(run))
    return race


def truly_beaten(qualities: dict[str, float], among: list[str]) -> set[str]:
    """The cells of ``among`` that another cell of ``among`` truly beats (an elimination of any other is false)."""
    top = max(qualities[c] for c in among)
    return {c for c in among if qualities[c] < top}


def replicate(model: Model, scenario: Scenario, qualities: dict[str, float], truth: dict[float, dict],
              settings: Settings, seed: int) -> dict:
    """One synthetic study through the pipeline; what each procedure said, against the truth."""
    rng = np.random.default_rng(seed)
    names = scenario.names()
    world = World(model, qualities, rng)
    out: dict = {}
    if scenario.design == "power":
        return _power_replicate(world, names, truth, settings, seed)
    runs = search(world, names, settings.num_samples)
    race = None
    if scenario.design == "race":
        race = race_repeats(world, runs, scenario.budget, seed)
        raced = [c for c in names if c not in race.not_raced]
        eliminated = [c for c, e in race.eliminated.items() if "look" in e]
        out.update(race_false_elimination=bool(set(eliminated) - truly_beaten(qualities, raced)),
                   race_any_elimination=bool(eliminated), race_looks=race.looks, race_trials=race.trials_used,
                   race_entrants=len(raced), race_best=race.best)
    else:
        for cell in names:
            runs[cell].extend(world.run(cell, "seeds") for _ in range(scenario.seeds))
    selection = inference.select(runs, resamples=settings.resamples, seed=seed)
    tested = [c for c in names if selection.runs.get(c, 0) >= inference.MIN_RUNS]
    beaten = truly_beaten(qualities, tested) if tested else set()
    out.update(select_excluded=bool(set(selection.excluded) - beaten), select_any_excluded=bool(selection.excluded),
               select_best=selection.best, may_be_best=len(selection.may_be_best))
    chosen = race.best if race is not None and race.best else selection.best
    out["chosen"] = chosen
    out["race_agrees_with_select"] = None if race is None else race.best == selection.best
    for cell in dict.fromkeys((chosen, REFERENCE)):
        runs[cell].extend(world.run(cell, "confirm") for _ in range(settings.confirm_runs))
    confirmation = inference.confirm(runs, chosen, REFERENCE, metrics=("score",), resamples=settings.resamples,
                                     seed=seed)
    diff = confirmation.difference.get("score") or {}
    out.update(confirm_status=confirmation.status, confirm_difference=diff.get("difference"),
               confirm_resolved=confirmation.status == inference.RESOLVED, confirm_p=diff.get("p"))
    estimate = confirmation.estimates.get(chosen, {}).get("score")
    if estimate is not None:
        true_mean = truth[qualities[chosen]]["mean"]
        lo, hi = estimate.ci
        out.update(estimate=estimate.value, ci=[lo, hi], true_mean=true_mean, error=estimate.value - true_mean,
                   covered=bool(lo <= true_mean <= hi) if math.isfinite(lo) else None)
    for contrast in scenario.contrasts:
        a, b = [names[i] for i in contrast.a if i < len(names)], [names[i] for i in contrast.b if i < len(names)]
        d = inference.group_difference(runs, a, b, "score", "test", resamples=settings.resamples, seed=seed)
        out.setdefault("claims", {})[contrast.label] = inference.claim_status(d, contrast.claim, settings.margin)
        # how many of each group's cells the difference was computed on (a cell without repeats is dropped)
        out.setdefault("claim_cells", {})[contrast.label] = None if d is None else [d["cells"], d["other_cells"]]
    return out


def _power_replicate(world: World, names: list[str], truth: dict[float, dict], settings: Settings,
                     seed: int) -> dict:
    best, reference = names[1], names[0]
    k = settings.power_runs or 3
    runs = {c: [world.run(c, "confirm") for _ in range(k)] for c in names}
    confirmation = inference.confirm(runs, best, reference, metrics=("score",), resamples=settings.resamples,
                                     seed=seed)
    diff = confirmation.difference.get("score") or {}
    return {"power_resolved": confirmation.status == inference.RESOLVED and diff.get("difference", 0) > 0,
            "confirm_status": confirmation.status, "runs_per_side": k}


# -- the summary ------------------------------------------------------------------------------------------------
def _rate(values: list[bool]) -> tuple[float, float, int]:
    n = len(values)
    p = sum(values) / n if n else float("nan")
    return p, math.sqrt(p * (1 - p) / n) if n else float("nan"), n


def _row(scenario: str, figure: str, value: float, se: float, n: int, target: str | None, kind: str) -> dict:
    """``kind``: ``false`` (<= 0.05), ``coverage`` (>= 0.93), ``bias`` (|.| <= 0.01) or ``info`` (no target)."""
    if kind == "false" and n:
        passed = value <= FALSE_RATE + 2 * math.sqrt(FALSE_RATE * (1 - FALSE_RATE) / n)
    elif kind == "coverage" and n:
        passed = value >= COVERAGE - 2 * math.sqrt(COVERAGE * (1 - COVERAGE) / n)
    elif kind == "bias" and n:
        passed = abs(value) <= BIAS + 2 * se
    else:
        passed = None
    return {"scenario": scenario, "figure": figure, "value": value, "se": se, "n": n, "target": target or "-",
            "result": "-" if passed is None else "PASS" if passed else "FAIL"}


def summarise(scenario: Scenario, outcomes: list[dict], means: dict[str, float], margin: float = MARGIN) -> list[dict]:
    """The figures of one scenario (see the module docstring), each with its simulation error and target;
    ``means``: each cell's true mean."""
    name, rows = scenario.name, []
    if scenario.design == "power":
        p, se, n = _rate([o["power_resolved"] for o in outcomes])
        return [_row(name, f"power at runs_to_resolve's {outcomes[0]['runs_per_side']} runs/side (promised 0.80)",
                     p, se, n, None, "info")]
    null = len(set(means.values())) == 1
    top = max(means.values())
    best_cells = [c for c, v in means.items() if v == top]
    true_best = best_cells[0] if len(best_cells) == 1 else None  # None: no single true best
    if "race_false_elimination" in outcomes[0]:
        rows.append(_row(name, "race: false elimination (family-wise)",
                         *_rate([o["race_false_elimination"] for o in outcomes]), "<= 0.05", "false"))
        if true_best is not None:
            rows.append(_row(name, "race: its best is the true best",
                             *_rate([o["race_best"] == true_best for o in outcomes]), None, "info"))
    rows.append(_row(name, "select(): a cell excluded falsely", *_rate([o["select_excluded"] for o in outcomes]),
                     "<= 0.05", "false"))
    if "race_agrees_with_select" in outcomes[0] and outcomes[0]["race_agrees_with_select"] is not None:
        rows.append(_row(name, "select().best is the race's best",
                         *_rate([bool(o["race_agrees_with_select"]) for o in outcomes]), None, "info"))
    if null:
        rows.append(_row(name, "confirm(): resolved", *_rate([o["confirm_resolved"] for o in outcomes]),
                         "<= 0.05", "false"))
    else:
        if true_best is not None:
            rows.append(_row(name, "select(): best is the true best",
                             *_rate([o["select_best"] == true_best for o in outcomes]), None, "info"))
        same = [o for o in outcomes if o["chosen"] != REFERENCE and means[o["chosen"]] == means[REFERENCE]]
        if same:
            rows.append(_row(name, "confirm(): resolved, chosen cell truly = reference",
                             *_rate([o["confirm_resolved"] for o in same]), "<= 0.05", "false"))
        if true_best is not None and means[true_best] > means[REFERENCE]:
            rows.append(_row(name, "power: true best chosen and resolved > reference",
                             *_rate([o["chosen"] == true_best and o["confirm_resolved"]
                                     and (o["confirm_difference"] or 0) > 0 for o in outcomes]), None, "info"))
    with_p = [o for o in outcomes if o.get("confirm_p") is not None and o["confirm_status"] in
              (inference.RESOLVED, inference.NOT_RESOLVED)]
    if with_p:
        rows.append(_row(name, "confirm(): p < 0.05 disagrees with its interval",
                         *_rate([(o["confirm_p"] < 0.05) != o["confirm_resolved"] for o in with_p]), None, "info"))
    covered = [o["covered"] for o in outcomes if o.get("covered") is not None]
    if covered:
        rows.append(_row(name, "coverage of the chosen cell's 95% CI", *_rate(covered), ">= 0.93", "coverage"))
        errors = np.array([o["error"] for o in outcomes if o.get("error") is not None])
        rows.append(_row(name, "bias of the chosen cell's score", float(errors.mean()),
                         float(errors.std(ddof=1) / math.sqrt(errors.size)), int(errors.size), "|.| <= 0.01", "bias"))
    names = scenario.names()
    for contrast in scenario.contrasts:
        statuses = [o["claims"][contrast.label] for o in outcomes]
        gap = (np.mean([means[names[i]] for i in contrast.a]) - np.mean([means[names[i]] for i in contrast.b]))
        true_claim = {"lower": gap < 0, "higher": gap > 0, "non_inferior": gap > -margin}[contrast.claim]
        supported = _rate([s == inference.SUPPORTED for s in statuses])
        if true_claim:
            rows.append(_row(name, f"claim '{contrast.label}' supported (true: power)", *supported, None, "info"))
        else:
            rows.append(_row(name, f"claim '{contrast.label}' supported (false claim)", *supported, "<= 0.05",
                             "false"))
        rows.append(_row(name, f"claim '{contrast.label}' tested (>= 3 runs/cell)",
                         *_rate([s not in ("not tested", inference.NEEDS_REPEATS) for s in statuses]), None, "info"))
        sizes = [(o["claim_cells"][contrast.label], s) for o, s in zip(outcomes, statuses, strict=True)]
        partial = [c != [len(contrast.a), len(contrast.b)] for c, s in sizes
                   if s not in ("not tested", inference.NEEDS_REPEATS)]
        if partial:
            rows.append(_row(name, f"claim '{contrast.label}' tested on part of a group", *_rate(partial), None,
                             "info"))
    if null:
        rows.append(_row(name, "any false statement (union of the above; each is controlled alone)",
                         *_rate([any_false_statement(o, scenario.contrasts) for o in outcomes]), None, "info"))
    return rows


def any_false_statement(outcome: dict, contrasts: tuple[Contrast, ...]) -> bool:
    """Under the null: did anything read as a difference (an exclusion, an elimination, "resolved", a supported
    "lower" or "higher" claim)?"""
    claims = [outcome["claims"][c.label] == inference.SUPPORTED for c in contrasts if c.claim != "non_inferior"]
    return bool(outcome.get("select_excluded") or outcome.get("race_false_elimination")
                or outcome.get("confirm_resolved") or any(claims))


def run_scenario(model: Model, scenario: Scenario, qualities: dict[str, float], truth: dict[float, dict],
                 settings: Settings, reps: int, seed: int) -> tuple[list[dict], list[dict], float]:
    """``reps`` replications; returns (outcomes, summary rows, seconds)."""
    start = time.perf_counter()
    base = seed * 1_000_003 + zlib.crc32(scenario.name.encode()) % 100_000 * 1000
    outcomes = [replicate(model, scenario, qualities, truth, settings, base + r) for r in range(reps)]
    elapsed = time.perf_counter() - start
    means = {c: truth[q]["mean"] for c, q in qualities.items()}
    return outcomes, summarise(scenario, outcomes, means, settings.margin), elapsed


def scenario_qualities(model: Model, scenario: Scenario, solved: dict[float, float]) -> dict[str, float]:
    """Each cell's latent quality (the gaps in true mean solved to qualities once, in ``solved``)."""
    for gap in scenario.gaps.values():
        if gap not in solved:
            solved[gap] = quality_for(model, gap)
    return {c: solved[scenario.gaps[i]] if i in scenario.gaps else 0.0 for i, c in enumerate(scenario.names())}


# -- the command line --------------------------------------------------------------------------------------------
def components_from_report(path: Path) -> Components | None:
    """The variance components a finished study's ``report.json`` carries (its ``variance_components``: ``run_sd``,
    the subject counts and one run's subject sd), or None when it has none."""
    vc = _find_key(json.loads(Path(path).read_text()), "variance_components")
    if not isinstance(vc, dict) or not vc.get("run_sd"):
        return None
    base = Components()
    one_run = vc.get("test_one_run_subject_sd")
    return replace(base, run_sd=float(vc["run_sd"]),
                   val_subjects=int(vc.get("subjects_val") or vc.get("val_subjects") or base.val_subjects),
                   test_subjects=int(vc.get("subjects_test") or vc.get("test_subjects") or base.test_subjects),
                   test_halfwidth=Z95 * float(one_run) if one_run else base.test_halfwidth)


def _find_key(doc, key: str):
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for v in doc.values():
            if (found := _find_key(v, key)) is not None:
                return found
    elif isinstance(doc, list):
        for v in doc:
            if (found := _find_key(v, key)) is not None:
                return found
    return None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200, help="replications per scenario (>= 200 for the record)")
    p.add_argument("--scenarios", default="null10,null84,null10_b40,null10_seeds,better10,worse_group10,power_check")
    p.add_argument("--from-report", type=Path, help="a finished study's report.json (its variance_components)")
    base = Components()
    p.add_argument("--run-sd", type=float, default=base.run_sd)
    p.add_argument("--subject-sd", type=float, default=base.subject_sd)
    p.add_argument("--interaction-sd", type=float, default=base.interaction_sd)
    p.add_argument("--case-sd", type=float, default=None, help="default: calibrated to --test-halfwidth")
    p.add_argument("--test-halfwidth", type=float, default=base.test_halfwidth)
    p.add_argument("--val-subjects", type=int, default=base.val_subjects)
    p.add_argument("--test-subjects", type=int, default=base.test_subjects)
    p.add_argument("--num-samples", type=int, default=2, help="search trials per cell")
    p.add_argument("--race-budget", type=int, default=12, help="the race's repeats (the laptop budget's)")
    p.add_argument("--large-race-budget", type=int, default=100, help="null84's race (the paper budget's)")
    p.add_argument("--seeds", type=int, default=0, help="K > 0: K uniform repeats per cell instead of every race")
    p.add_argument("--claim-seeds", type=int, default=3, help="uniform repeats in the claims' scenarios")
    p.add_argument("--confirm-runs", type=int, default=3)
    p.add_argument("--difference", type=float, default=0.05, help="the true difference of the better cell")
    p.add_argument("--margin", type=float, default=MARGIN)
    p.add_argument("--resamples", type=int, default=200, help="subject bootstrap of select/confirm/claims")
    p.add_argument("--truth-runs", type=int, default=40000, help="Monte Carlo runs per true mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    wall = time.perf_counter()
    if args.from_report:
        components = components_from_report(args.from_report)
        if components is None:
            print(f"{args.from_report}: no variance_components with a run_sd (a report from before issue 26, or a "
                  "study without repeats); give the components on the command line", file=sys.stderr)
            return 2
    else:
        components = Components(args.run_sd, args.subject_sd, args.interaction_sd, args.case_sd,
                                args.test_halfwidth, args.val_subjects, args.test_subjects)
    t = time.perf_counter()
    model = calibrate(components)
    calibrate_s = time.perf_counter() - t
    print(f"calibrated: shift_sd {model.shift_sd:.4f}, case_sd {model.case_sd:.4f}; achieved run sd "
          f"{model.achieved['run_sd']:.4f}, one run's test half-width {model.achieved['test_halfwidth']:.4f} "
          f"({calibrate_s:.1f} s)", flush=True)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    table = scenarios(args)
    unknown = [s for s in chosen if s not in table]
    if unknown:
        print(f"unknown scenario(s) {unknown}: {', '.join(table)}", file=sys.stderr)
        return 2
    settings = Settings(args.num_samples, args.confirm_runs, args.resamples, args.margin)
    solved: dict[float, float] = {0.0: 0.0}
    per_scenario = {name: scenario_qualities(model, table[name], solved) for name in chosen}
    t = time.perf_counter()
    truth = true_means(model, sorted(set(solved.values())), args.truth_runs)
    limit = true_means(model, [0.0], 2000, seed=23, subjects=LIMIT_SUBJECTS) if args.truth_runs >= 2000 else {}
    truth_s = time.perf_counter() - t
    rows, record = [], {}
    for name in chosen:
        scenario = table[name]
        if scenario.design == "power":
            settings = replace(settings, power_runs=power_runs(model, truth, solved[args.difference]))
        outcomes, summary, seconds = run_scenario(model, scenario, per_scenario[name], truth, settings, args.reps,
                                                  args.seed)
        rows.extend(summary)
        record[name] = {"description": scenario.description, "design": scenario.design, "cells": scenario.cells,
                        "budget": scenario.budget if scenario.design == "race" else None, "seeds": scenario.seeds,
                        "qualities": sorted(set(per_scenario[name].values())),
                        "true_means": {c: truth[q]["mean"] for c, q in per_scenario[name].items()
                                       if q != 0.0 or c == REFERENCE},
                        "seconds": seconds, "seconds_per_replication": seconds / max(args.reps, 1),
                        "outcomes": _compact(outcomes)}
        print(f"{name}: {args.reps} replications in {seconds:.1f} s", flush=True)
    print()
    print_table(rows, ["scenario", "figure", "value", "se", "n", "target", "result"])
    wall_s = time.perf_counter() - wall
    settings_doc = {**vars(args), "from_report": str(args.from_report) if args.from_report else None,
                    "results": str(args.results) if args.results else None}
    extra = {"settings": settings_doc, "components": asdict(components),
             "model": {"shift_sd": model.shift_sd, "case_sd": model.case_sd, "cls_offset": model.cls_offset,
                       "cls_slope": model.cls_slope, "dice_base": DICE_BASE, "ba_base": BA_BASE,
                       "cls_subject_sd": CLS_SUBJECT_SD, "cls_noise_sd": CLS_NOISE_SD, "prevalence": PREVALENCE,
                       "achieved": model.achieved},
             "truth": {"qualities": {str(q): truth[q] for q in truth}, "gaps_to_qualities": {str(g): q for g, q in
                                                                                           solved.items()},
                       "large_split_limit_q0": limit.get(0.0) if limit else None,
                       "large_split_subjects": LIMIT_SUBJECTS},
             "scenarios": record, "targets": {"false_rate": FALSE_RATE, "coverage": COVERAGE, "bias": BIAS},
             "pass_rule": "a figure meets its target within twice its simulation error at the target",
             "wall_s": wall_s, "calibrate_s": calibrate_s, "truth_s": truth_s,
             "failures": [r for r in rows if r["result"] == "FAIL"]}
    command = "python -m bench.inference " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result("inference", command.strip(), rows, extra, args.results)
    print(f"\n{len(rows)} figures, {sum(r['result'] == 'FAIL' for r in rows)} FAIL; {wall_s:.0f} s; {path}")
    return 0


def power_runs(model: Model, truth: dict[float, dict], quality: float) -> int:
    """``runs_to_resolve``'s runs per side for the true difference between quality ``quality`` and 0, from the
    run variance a study would pool over the two cells (the mean of their between-run variances: the better
    cell's is smaller, its score nearer the ceiling) and the paired subject variance of their difference
    (measured on one synthetic pair of cells with many runs, so that it is that of the means over runs)."""
    difference = truth[quality]["mean"] - truth[0.0]["mean"]
    run_var = float(np.mean([between_run_sd(model, model.test_subjects, quality=q) ** 2 for q in (0.0, quality)]))
    world = World(model, {"c00": 0.0, "c01": quality}, np.random.default_rng(31))
    cells = {c: [world.run(c, "confirm").test for _ in range(40)] for c in ("c00", "c01")}
    v_subjects = inference.bootstrap_subjects(cells, "score", 400, 0).paired_variance("c01", "c00")
    return inference.runs_to_resolve(difference, run_var, v_subjects) or inference.MIN_RUNS


def _compact(outcomes: list[dict]) -> dict:
    """Per outcome key, the replications' values (lists), for re-analysis without re-running."""
    keys = sorted({k for o in outcomes for k in o})
    return {k: [o.get(k) for o in outcomes] for k in keys}


if __name__ == "__main__":
    raise SystemExit(main())
