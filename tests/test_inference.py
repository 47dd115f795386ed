"""Run-level inference (study/evidence/inference.py) against independent computations on small fixed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from study.evidence.inference import (
    MIN_RUNS,
    NEEDS_REPEATS,
    Run,
    bootstrap_subjects,
    bounded_interval,
    claim_status,
    confirm,
    group_difference,
    run_value,
    run_variance,
    satterthwaite,
    select,
)
from study.evidence.stats import Cases


def _cases(level: float, seed: int, n: int = 40, prefix: str = "s") -> Cases:
    rng = np.random.default_rng(seed)
    truth = (np.random.default_rng(5).random((n, 2)) < 0.5).astype(float)
    dice = np.clip(level + rng.normal(0, 0.05, (n, 2)), 0, 1)
    prob = np.clip(np.where(truth > 0, level, 1 - level) + rng.normal(0, 0.1, (n, 2)), 0, 1)
    return Cases([f"{prefix}{i:03d}" for i in range(n)], dice, prob, truth)


def _runs(levels: list[float], seed: int, phase: str = "race", selected_first: bool = True) -> list[Run]:
    return [Run(_cases(v, seed + i, prefix="v"), _cases(v, seed + 100 + i, prefix="t"), phase,
                selected=selected_first and i == 0) for i, v in enumerate(levels)]


def test_run_variance_pools_the_unselected_runs_only() -> None:
    cells = {"a": _runs([0.9, 0.6, 0.7, 0.65], 1), "b": _runs([0.5, 0.55, 0.45], 20), "c": _runs([0.6], 40)}
    rv = run_variance(cells, "test", "score")
    values = {c: [run_value(r.test, "score") for r in rs if not r.selected] for c, rs in cells.items()}
    num = sum((len(v) - 1) * np.var(v, ddof=1) for v in values.values() if len(v) > 1)
    assert rv.df == 2 + 1 and rv.variance == pytest.approx(num / 3)  # the selected 0.9 run is left out


def test_a_bounded_interval_never_passes_its_bounds_and_matches_the_t_interval_when_narrow() -> None:
    lo, hi = bounded_interval(0.97, 0.05, 4)
    assert 0 < lo < 0.97 < hi < 1
    lo, hi = bounded_interval(0.5, 0.001, 10)
    half = scipy_stats.t.ppf(0.975, 10) * 0.001
    assert lo == pytest.approx(0.5 - half, rel=1e-3) and hi == pytest.approx(0.5 + half, rel=1e-3)
    lo, hi = bounded_interval(-0.95, 0.2, 6, bounds=(-1.0, 1.0))
    assert -1 < lo < -0.95 < hi < 1


def test_confirm_uses_only_confirmation_runs_and_adds_run_and_subject_variance() -> None:
    cells = {"best": _runs([0.99, 0.9, 0.9], 1) + _runs([0.72, 0.70, 0.74], 50, "confirm", False),
             "ref": _runs([0.6, 0.61, 0.62], 80, "confirm", False)}
    out = confirm(cells, "best", "ref", metrics=("score",))
    conf = {c: [r.test for r in rs if r.phase == "confirm"] for c, rs in cells.items()}
    boot = bootstrap_subjects(conf, "score")
    rv = run_variance(cells, "test", "score")
    d = boot.point["best"] - boot.point["ref"]
    v_run = rv.variance * (1 / 3 + 1 / 3)
    v_subject = boot.paired_variance("best", "ref")
    se = math.sqrt(v_run + v_subject)
    diff = out.difference["score"]
    assert diff["difference"] == pytest.approx(d) and diff["se"] == pytest.approx(se)
    assert diff["df"] == pytest.approx(satterthwaite([(v_run, rv.df), (v_subject, 39)]))
    assert diff["p"] == pytest.approx(2 * scipy_stats.t.sf(abs(d) / se, diff["df"]))
    assert out.estimates["best"]["score"].value == pytest.approx(np.mean([run_value(x, "score") for x in conf["best"]]))
    assert out.status == diff["status"] == "resolved"  # 0.72 vs 0.61 with 3 runs each
    fewer = confirm({"best": cells["best"][:4], "ref": cells["ref"][:2]}, "best", "ref", metrics=("score",))
    assert fewer.status == NEEDS_REPEATS


def test_select_excludes_a_cell_only_beyond_the_tukey_threshold_and_ignores_confirmation_runs() -> None:
    cells = {"a": _runs([0.95, 0.80, 0.81, 0.79], 1), "b": _runs([0.9, 0.79, 0.80, 0.81], 20),
             "c": _runs([0.9, 0.40, 0.42, 0.41], 40), "d": _runs([0.99], 60),
             "e": _runs([0.2, 0.99, 0.99, 0.99], 80, "confirm", False)}  # confirmations never feed the choice
    sel = select(cells)
    assert sel.chosen_from == "repeats" and sel.best in ("a", "b") and "e" not in sel.means
    assert set(sel.excluded) == {"c"} and sel.excluded["c"]["by"] in ("a", "b")
    assert set(sel.may_be_best) == {"a", "b"}  # d (no repeats) is neither chosen nor excluded
    assert sel.runs["d"] == 0 and "d" not in sel.excluded


def test_group_differences_need_three_runs_per_cell_and_claims_never_count_not_resolved_as_support() -> None:
    cells = {"x": _runs([0.7, 0.7], 1), "y": _runs([0.6, 0.6], 10)}
    diff = group_difference(cells, ["x"], ["y"], "dice")
    assert diff["fewest_runs"] == 1 < MIN_RUNS and diff["status"] == NEEDS_REPEATS
    assert claim_status(diff, "lower") == claim_status(diff, "non_inferior") == NEEDS_REPEATS
    resolved_lower = {"ci": (-0.2, -0.1), "status": "resolved"}
    unclear = {"ci": (-0.05, 0.03), "status": "not resolved"}
    assert claim_status(resolved_lower, "lower") == "supported"
    assert claim_status(unclear, "lower") == "not resolved"  # not resolved is never support
    assert claim_status(unclear, "non_inferior", margin=0.02) == "not resolved"
    assert claim_status({"ci": (-0.01, 0.03), "status": "not resolved"}, "non_inferior", 0.02) == "supported"
    assert claim_status({"ci": (-0.01, 0.03), "status": "not resolved"}, "lower", 0.02) == "contradicted"
