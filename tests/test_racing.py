"""The race's elimination rule (study/evidence/racing.py) on fixed per-case tables: no training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import stats as scipy_stats

from study.evidence.racing import (
    MAX_FAILED_REPEATS,
    MIN_SUBJECTS,
    Race,
    evaluate,
    paired_p,
    pooled_seed_sd,
    run_scores,
)
from study.evidence.stats import Cases, compare


def _rows(dice: np.ndarray, prob: np.ndarray, truth: np.ndarray) -> list[dict]:
    return [{"subject_id": f"s{i:03d}", "hemisphere": side, "dice": float(dice[i, j]),
             "probability": float(prob[i, j]), "truth": float(truth[i, j])}
            for i in range(len(dice)) for j, side in enumerate(("left", "right"))]


def _table(level: float, seed: int, n: int = 60, noise: float = 0.08) -> list[dict]:
    """A cell's per-case rows: Dice around ``level``, presence probabilities as good as ``level``."""
    rng = np.random.default_rng(seed)
    truth = (np.random.default_rng(99).random((n, 2)) < 0.5).astype(float)  # the same subjects for every cell
    dice = np.clip(level + rng.normal(0, noise, (n, 2)), 0, 1)
    prob = np.clip(np.where(truth > 0, level, 1 - level) + rng.normal(0, 0.2, (n, 2)), 0, 1)
    return _rows(dice, prob, truth)


def _drain(race: Race) -> list[str]:
    """Every cell the current round re-runs."""
    cells = []
    while (cell := race.suggest()) is not None:
        cells.append(cell)
    return cells


def test_paired_p_is_the_normal_test_of_the_bootstrap_standard_error() -> None:
    samples = np.random.default_rng(0).normal(0.05, 0.02, 4000)
    assert paired_p(0.05, samples) == pytest.approx(2 * scipy_stats.norm.sf(0.05 / samples.std(ddof=1)))
    assert paired_p(0.0, samples) == pytest.approx(1.0)
    assert paired_p(0.0, np.zeros(10)) == 1.0  # identical cells: nothing to tell apart
    assert np.isnan(paired_p(0.1, np.full(10, 0.1)))  # one subject: every resample alike, no test


def test_a_clearly_worse_cell_is_dropped_in_round_1_and_never_re_run() -> None:
    race = Race(max_trials=10, seed=1)
    level = {"good": 0.80, "close": 0.79, "bad": 0.35}
    race.start({"good": _table(0.80, 1), "close": _table(0.79, 2), "bad": _table(0.35, 3), "none": None})
    # after the search the variation between runs is unknown: the race ranks, it does not eliminate yet
    assert race.status == "racing" and race.rounds[0]["seed_sd"] is None
    assert race.eliminated == {"none": {"round": 0, "reason": "no finished search trial with per-case test results"}}
    assert race.best == "good" and race.alive == ["good", "close", "bad"]
    suggested = []
    while race.status == "racing":
        cells = _drain(race)
        assert cells, "a racing race has a round to run"
        for cell in cells:
            suggested.append((race.round, cell))
            race.record(cell, _table(level[cell], 10 + len(suggested)))
    assert race.eliminated["bad"]["round"] == 1
    assert race.eliminated["bad"]["holm_p"] < 0.05 < race.rounds[1]["evidence"]["close"]["holm_p"]
    assert 0 < race.rounds[1]["seed_sd"] < 0.05
    assert [r for r, c in suggested if c == "bad"] == [1]  # re-run in round 1, never after its elimination
    assert race.trials_used == len(suggested) <= 10


def test_two_equal_cells_are_never_separated_and_the_trial_budget_stops_the_race() -> None:
    race = Race(max_trials=7, seed=2)
    race.start({"a": _table(0.7, 5), "b": _table(0.7, 5)})
    while race.status == "racing":
        for cell in _drain(race):
            race.record(cell, _table(0.7, 40 + race.round))  # the same results for both cells, round after round
    assert race.status == "budget"
    assert race.alive == ["a", "b"] and not race.eliminated
    assert all(r["evidence"][c]["p"] == 1.0 for r in race.rounds[1:] for c in r["evidence"])
    # rounds 1-3 of two cells (6 trials); the 1 trial left cannot pay for a round of two
    assert race.trials_used == 6
    assert [r["round"] for r in race.rounds] == [0, 1, 2, 3]


def test_a_round_the_budget_cannot_pay_for_in_full_races_the_best_and_its_closest_contenders() -> None:
    race = Race(max_trials=2, seed=3)
    race.start({"top": _table(0.75, 1), "near": _table(0.745, 2), "far": _table(0.72, 3)})
    assert set(race.alive) == {"top", "near", "far"}
    first, second = race.suggest(), race.suggest()
    assert race.suggest() is None
    near_best = min((c for c in race.alive if c != race.best), key=lambda c: race.rounds[0]["evidence"][c]["difference"])
    assert [first, second] == [race.best, near_best]


def test_the_time_budget_stops_the_race_and_the_clock_survives_pickling() -> None:
    race = Race(max_minutes=1e-9)
    race.start({"a": _table(0.7, 1), "b": _table(0.7, 2)})
    assert race.status == "racing"  # no time has passed at the first evaluation
    restored = pickle.loads(pickle.dumps(race))
    for cell in (restored.suggest(), restored.suggest()):
        restored.record(cell, _table(0.7, 3))
    assert restored.status == "budget"
    assert restored.elapsed_s > 0


