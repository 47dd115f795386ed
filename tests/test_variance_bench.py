"""bench/variance.py end to end in its tiny mode, on the CPU through the real trial code: the JSON holds every
cell and seed, and its spreads are what the per-run figures give (recomputed here with ``statistics``); the
bench's initialisation wrapper changes the network's seed and nothing else."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from bench import variance

CELLS = ["none__full__segresnet", "reconstruction__full__segresnet", "none__top__segresnet", "none__lora__segresnet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, list[str]]:
    folder = tmp_path_factory.mktemp("variance")
    argv = ["--tiny", "--seeds", "2", "--designs", "seed,init", "--repeats", "0", "--work", str(folder / "work"),
            "--results", str(folder)]
    assert variance.main(argv) == 0
    return json.loads((folder / "variance.json").read_text()), argv


def test_json_has_every_cell_seed_and_run(tiny_run) -> None:
    doc, argv = tiny_run
    assert doc["complete"] and doc["command"] == "python -m bench.variance " + " ".join(argv)
    assert {"machine", "date", "commit"} <= set(doc)
    seeds = doc["settings"]["seeds"]
    assert seeds == [70001, 70002]  # the race's round seeds at study seed 0, paired across cells
    assert [(r["cell"], r["design"]) for r in doc["rows"]] == [(c, d) for c in CELLS for d in ("seed", "init")]
    runs = doc["runs"]
    assert not [r for r in runs if "error" in r]
    # seed: (s, s) for both seeds; init: (s_1, s_0) more, its (s_0, s_0) shared with seed
    assert len(runs) == len(CELLS) * 3
    assert {(r["init_seed"], r["data_seed"]) for r in runs} == {(70001, 70001), (70002, 70002), (70002, 70001)}
    assert all(len(r["epochs"]) == doc["settings"]["finetune_epochs"] == 2 for r in runs)
    # the first search trial of the cell: every rate at the strategy's starting point
    from trainables.finetune import STRATEGIES

    for cell in CELLS:
        start = STRATEGIES.get(cell.split("__")[1]).lr_start
        assert doc["settings"]["cells"][cell]["train"]["lr_encoder"] == start
    assert "reconstruction__segresnet" in doc["settings"]["pretrain"]  # pre-trained once, for every seed


def test_spreads_are_recomputed_from_the_runs(tiny_run) -> None:
    doc, _ = tiny_run
    s0 = doc["settings"]["seeds"][0]
    for row in doc["rows"]:
        chosen = [r for r in doc["runs"] if r["cell"] == row["cell"] and (
            r["init_seed"] == r["data_seed"] if row["design"] == "seed" else r["data_seed"] == s0)]
        assert row["runs"] == len(chosen) == 2
        for metric in ("test_score", "test_dice", "test_balanced_accuracy"):
            values = [r[metric] for r in chosen]
            assert math.isfinite(row[f"{metric}_sd"])
            assert row[f"{metric}_sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert row[f"{metric}_mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            low, high = row[metric]["sd_ci"]
            assert low <= row[f"{metric}_sd"] <= high or row[f"{metric}_sd"] == 0
        values = [r["test_auc"] for r in chosen if r["test_auc"] is not None and math.isfinite(r["test_auc"])]
        if len(values) >= 2:
            assert row["test_auc_sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    for part in doc["decomposition"]:
        assert part["best_epoch_mean"] in (1.0, 1.5, 2.0) and 0 <= part["best_is_last_share"] <= 1


def test_init_wrapper_changes_only_the_network_seed(tiny_run) -> None:
    from trainables import trials

    _, argv = tiny_run
    prep = variance.prepare(variance.build_parser().parse_args(argv))  # reuses the work folder
    task = variance.trial_tasks(prep, [1, 2], ["seed"], 0, "cpu")[0]
    spec = trials.parse_trial(task["config"])

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in trials.initial_model(spec).parameters()]

    plain = weights()
    with variance.init_from(spec.train.seed):
        same = weights()
    with variance.init_from(spec.train.seed + 1):
        other = weights()
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain, other, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, weights(), strict=True))  # restored after the block


def test_resume_keeps_the_runs_and_runs_none_again(tiny_run) -> None:
    doc, argv = tiny_run
    assert variance.main([*argv, "--resume"]) == 0
    again = json.loads((Path(argv[argv.index("--results") + 1]) / "variance.json").read_text())
    assert again["runs"] == doc["runs"] and again["rows"] == doc["rows"]
    assert again["commands"] == [doc["command"], doc["command"] + " --resume"]
    assert again["machines"] == doc["machines"] and len(again["machines"]) == 1


def test_the_recipe_bench_reads_each_lever_from_its_runs(tiny_run, tmp_path) -> None:
    """bench.recipe: a lever's rows are the spreads of its own runs (recomputed here), its recipe reached every
    run's config, and a finished lever is reused, not run again."""
    from bench import recipe

    _, argv = tiny_run
    work = argv[argv.index("--work") + 1]
    args = ["--seeds", "2", "--workers", "1", "--tiny", "--work", work, "--folder", str(tmp_path / "levers"),
            "--results", str(tmp_path), "--lever", "baseline=", "--lever", "clipped=grad_clip_norm=0.5|cls_reads_seg=false"]
    assert recipe.main(args) == 0
    doc = json.loads((tmp_path / "recipe.json").read_text())
    assert [(r["lever"], r["cell"]) for r in doc["rows"]] == [(lever, c) for lever in ("baseline", "clipped")
                                                              for c in CELLS]
    for row in doc["rows"]:
        runs = json.loads((tmp_path / "levers" / row["lever"] / "variance.json").read_text())["runs"]
        mine = [r for r in runs if r["cell"] == row["cell"]]
        assert row["runs"] == len(mine) == 2
        assert row["score_sd"] == pytest.approx(statistics.stdev(r["test_score"] for r in mine))
        assert row["score_dice_auc_mean"] == pytest.approx(statistics.fmean(
            0.5 * r["test_dice"] + 0.5 * r["test_auc"] for r in mine))
    clipped = [r for r in doc["rows"] if r["lever"] == "clipped"][0]
    assert clipped["recipe"]["grad_clip_norm"] == 0.5 and clipped["backbone_options"] == {"cls_reads_seg": False}
    assert not clipped["head_reads_seg"]
    baseline = [r for r in doc["rows"] if r["lever"] == "baseline"][0]  # the runs' own recipe: today's defaults
    from trainables.backbones import BackboneConfig
    from trainables.engine import TrainConfig

    assert baseline["recipe"]["grad_clip_norm"] == TrainConfig().grad_clip_norm
    assert baseline["head_reads_seg"] is BackboneConfig().cls_reads_seg
    before = (tmp_path / "levers" / "clipped" / "variance.json").stat().st_mtime_ns
    assert recipe.main([*args, "--reuse"]) == 0
    assert (tmp_path / "levers" / "clipped" / "variance.json").stat().st_mtime_ns == before


