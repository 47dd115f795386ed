"""Faults and resume with the real launcher: a failing trial is recorded and the study goes on; a study
interrupted with SIGINT and resumed with --resume finishes with one MLflow run per trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

GRID = """
name: resume
base: smoke
pretrain_epochs: 6
finetune_epochs: 2
cells:
  - {pretrain: none, strategy: full, num_samples: 2}
  - {pretrain: reconstruction, strategy: full, num_samples: 2}
  - {pretrain: reconstruction, strategy: linear, num_samples: 2}
  - pretrain: none
    strategy: top
    params: {strategy_params: {trainable_blocks: 99}}   # valid config, impossible on segresnet: fails in the trial
"""
TRIALS = 1 + 2 + 2 + 2 + 1  # one pre-training job (none needs none) + fine-tuning trials


def _launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "study.launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _child_runs(out: Path) -> list:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def test_interrupt_resume_and_failed_trial(tmp_path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "study"
    proc = _launch("--grid", str(grid), "--output", str(out), "--max-failures", "0")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and sum(ln.startswith("[") for ln in lines) < 3 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "".join(lines[-30:])
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=180)
    reader.join(timeout=10)
    assert rc == 130, "".join(lines[-30:])
    assert any("--resume" in ln for ln in lines)
    before = {r.data.tags["trial_id"]: r for r in _child_runs(out) if r.info.status == "FINISHED"}
    assert 2 <= len(before) < TRIALS  # (one of the first three to end may be the failing trial)

    resumed = subprocess.run([sys.executable, "-m", "study.launch", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    runs = _child_runs(out)
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == TRIALS  # exactly one run per trial
    for run in runs:  # runs created before and after the resume carry the same params
        assert "code_version" in run.data.params and "backbone.name" in run.data.params, run.info.run_name
        if run.data.tags["stage"] == "finetune":
            assert "train.seed" in run.data.params and "output_dir" in run.data.params, run.info.run_name
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for trial_id, run in before.items():  # finished before the interrupt: not run again
        if run.data.tags["stage"] == "finetune" and run.data.tags.get("outcome") == "completed":
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == [1, 2], trial_id
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["strategy"] == "top"
    assert "trainable_blocks" in failed[0].data.tags["failure_reason"]
    assert failed[0].data.tags["outcome"] == "failed"
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(done) == TRIALS - 1

    # fine-tuning did not wait for pre-training: Tune's second trial (suggested while the pre-training job,
    # its first, had not yet run) is a fine-tuning trial of a `none` cell. Start times are not compared,
    # as a slow worker start-up under load can delay a trial that was scheduled in time.
    order = sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))
    assert [r.data.tags["trial_number"] for r in order] == [str(i) for i in range(1, TRIALS + 1)]
    assert order[0].data.tags["stage"] == "pretrain"
    assert order[1].data.tags["stage"] == "finetune" and order[1].data.tags["pretrain"] == "none"

    # The resumed study continued the same per-cell Optuna studies: one study per searched cell in the
    # journal, whose finished trials are every completed trial of that cell, before and after the interrupt.
    import optuna

    from study.run.searcher import optuna_storage

    storage = optuna_storage(None, out)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    searched = ["none__full__segresnet", "reconstruction__full__segresnet", "reconstruction__linear__segresnet"]
    assert [n for n in names if not n.endswith("__top__segresnet")] == [f"resume/{c}" for c in searched]
    for cell in searched:
        study = optuna.load_study(study_name=f"resume/{cell}", storage=storage)
        told = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        completed = [r for r in runs if r.data.tags["cell"] == cell and r.info.status == "FINISHED"]
        assert len(told) == len(completed) == 2, cell


RACE_GRID = """
name: race
base: smoke
finetune_epochs: 6
splits: {pretrain: 2, train: 24, val: 12, test: 24}
race_trials: 9
confirm_runs: 2
cells:
  - pretrain: none
    strategy: top
    params: {train: {lr_encoder: 0.003, lr_decoder: 0.003, lr_heads: 0.003}}
  - pretrain: reconstruction
    strategy: top
    params: {train: {lr_encoder: 0.003, lr_decoder: 0.003, lr_heads: 0.003}}
  - pretrain: none               # a learning rate at which nothing is learned: clearly the worst cell
    strategy: decoder
    params: {train: {lr_encoder: 1.0e-9, lr_decoder: 1.0e-9, lr_heads: 1.0e-9}}
