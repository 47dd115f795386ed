"""Scheduling with the real local Ray: fractional GPU packing and per-cell ASHA early stopping."""

from __future__ import annotations

import pytest
import ray
from conftest import start_local_ray, trial_config
from light_trainables import barrier_sleeper, curve
from ray import tune

from study.run.resources import gpu_share, trial_resources
from study.run.scheduling import PerCellASHA
from trainables.errors import StudyInputError

pytestmark = pytest.mark.slow  # a real local Ray per module


@pytest.fixture(scope="module")
def ray_one_gpu():
    start_local_ray(num_cpus=2, num_gpus=1)
    yield
    ray.shutdown()


def _max_overlap(results) -> int:
    events = sorted([(r.metrics["start"], 1) for r in results] + [(r.metrics["end"], -1) for r in results])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _run(tmp_path, gpus: float, n: int, sleep: float, timeout: float = 180):
    barrier = tmp_path / f"barrier{gpus}"
    barrier.mkdir()
    trainable = tune.with_resources(barrier_sleeper, trial_resources(cpus=0.25, gpus=gpus, shares={}, custom={}))
    tuner = tune.Tuner(
        trainable,
        param_space={**trial_config(), "sleep": sleep, "barrier": str(barrier), "n": n, "timeout": timeout,
                     "i": tune.grid_search(list(range(n)))},
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"gpu{gpus}", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    return results


def test_four_quarter_gpu_trials_share_one_gpu(ray_one_gpu, tmp_path) -> None:
    assert _max_overlap(_run(tmp_path, 0.25, 4, 1.0)) == 4


def test_trials_over_half_a_gpu_never_share(ray_one_gpu, tmp_path) -> None:
    # the barrier cannot fill when the two never run together: each waits 3 s, then ends
    assert _max_overlap(_run(tmp_path, 0.6, 2, 0.5, timeout=3)) == 1


def test_measured_share_rounds_up_to_eighths() -> None:
    assert gpu_share(1000, 80000) == 0.125  # small trials: eight per GPU
    assert gpu_share(20000, 80000) == 0.375  # 20 GB x 1.3 headroom = 32.5% -> 3/8
    with pytest.raises(StudyInputError, match="lower the budget"):
        gpu_share(70000, 80000)


def test_resources_follow_the_cell_and_stage() -> None:
    per_trial = trial_resources(1.0, None, {"finetune:lora:segresnet": 0.125, "pretrain:segresnet": 0.5},
                                {"gpu_node": 0.01})
    ft = per_trial(trial_config(strategy="lora"))
    pre = per_trial(trial_config("pretrain"))
    assert ft == {"cpu": 1.0, "gpu": 0.125, "gpu_node": 0.01}
    assert pre == {"cpu": 1.0, "gpu": 0.5}


def test_asha_stops_worse_trials_within_their_cell_only(ray_one_gpu, tmp_path) -> None:
    cells = [{"id": "a", "quality": q} for q in (0.9, 0.8, 0.1, 0.05)] + [{"id": "b", "quality": 0.01}]
    scheduler = PerCellASHA(metric="score", mode="max", max_t=6, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(curve, {"cpu": 2}),  # one trial at a time, in the list's order
        param_space={**trial_config(epochs=6), "cell": tune.grid_search(cells)},
        tune_config=tune.TuneConfig(scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    epochs = {(r.config["cell"]["id"], r.config["cell"]["quality"]): r.metrics["epoch"] for r in results}
    assert epochs[("a", 0.9)] == 6
    assert epochs[("a", 0.1)] < 6 and epochs[("a", 0.05)] < 6  # clearly worse: stopped before the last epoch
    assert epochs[("b", 0.01)] == 6  # alone in its cell: never compared with cell a's trials
    assert len(scheduler.stopped) >= 2


def test_searcher_overlaps_pretraining_and_finetuning(tmp_path) -> None:
    """The real searcher with real per-cell Optuna studies: `none` cells are suggested while pre-training
    runs, and a method's cells as soon as its own checkpoint exists, while another method still pre-trains."""
    from study.plan.grid import Cell, StudyPlan
    from study.run.searcher import StudySearcher

    cells = [Cell(m, "full", "segresnet") for m in ("none", "reconstruction", "contrastive")]
    plan = StudyPlan(name="t", cells=cells, num_samples=3)
    searcher = StudySearcher(
        plan, make_pretrain=lambda m, b: {"stage": "pretrain", "method": m},
        make_finetune=lambda cell, ckpt, train, params, seed, phase: {"stage": "finetune", "cell": cell.id, "ckpt": ckpt},
        output=str(tmp_path), study_name="t",
    )
    first = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["stage"] for c in first] == ["pretrain", "pretrain", "finetune", "finetune"]
    assert {c["method"] for c in first[:2]} == {"reconstruction", "contrastive"}
    assert {c["cell"] for c in first[2:]} == {"none__full__segresnet"}
    recon = "t0" if first[0]["method"] == "reconstruction" else "t1"
    searcher.on_trial_complete(recon, {"checkpoint_path": "/ckpt/recon"})
    nxt = [searcher.suggest(f"u{i}") for i in range(4)]
    cells_now = [c["cell"] for c in nxt if c]
    # the other pre-training job is still running, yet reconstruction's cell is under way
    assert cells_now.count("reconstruction__full__segresnet") == 3
    assert all(c["ckpt"] == "/ckpt/recon" for c in nxt if c and c["cell"].startswith("reconstruction"))
    assert "contrastive__full__segresnet" not in cells_now


def test_searcher_keeps_its_studies_in_the_optuna_rdb_url(tmp_path) -> None:
    """--optuna-storage: the per-cell studies live in the given database, not in a journal file."""
    import optuna

    from study.plan.grid import Cell, StudyPlan
    from study.run.searcher import StudySearcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = StudyPlan(name="t", cells=[Cell("none", "full", "segresnet")], num_samples=2, finetune_epochs=1)
    searcher = StudySearcher(
        plan, make_pretrain=lambda m, b: {"stage": "pretrain"},
        make_finetune=lambda cell, ckpt, train, params, seed, phase: {"stage": "finetune", "train": train},
        output=str(tmp_path), study_name="t", storage_url=url,
    )
    for i, score in enumerate((0.25, 0.5)):
        assert searcher.suggest(f"t{i}")["stage"] == "finetune"
        searcher.on_trial_complete(f"t{i}", {"score": score, "epoch": 1})
    (summary,) = optuna.get_all_study_summaries(url)
    assert summary.study_name == "t/none__full__segresnet" and summary.n_trials == 2
    assert optuna.load_study(study_name=summary.study_name, storage=url).best_value == 0.5
    assert not (tmp_path / "optuna.journal").exists()
