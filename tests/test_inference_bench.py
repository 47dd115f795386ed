"""bench/inference.py in small and seeded form, and the run-level inference (study/evidence/inference.py)
against independent computations on small fixed tables.

The pipeline checks run the bench's own functions (the real search -> race -> select -> confirm -> claims path
on synthetic tables with known truth) at small subject counts; the unit checks recompute each evidence function's
figure here from its definition (scipy's studentized range, a Monte Carlo of the range of normals, numpy's pooled
variance, the normal power formula)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bench import inference as bench
from study.evidence import inference
from study.evidence.inference import MIN_RUNS, Run
from study.evidence.stats import Cases

SMALL = bench.Components(case_sd=0.1, val_subjects=30, test_subjects=30)


@pytest.fixture(scope="module")
def model() -> bench.Model:
    return bench.calibrate(SMALL)


@pytest.fixture(scope="module")
def truth(model) -> dict:
    return bench.true_means(model, [0.0, 0.1], runs=8000)


CONTRASTS = (bench.Contrast("c01-c02 lower than c03-c04", (1, 2), (3, 4), "lower"),)


@pytest.fixture(scope="module")
def null_races(model, truth) -> tuple[bench.Scenario, list[dict], list[dict]]:
    scenario = bench.Scenario("null5", 5, design="race", budget=15, contrasts=CONTRASTS)
    qualities = {c: 0.0 for c in scenario.names()}
    outcomes, rows, _ = bench.run_scenario(model, scenario, qualities, truth, bench.Settings(), reps=100, seed=3)
    return scenario, outcomes, rows


# -- the bench's pipeline, small and seeded ------------------------------------------------------------------------
def test_calibration_reaches_its_targets(model) -> None:
    assert model.case_sd == SMALL.case_sd  # given, not calibrated
    assert model.achieved["run_sd"] == pytest.approx(SMALL.run_sd, abs=1e-3)
    assert 0 < model.shift_sd < SMALL.run_sd


def test_null_races_keep_their_error_rates(null_races) -> None:
    _, outcomes, rows = null_races
    assert all(o["race_entrants"] == 5 and o["race_looks"] == 1 and o["race_trials"] == 15 for o in outcomes)
    rate = {r["figure"]: r["value"] for r in rows}
    assert rate["race: false elimination (family-wise)"] <= 0.10
    assert rate["select(): a cell excluded falsely"] <= 0.10
    assert rate["confirm(): resolved"] <= 0.10
    assert rate["claim 'c01-c02 lower than c03-c04' supported (false claim)"] <= 0.10
    assert rate["coverage of the chosen cell's 95% CI"] >= 0.85
    assert abs(rate["bias of the chosen cell's score"]) <= 0.02
    # the confirmed cell is the race's best, and select() on validation names the same one
    assert all(o["chosen"] == o["race_best"] == o["select_best"] for o in outcomes)


def test_a_better_cell_is_found_and_confirmed_without_bias(model, truth) -> None:
    scenario = bench.Scenario("better5", 5, gaps={2: 0.1}, design="seeds", seeds=3)
    qualities = {c: 0.1 if c == "c02" else 0.0 for c in scenario.names()}
    outcomes, rows, _ = bench.run_scenario(model, scenario, qualities, truth, bench.Settings(), reps=100, seed=4)
    rate = {r["figure"]: r["value"] for r in rows}
    assert rate["select(): best is the true best"] >= 0.6  # chance would be 0.2
    assert rate["select(): a cell excluded falsely"] <= 0.10
    assert rate["coverage of the chosen cell's 95% CI"] >= 0.85
    assert abs(rate["bias of the chosen cell's score"]) <= 0.03
    for o in outcomes:  # the truth the coverage is judged by is the chosen cell's own
        assert o["true_mean"] == truth[qualities[o["chosen"]]]["mean"]


def test_the_bench_scores_as_the_report_does(model) -> None:
    rng = np.random.default_rng(0)
    world = bench.World(model, {"c00": 0.0}, rng)
    for _ in range(5):
        run = world.run("c00", "seeds")
        ours = bench.score_arrays(run.test.dice, run.test.probability[..., 1], run.test.truth)
        assert float(ours) == pytest.approx(inference.run_value(run.test, "score"), abs=1e-12)
        back = Cases.from_rows(bench.rows_of(run.val), bench.TASK)  # what the race reads
        assert back.subjects == run.val.subjects
        np.testing.assert_allclose(back.dice, run.val.dice)
        np.testing.assert_allclose(back.probability, run.val.probability)
        np.testing.assert_array_equal(back.truth, run.val.truth)


def test_the_true_mean_matches_the_real_statistic(model, truth) -> None:
    rng = np.random.default_rng(1)
    values = [inference.run_value(bench.World(model, {"c": 0.0}, rng).run("c", "x").test, "score")
              for _ in range(400)]
    assert np.mean(values) == pytest.approx(truth[0.0]["mean"], abs=4 * np.std(values) / math.sqrt(400))


def test_main_writes_its_record_and_refuses_a_report_without_components(tmp_path, capsys) -> None:
    argv = ["--reps", "2", "--scenarios", "null10,power_check", "--truth-runs", "2000", "--val-subjects", "30",
            "--test-subjects", "30", "--case-sd", "0.1", "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "inference.json").read_text())
    assert {"machine", "date", "commit", "command", "rows", "settings", "model", "truth"} <= set(doc)
    assert doc["command"] == "python -m bench.inference " + " ".join(argv)
    assert {r["result"] for r in doc["rows"]} <= {"PASS", "FAIL", "-"}
    assert all({"value", "se", "target"} <= set(r) for r in doc["rows"])
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"verdict": {}}))
    assert bench.main(["--from-report", str(report)]) == 2
    assert "no variance_components" in capsys.readouterr().err
    report.write_text(json.dumps({"variance_components": {"run_sd": 0.05, "val_subjects": 40, "test_subjects": 80,
                                                          "test_one_run_subject_sd": 0.012}}))
    components = bench.components_from_report(report)
    assert (components.run_sd, components.val_subjects, components.test_subjects) == (0.05, 40, 80)
    assert components.test_halfwidth == pytest.approx(1.959964 * 0.012, rel=1e-5)


# -- the evidence functions against independent computations -----------------------------------------------------
@pytest.mark.parametrize(("cells", "df"), [(3, 6), (10, 8), (4, 60)])
def test_tukey_critical_is_the_studentized_range_over_root_two(cells: int, df: int) -> None:
    expected = scipy_stats.studentized_range.ppf(0.95, cells, df) / math.sqrt(2)
    assert inference.tukey_critical(0.05, cells, df) == pytest.approx(expected, rel=1e-9)
    # and a Monte Carlo of the range of `cells` normals over an independent chi-square sd with `df`
    rng = np.random.default_rng(cells * 100 + df)
    z = rng.normal(size=(200_000, cells))
    s = np.sqrt(rng.chisquare(df, 200_000) / df)
    q = np.quantile((z.max(axis=1) - z.min(axis=1)) / s, 0.95)
    assert inference.tukey_critical(0.05, cells, df) == pytest.approx(q / math.sqrt(2), rel=0.02)
    assert inference.tukey_critical(0.05, 1, df) == math.inf


def _runs(model: bench.Model, levels: dict[str, int], seed: int = 0) -> dict[str, list[Run]]:
    rng = np.random.default_rng(seed)
    world = bench.World(model, dict.fromkeys(levels, 0.0), rng)
    out = {}
    for cell, k in levels.items():
        selected = world.run(cell, "search")
        selected.selected = True
        out[cell] = [selected, *(world.run(cell, "seeds") for _ in range(k))]
    return out


def test_run_variance_is_numpys_pooled_variance_without_the_selected_run(model) -> None:
    cells = _runs(model, {"a": 3, "b": 4, "c": 1})  # c: one unselected run, no variance
    values = {c: [float(bench.score_arrays(r.test.dice, r.test.probability[..., 1], r.test.truth))
                  for r in rs if not r.selected] for c, rs in cells.items()}
    pooled = [v for v in values.values() if len(v) > 1]
    dfs = [len(v) - 1 for v in pooled]
    expected = sum(d * np.var(v, ddof=1) for d, v in zip(dfs, pooled, strict=True)) / sum(dfs)
    got = inference.run_variance(cells, "test", "score")
    assert got.df == sum(dfs) == 5 and got.cells == 2
    assert got.variance == pytest.approx(expected, rel=1e-12)
    assert inference.run_variance({"a": cells["a"][:2]}, "test", "score") is None  # one unselected run


def _fixed_cases(dice: np.ndarray) -> Cases:
    """One run's cases with the given Dice and the same presence calls in every run (so the balanced accuracy is
    the same constant for every run and cell)."""
    n = dice.shape[0]
    truth = np.tile([[0.0, 1.0], [1.0, 0.0]], (n // 2, 1))
    prob = np.where(truth > 0, 0.8, 0.3)
    prob[0] = 1 - prob[0]  # one wrong call per class
    return Cases([f"s{i:02d}" for i in range(n)], dice, prob, truth, bench.TASK)


def test_select_excludes_by_hand_on_three_cells() -> None:
    n = 20
    base = np.linspace(0.5, 0.8, n)[:, None] * np.ones((1, 2))  # subjects differ; every cell moves them alike
    cells_offset = {"A": 0.0, "B": -0.04, "C": -0.25}  # Dice offsets: score offsets are half
    run_offsets = (0.02, 0.0, -0.02)
    cells = {c: [Run(_fixed_cases(base + off + r), None, "seeds") for r in run_offsets]
             for c, off in cells_offset.items()}
    selection = inference.select(cells, resamples=200, seed=0)
    # by hand: score = Dice / 2 + constant; between-run sd of the score 0.01, df = 3 x 2; the paired subject
    # variance is 0 (every subject moves alike), so se = s sqrt(2 / 3)
    s2 = np.var(np.array(run_offsets) / 2, ddof=1)
    se = math.sqrt(s2 * (2 / 3))
    critical = scipy_stats.studentized_range.ppf(0.95, 3, 6) / math.sqrt(2)
    means = {c: float(np.mean(base) / 2 + off / 2) for c, off in cells_offset.items()}
    excluded = {i for i in means if any(means[j] - means[i] > critical * se for j in means)}
    assert excluded == {"C"} and set(selection.excluded) == excluded
    assert selection.best == "A" and selection.may_be_best == ["A", "B"]
    why = selection.excluded["C"]
    assert why["by"] == "A"  # the cell that beats it by the most
    assert why["difference"] == pytest.approx(0.125, abs=1e-9)
    assert why["threshold"] == pytest.approx(critical * se, rel=1e-6)
    assert selection.df == 6 and selection.run_sd == pytest.approx(math.sqrt(s2), rel=1e-9)
    assert selection.critical == pytest.approx(critical, rel=1e-9)


def test_rank_intervals_are_points_when_the_ranks_are_certain() -> None:
    n = 20
    base = np.linspace(0.5, 0.8, n)[:, None] * np.ones((1, 2))
    offsets = {"w": 0.0, "x": -0.1, "y": -0.2, "z": -0.3}
    cells = {c: [Run(None, _fixed_cases(base + off + r), "seeds") for r in (0.001, 0.0, -0.001)]
             for c, off in offsets.items()}
    ranks = inference.rank_intervals(cells, resamples=200, seed=0)
    for rank, cell in enumerate(offsets, start=1):
        assert ranks["cells"][cell]["rank"] == rank
        assert ranks["cells"][cell]["ci"] == [rank, rank]
        assert ranks["cells"][cell]["frequency"] == {rank: 1.0}
    assert ranks["kendall_tau"] == {"median": 1.0, "ci": [1.0, 1.0]}


@pytest.mark.parametrize(("difference", "run_sd", "subject_var"), [(0.05, 0.065, 2e-5), (0.1, 0.065, 1e-4),
                                                                     (-0.03, 0.02, 1e-5), (0.2, 0.01, 0.0)])
def test_runs_to_resolve_is_the_smallest_k_with_the_normal_power(difference, run_sd, subject_var) -> None:
    z = scipy_stats.norm.ppf(0.975)

    def power(k: int) -> float:  # the normal power of the two-sided test (the far tail left out, as there)
        return scipy_stats.norm.cdf(abs(difference) / math.sqrt(2 * run_sd**2 / k + subject_var) - z)

    expected = next(k for k in range(MIN_RUNS, 10_000) if power(k) >= 0.8 - 1e-12)
    assert inference.runs_to_resolve(difference, run_sd**2, subject_var) == expected


def test_runs_to_resolve_says_none_when_runs_cannot_reach_it() -> None:
    z = scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)
    too_noisy = (0.05 / z) ** 2 * 1.01  # the subjects' variance alone is above the target
    assert inference.runs_to_resolve(0.05, 0.004, too_noisy) is None
    assert inference.runs_to_resolve(0.0, 0.004, 0.0) is None