"""


def test_race_after_the_search_interrupted_mid_race_and_resumed(tmp_path) -> None:
    from study.evidence.racing import FINAL, read_race

    grid = tmp_path / "grid.yaml"
    grid.write_text(RACE_GRID)
    out = tmp_path / "study"
    # reconstruction x top's first race repeat fails, and so does its retry: it is recorded and left out
    failing = "reconstruction__top__segresnet"
    faults = {"STUDY_INJECT_FAULTS": json.dumps([{"cell": failing, "phase": "race", "kind": "raise", "times": 2}]),
              "STUDY_FAULT_DIR": str(tmp_path / "faults")}
    proc = _launch("--grid", str(grid), "--output", str(out), "--max-failures", "1", env=faults)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    race = None
    while time.time() < deadline and proc.poll() is None:  # a race under way, a repeat and the failure recorded
        race = read_race(out)  # written atomically: never half a file
        if race and race["status"] == "racing" and sum(race["repeats"].values()) >= 1 and race["failed"]:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the study ended before its race could be interrupted:\n" + "".join(lines[-30:])
    assert race and race["status"] == "racing", "".join(lines[-30:])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130, "".join(lines[-30:])
    reader.join(timeout=10)

    resumed = subprocess.run([sys.executable, "-m", "study.launch", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600, env={**os.environ, **faults})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    race = read_race(out)
    assert race["status"] in FINAL
    assert [(f["cell"], f["round"]) for f in race["failed"]] == [(failing, 1)]

    runs = _child_runs(out)
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), "a trial has two MLflow runs"
    everything = [r for r in runs if r.data.tags.get("phase") == "race"]
    assert len(everything) == race["trials_used"] >= 2
    failed = [r for r in everything if r.data.tags["outcome"] == "failed"]
    assert [(r.data.tags["cell"], r.data.tags["race_round"]) for r in failed] == [(failing, "1")]
    assert "fault injected" in failed[0].data.tags["failure_reason"]
    repeats = [r for r in everything if r not in failed]
    assert all(r.info.status == "FINISHED" and r.data.tags["outcome"] == "completed" for r in repeats)
    rounds = [(r.data.tags["cell"], int(r.data.tags["race_round"])) for r in everything]
    assert len(rounds) == len(set(rounds)), "a cell ran twice in one round"
    # after the search the race only ranks: round 1 re-runs every cell (9 repeats pay for 3 rounds of the 3); no
    # test before 3 repeats of each cell compared; no cell is re-run after its elimination
    assert not race["rounds"][0]["tested"] and not race["rounds"][0]["eliminated"]
    assert not any(r["tested"] for r in race["rounds"][1:3])
    assert {cell for cell, rnd in rounds if rnd == 1} == {"none__top__segresnet", "reconstruction__top__segresnet",
                                                          "none__decoder__segresnet"}
    for cell, e in race["eliminated"].items():
        assert e["round"] >= 3 and race["repeats"][cell] >= 3, (cell, e)
    for cell, rnd in rounds:
        assert cell not in race["eliminated"] or race["eliminated"][cell]["round"] >= rnd, (cell, rnd)

    # the report's race section matches MLflow
    report = json.loads((out / "report" / "report.json").read_text())
    section = report["race"]
    assert section["status"] == race["status"] and section["trials_used"] == len(everything)
    assert section["cells_whose_mlflow_repeats_differ"] == []
    completed = [(r.data.tags["cell"], int(r.data.tags["race_round"])) for r in repeats]
    for row in section["cells"]:
        assert row["repeats"] == row["repeats_in_mlflow"] == sum(c == row["cell"] for c, _ in completed), row
    assert section["failed"][0]["cell"] == failing and "fault injected" in section["failed"][0]["reason"]
    by_cell = {c["cell"]: c for c in report["cells"]}
    for cell in ("none__top__segresnet", failing):  # the statistics use the completed repeats, not the failed one
        confirmed = sum(r.data.tags.get("phase") == "confirm" and r.data.tags["cell"] == cell for r in runs)
        assert by_cell[cell]["statistics"]["runs"] == 1 + sum(c == cell for c, _ in completed) + confirmed
    html = (out / "report" / "report.html").read_text()
    assert '<section id="race"><h2>The race</h2>' in html
    assert all(f"eliminated after round {e['round']}" in html for e in race["eliminated"].values())
    # the choice is the race's (validation); the chosen cell and the reference get 2 fresh runs each, paired by seed
    confirmation = json.loads((out / "confirm.json").read_text())
    assert confirmation["finished"] and confirmation["best"] == race["best"] == report["selection"]["best"]
    confirm_runs = [r for r in runs if r.data.tags.get("phase") == "confirm"]
    assert {r.data.tags["cell"] for r in confirm_runs} == {race["best"]}  # the grid has no none__full: no reference
    assert len(confirm_runs) == confirmation["trials_used"] == 2 and confirmation["reference"] is None
    assert report["confirmation"]["runs"][race["best"]] == 2
    assert any("no reference cell" in t for t in report["verdict"]["text"])
