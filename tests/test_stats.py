"""The report's statistics (study/evidence/stats.py) against independent computations on small fixed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from study.evidence.stats import Cases, auc_of, compare, interval, score_of


def _cases(dice: np.ndarray, prob: np.ndarray | None = None, truth: np.ndarray | None = None, prefix: str = "s"):
    n = len(dice)
    rng = np.random.default_rng(1)
    prob = rng.random((n, 2)) if prob is None else prob
    truth = (rng.random((n, 2)) < 0.5).astype(float) if truth is None else truth
    return Cases([f"{prefix}{i:03d}" for i in range(n)], np.asarray(dice, float), np.asarray(prob, float),
                 np.asarray(truth, float))


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory_one_and_scipys() -> None:
    rng = np.random.default_rng(0)
    dice = np.clip(rng.normal(0.6, 0.15, size=(200, 2)), 0, 1)
    comparison = compare({"a": [_cases(dice)]}, resamples=4000, seed=3)
    lo, hi = comparison.cells["a"].ci["dice"]
    per_subject = dice.mean(axis=1)  # subjects are resampled with both hemispheres
    half = 1.959964 * per_subject.std(ddof=1) / math.sqrt(len(per_subject))
    assert comparison.cells["a"].estimate["dice"] == pytest.approx(dice.mean())
    assert lo == pytest.approx(dice.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(dice.mean() + half, abs=0.15 * half)
    ref = scipy_stats.bootstrap((per_subject,), np.mean, n_resamples=4000, method="percentile", random_state=5)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.1 * half)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.1 * half)


def test_auc_and_score_against_their_definitions() -> None:
    rng = np.random.default_rng(4)
    truth = (rng.random((30, 2)) < 0.6).astype(float)
    prob = np.clip(0.3 * truth + rng.random((30, 2)) * 0.7, 0, 1)
    prob[0, 0] = prob[1, 1]  # a tie counts half
    dice = rng.random((30, 2))
    c = _cases(dice, prob, truth)
    full = np.arange(30)[None, :]
    assert auc_of(c, full)[0] == pytest.approx(roc_auc_score(truth.ravel(), prob.ravel()))
    pred = prob.ravel() >= 0.5
    y = truth.ravel() > 0.5
    balanced = ((pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum()) / 2
    assert score_of(c, full)[0] == pytest.approx((dice.mean() + balanced) / 2)


def test_the_difference_from_the_reference_is_paired_by_subject() -> None:
    ref = np.array([[0.50, 0.52], [0.61, 0.59], [0.40, 0.44], [0.70, 0.66], [0.55, 0.57], [0.45, 0.41],
                    [0.66, 0.60], [0.52, 0.50]])
    better = ref + np.array([0.05, 0.02, 0.08, 0.01, 0.04, 0.06, 0.03, 0.07])[:, None]
    comparison = compare({"ref": [_cases(ref)], "better": [_cases(better)]}, reference="ref", resamples=500)
    d = comparison.cells["better"].vs_reference["dice"]
    # every subject gains 0.01-0.08: a paired interval excludes 0, an unpaired one (sd ~0.1 each) would not
    assert d["difference"] == pytest.approx((better - ref).mean()) and d["ci"][0] > 0
    assert not hasattr(comparison.cells["better"], "wilcoxon_p") and not hasattr(comparison.cells["better"], "p_best")


def test_a_cell_that_wins_on_every_subject_is_best_and_alone() -> None:
    rng = np.random.default_rng(7)
    truth = (rng.random((40, 2)) < 0.5).astype(float)
    weak = rng.random((40, 2)) * 0.5
    strong = weak + 0.3
    perfect = truth * 0.9 + 0.05  # presence right every time
    comparison = compare({"weak": [_cases(weak, rng.random((40, 2)), truth)],
                          "strong": [_cases(strong, perfect, truth)]}, resamples=1000)
    assert comparison.best == "strong"
    assert comparison.tied_with_best() == ["strong"]
    assert comparison.cells["weak"].vs_best["ci"][0] > 0


def test_two_equal_cells_are_never_separated() -> None:
    rng = np.random.default_rng(9)
    dice = rng.random((25, 2))
    c = _cases(dice)
    comparison = compare({"a": [c], "b": [_cases(dice, c.probability, c.truth)]}, resamples=1000)
    assert sorted(comparison.tied_with_best()) == ["a", "b"]


def test_seeds_and_subjects_are_resampled_together() -> None:
    rng = np.random.default_rng(2)
    dice = rng.random((30, 2))
    one = compare({"a": [_cases(dice)]}, resamples=2000)
    # three runs that differ by a seed effect: the interval must widen, the estimate is their mean
    runs = [_cases(np.clip(dice + shift, 0, 1)) for shift in (-0.1, 0.0, 0.1)]
    three = compare({"a": runs}, resamples=2000)
    assert three.seeds_resampled and three.cells["a"].runs == 3
    assert three.cells["a"].estimate["dice"] == pytest.approx(np.mean([r.dice.mean() for r in runs]))
    width = lambda c: c.cells["a"].ci["dice"][1] - c.cells["a"].ci["dice"][0]  # noqa: E731
    assert width(three) > width(one)


def test_only_subjects_every_cell_has_are_compared_and_cells_without_cases_are_listed() -> None:
    rng = np.random.default_rng(3)
    a = _cases(rng.random((10, 2)))
    b = _cases(rng.random((12, 2)))
    comparison = compare({"a": [a], "b": [b], "c": []})
    assert comparison.subjects == a.subjects and comparison.missing == ["c"]
    assert all(math.isnan(v) for v in interval(np.array([np.nan, np.nan])))


def test_the_variation_between_runs_widens_the_difference_from_the_best() -> None:
    rng = np.random.default_rng(8)
    truth = (rng.random((200, 2)) < 0.5).astype(float)
    prob = np.clip(truth * 0.6 + 0.2 + rng.normal(0, 0.05, (200, 2)), 0, 1)
    best = _cases(np.clip(0.80 + rng.normal(0, 0.05, (200, 2)), 0, 1), prob, truth)
    other = _cases(np.clip(0.76 + rng.normal(0, 0.05, (200, 2)), 0, 1), prob, truth)
    runs = {"best": [best, best], "other": [other]}
    subjects_only = compare(runs, seed=1)
    with_runs = compare(runs, seed=1, between_run_sd=0.05)
    assert not subjects_only.cells["other"].indistinguishable_from_best  # 200 subjects separate 0.02 in score
    assert with_runs.cells["other"].indistinguishable_from_best  # runs that move by 0.05 do not
    # the interval, independently: every run in every resample, plus sd^2 (1/2 + 1/1)
    idx = np.random.default_rng(1).integers(0, 200, size=(2000, 200))
    d = score_of(best, idx) - score_of(other, idx)
    point = with_runs.cells["best"].estimate["score"] - with_runs.cells["other"].estimate["score"]
    half = 1.959964 * math.sqrt(np.var(d, ddof=1) + 0.05**2 * 1.5)
    lo, hi = with_runs.cells["other"].vs_best["ci"]
    assert lo == pytest.approx(point - half, rel=0.05) and hi == pytest.approx(point + half, rel=0.05)
    # each cell's own interval takes the runs' variation too: sd^2 / k (one run for "other")
    sub = score_of(other, idx)
    half_own = 1.959964 * math.sqrt(np.var(sub, ddof=1) + 0.05**2)
    est = with_runs.cells["other"].estimate["score"]
    assert with_runs.cells["other"].ci["score"] == pytest.approx((est - half_own, est + half_own), rel=0.05)
    assert with_runs.cells["other"].subjects_ci == pytest.approx(subjects_only.cells["other"].ci["score"])
    assert with_runs.typical_half_width() == pytest.approx(subjects_only.typical_half_width(), rel=0.1)
    # so do the difference from the reference and the group differences (the label verdict's, the claims')
    against = compare(runs, reference="other", seed=1, between_run_sd=0.05)
    vs_ref = against.cells["best"].vs_reference["score"]
    assert vs_ref["difference"] == pytest.approx(point)
    assert vs_ref["ci"] == pytest.approx((point - half, point + half), rel=0.05)
    group = against.group_difference(["best"], ["other"], "score")
    assert group["ci"] == pytest.approx((point - half, point + half), rel=0.05)
    assert subjects_only.group_difference(["best"], ["other"], "score")["ci"][0] > 0  # resolved on subjects alone
