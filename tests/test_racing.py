"""The race's elimination rule (study/evidence/racing.py) on fixed per-case tables: no training.

The race reads validation rows only, tests nothing before 3 repeats of each cell compared, and uses Tukey's
studentized-range threshold at a level spent over its tests."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy import stats as scipy_stats

from study.evidence.inference import MIN_RUNS, bootstrap_subjects, run_value
from study.evidence.racing import MAX_FAILED_REPEATS, MIN_SUBJECTS, Race, evaluate, spent_alpha
from study.evidence.stats import Cases


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


def _run(val: float, seed: int, test: float | None = None, n: int = 60) -> dict:
    """One run's rows on both splits (the test split's level defaults to the validation one's)."""
    return {"val": _table(val, seed, n), "test": _table(val if test is None else test, seed + 1000, n)}


def _drain(race: Race) -> list[str]:
    """Every cell the current round re-runs."""
    cells = []
    while (cell := race.suggest()) is not None:
        cells.append(cell)
    return cells


def _race_to_the_end(race: Race, level: dict, jitter: float = 0.01) -> list[tuple[int, str]]:
    suggested = []
    rng = np.random.default_rng(7)
    while race.status == "racing":
        cells = _drain(race)
        assert cells, "a racing race has a round to run"
        for cell in cells:
            suggested.append((race.round, cell))
            race.record(cell, _run(level[cell] + rng.normal(0, jitter), 10 + len(suggested)))
    return suggested


def test_a_clearly_worse_cell_is_dropped_after_three_repeats_and_never_re_run() -> None:
    race = Race(max_trials=12, seed=1)
    level = {"good": 0.80, "close": 0.79, "bad": 0.35}
    race.start({c: _run(v, i) for i, (c, v) in enumerate(level.items())} | {"none": None})
    assert race.status == "racing" and race.eliminated["none"]["round"] == 0
    assert race.best == "good" and race.alive == ["good", "close", "bad"]  # by the search runs' validation scores
    suggested = _race_to_the_end(race, level)
    assert race.eliminated["bad"]["round"] == MIN_RUNS  # no test before 3 repeats of each
    assert race.eliminated["bad"]["by"] in ("good", "close")
    assert not any(r["tested"] for r in race.rounds[:MIN_RUNS])
    assert [r for r, c in suggested if c == "bad"] == [1, 2, 3]  # never re-run after its elimination
    assert race.trials_used == len(suggested) <= 12


def test_the_race_decides_on_validation_not_on_test() -> None:
    race = Race(max_trials=6, seed=2)
    # "x" is worse on validation but far better on test: the race must not see the test rows
    level = {"x": 0.35, "y": 0.80}
    race.start({"x": _run(0.35, 1, test=0.95), "y": _run(0.80, 2, test=0.2)})
    rng = np.random.default_rng(3)
    while race.status == "racing":
        for cell in _drain(race):
            race.record(cell, _run(level[cell] + rng.normal(0, 0.01), int(rng.integers(1e6)),
                                   test=0.95 if cell == "x" else 0.2))
    assert race.status == "resolved" and race.best == "y" and "x" in race.eliminated


def test_two_equal_cells_are_never_separated_and_the_trial_budget_stops_the_race() -> None:
    race = Race(max_trials=7, seed=2)
    race.start({"a": _run(0.7, 5), "b": _run(0.7, 5)})
    while race.status == "racing":
        for cell in _drain(race):
            race.record(cell, _run(0.7, 40 + race.round))  # the same results for both cells, round after round
    assert race.status == "budget"
    assert race.alive == ["a", "b"] and not race.eliminated
    assert race.trials_used == 6  # rounds 1-3 of two cells; the 1 trial left cannot pay for a round of two
    assert [r["round"] for r in race.rounds] == [0, 1, 2, 3]


def test_the_budget_decides_how_many_cells_enter() -> None:
    race = Race(max_trials=6, seed=3)  # 6 repeats: 3 rounds of the 2 best on validation
    race.start({"top": _run(0.75, 1), "near": _run(0.745, 2), "far": _run(0.60, 3), "last": _run(0.5, 4)})
    assert race.alive == ["top", "near"] and set(race.not_raced) == {"far", "last"}
    assert [race.suggest(), race.suggest(), race.suggest()] == ["top", "near", None]