def test_the_starting_point_is_the_rate_best_on_validation(tiny_run, tmp_path) -> None:
    """bench.starting_points: every (strategy, rate, seed) ran, the chosen rate is the one with the best mean
    validation score (recomputed here; the test score plays no part), and the chance score is that of the
    validation labels."""
    from bench import starting_points

    _, argv = tiny_run
    work = argv[argv.index("--work") + 1]
    assert starting_points.main(["--tiny", "--seeds", "2", "--lrs", "1e-3,1e-2", "--strategies", "full,linear",
                                 "--work", work, "--results", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "starting_points.json").read_text())
    runs = doc["runs"]
    assert sorted((r["strategy"], r["lr"]) for r in runs) == sorted(
        (s, lr) for s in ("full", "linear") for lr in (1e-3, 1e-2) for _ in range(2))
    for row in doc["rows"]:
        means = {lr: statistics.fmean(r["val_score_best"] for r in runs if r["strategy"] == row["strategy"]
                                      and r["lr"] == lr) for lr in (1e-3, 1e-2)}
        best = max(means, key=means.get)
        assert row["best_rate"] == best
        assert row["lr_start"] == (best if means[best] >= means[1e-3] + 0.05 else 1e-3)  # else the default stays
        assert row["learns"] == (means[best] >= doc["settings"]["chance_val_score"] + 0.05)
    assert 0.0 < doc["settings"]["chance_val_score"] < 1.0
    with pytest.raises(SystemExit, match="teacher"):
        starting_points.main(["--tiny", "--strategies", "distill", "--work", work, "--results", str(tmp_path)])