def test_a_failed_repeat_is_recorded_and_the_round_still_ends() -> None:
    race = Race(max_trials=2)
    race.start({"a": _table(0.7, 1), "b": _table(0.7, 2)})
    a, b = race.suggest(), race.suggest()
    race.record(a, _table(0.7, 3))
    race.record(b, None, "out of memory")
    assert race.failed == [{"cell": b, "round": 1, "reason": "out of memory"}]
    assert race.status == "budget" and len(race.rounds) == 2
    assert len(race.runs[b]) == 1 and len(race.runs[a]) == 2


def test_a_round_whose_repeats_all_fail_stops_the_race() -> None:
    race = Race(max_minutes=60)  # no limit on repeats: without the stop it would run for an hour
    race.start({"a": _table(0.7, 1), "b": _table(0.7, 2)})
    for cell in _drain(race):
        race.record(cell, None, "out of memory")
    assert race.status == "failed" and race.round == 1 and len(race.failed) == 2


def test_nothing_is_eliminated_with_too_few_test_subjects() -> None:
    n = MIN_SUBJECTS - 1
    race = Race(max_trials=2)
    race.start({"good": _table(0.9, 1, n=n), "bad": _table(0.2, 2, n=n)})
    for cell in _drain(race):
        race.record(cell, _table(0.9 if cell == "good" else 0.2, 3, n=n))
    assert race.rounds[1]["evidence"]["bad"]["p"] < 0.05  # clearly different, yet too few subjects to act on
    assert not race.eliminated and race.alive == ["good", "bad"]


def test_the_variation_between_runs_decides_an_elimination() -> None:
    runs = {"x": [Cases.from_rows(_table(0.75, 1))], "y": [Cases.from_rows(_table(0.70, 2))]}
    _, sure = evaluate(runs, seed=0, seed_sd=0.0)
    _, unsure = evaluate(runs, seed=0, seed_sd=0.1)  # runs that move by 0.1: a 0.05 difference means little
    _, unknown = evaluate(runs, seed=0)
    assert sure["y"]["eliminated"] and not unsure["y"]["eliminated"] and not unknown["y"]["eliminated"]
    assert unsure["y"]["ci"][0] < 0 < sure["y"]["ci"][0]
    assert np.isnan(unknown["y"]["p"])


def test_pooled_seed_sd_against_numpy() -> None:
    a = [Cases.from_rows(_table(level, s)) for s, level in enumerate((0.6, 0.7, 0.65))]
    b = [Cases.from_rows(_table(level, 10 + s)) for s, level in enumerate((0.5, 0.58))]
    va, vb = np.var(run_scores(a), ddof=1), np.var(run_scores(b), ddof=1)
    assert pooled_seed_sd({"a": a, "b": b, "c": a[:1]}) == pytest.approx(np.sqrt((2 * va + 1 * vb) / 3))
    assert pooled_seed_sd({"c": a[:1]}) is None


def test_a_cell_whose_repeats_keep_failing_leaves_the_race() -> None:
    race = Race(max_trials=20)
    race.start({"a": _table(0.7, 1), "b": _table(0.7, 2), "c": _table(0.7, 3)})
    for round_ in range(2):
        for cell in _drain(race):
            race.record(cell, None if cell == "c" else _table(0.7, 10 + round_), "out of memory")
    assert race.eliminated["c"] == {"round": 2, "reason": f"{MAX_FAILED_REPEATS} of its repeats failed"}
    assert "c" not in race.alive and "c" not in _drain(race)


def test_without_seed_resampling_every_run_is_in_every_resample() -> None:
    runs = {"a": [Cases.from_rows(_table(level, 7, noise=0.01)) for level in (0.5, 0.7, 0.6, 0.8)]}
    fixed = compare(runs, seed=0, resample_seeds=False)
    drawn = compare(runs, seed=0)
    width = {k: np.diff(c.cells["a"].ci["dice"])[0] for k, c in (("fixed", fixed), ("drawn", drawn))}
    assert width["fixed"] < 0.02 < width["drawn"]  # the runs' spread (0.5-0.8) counts only when drawn
    assert fixed.cells["a"].estimate == drawn.cells["a"].estimate


def test_evaluate_agrees_with_the_reports_statistics() -> None:
    runs = {c: [Cases.from_rows(_table(level, s))] for c, level, s in (("x", 0.8, 1), ("y", 0.6, 2))}
    best, evidence = evaluate(runs, seed=0, seed_sd=0.0)
    assert best == "x"
    e = evidence["y"]
    for lo, hi in (e["ci"], e["subjects_ci"]):  # the normal interval and the bootstrap's percentile one
        assert 0 < lo < e["difference"] < hi
    assert e["ci"] == pytest.approx(e["subjects_ci"], abs=0.01)  # with no variation between runs they agree
    assert e["eliminated"] and e["holm_p"] == e["p"]  # one comparison: Holm changes nothing


def test_a_searcher_state_saved_before_racing_existed_restores_without_a_race(tmp_path) -> None:
    from study.run.searcher import StudySearcher, _State

    state = _State(pretrain_pending=["reconstruction__segresnet"])
    for name in ("race", "best_rows"):  # what an earlier version's pickled state lacks
        del state.__dict__[name]
    path = tmp_path / "searcher.pkl"
    path.write_bytes(pickle.dumps(state))
    searcher = StudySearcher.__new__(StudySearcher)
    searcher.restore(str(path))
    assert searcher.state.race is None and searcher.state.best_rows == {}
    assert searcher.state.pretrain_pending == ["reconstruction__segresnet"]