def test_the_time_budget_stops_the_race_and_the_clock_survives_pickling() -> None:
    race = Race(max_minutes=1e-9)
    race.start({"a": _run(0.7, 1), "b": _run(0.7, 2)})
    assert race.status == "racing"  # no time has passed at the start
    restored = pickle.loads(pickle.dumps(race))
    for cell in (restored.suggest(), restored.suggest()):
        restored.record(cell, _run(0.7, 3))
    assert restored.status == "budget"
    assert restored.elapsed_s > 0


def test_a_failed_repeat_is_recorded_and_the_round_still_ends() -> None:
    race = Race(max_trials=2)
    race.start({"a": _run(0.7, 1), "b": _run(0.7, 2)})
    a, b = race.suggest(), race.suggest()
    race.record(a, _run(0.7, 3))
    race.record(b, None, "out of memory")
    assert race.failed == [{"cell": b, "round": 1, "reason": "out of memory"}]
    assert race.status == "budget" and len(race.rounds) == 2
    assert len(race.runs[b]) == 1 and len(race.runs[a]) == 2


def test_a_round_whose_repeats_all_fail_stops_the_race() -> None:
    race = Race(max_minutes=60)  # no limit on repeats: without the stop it would run for an hour
    race.start({"a": _run(0.7, 1), "b": _run(0.7, 2)})
    for cell in _drain(race):
        race.record(cell, None, "out of memory")
    assert race.status == "failed" and race.round == 1 and len(race.failed) == 2


def test_nothing_is_eliminated_with_too_few_validation_subjects() -> None:
    n = MIN_SUBJECTS - 1
    race = Race(max_trials=8)
    race.start({"good": _run(0.9, 1, n=n), "bad": _run(0.2, 2, n=n)})
    rng = np.random.default_rng(0)
    while race.status == "racing":
        for cell in _drain(race):
            race.record(cell, _run((0.9 if cell == "good" else 0.2) + rng.normal(0, 0.01), 3 + race.round, n=n))
    assert not race.eliminated and race.alive == ["good", "bad"]


def test_a_cell_whose_repeats_keep_failing_leaves_the_race() -> None:
    race = Race(max_trials=20)
    race.start({"a": _run(0.7, 1), "b": _run(0.7, 2), "c": _run(0.7, 3)})
    for round_ in range(2):
        for cell in _drain(race):
            race.record(cell, None if cell == "c" else _run(0.7, 10 + round_), "out of memory")
    assert race.eliminated["c"] == {"round": 2, "reason": f"{MAX_FAILED_REPEATS} of its repeats failed"}
    assert "c" not in race.alive and "c" not in _drain(race)


def test_alpha_spent_over_the_tests_sums_to_alpha() -> None:
    assert sum(spent_alpha(0.05, t) for t in range(1, 100000)) == pytest.approx(0.05, rel=1e-4)
    assert spent_alpha(0.05, 1) == pytest.approx(6 * 0.05 / math.pi**2)


def test_two_cells_are_separated_exactly_when_the_t_test_with_run_and_subject_variance_rejects() -> None:
    """With two cells Tukey's threshold is the two-sided t quantile: an independent computation of the rule."""
    rng = np.random.default_rng(11)
    for trial in range(6):
        gap = 0.02 * trial
        repeats = {c: [Cases.from_rows(_table(0.7 + (gap if c == "x" else 0) + rng.normal(0, 0.03), 50 * trial + i))
                       for i in range(3)] for c in ("x", "y")}
        _, evidence, tested = evaluate(repeats, look=1, seed=0)
        assert tested
        scores = {c: [run_value(x, "score") for x in v] for c, v in repeats.items()}
        s2 = (np.var(scores["x"], ddof=1) + np.var(scores["y"], ddof=1)) / 2  # pooled, df 4
        boot = bootstrap_subjects(repeats, "score", seed=0)
        se = math.sqrt(s2 * (1 / 3 + 1 / 3) + boot.paired_variance("x", "y"))
        threshold = scipy_stats.t.ppf(1 - spent_alpha(0.05, 1) / 2, 4) * se
        d = np.mean(scores["x"]) - np.mean(scores["y"])
        worse = "y" if d > 0 else "x"
        assert evidence[worse]["eliminated"] == (abs(d) > threshold), (trial, d, threshold)
        assert evidence["x" if worse == "y" else "y"]["eliminated"] is False


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
