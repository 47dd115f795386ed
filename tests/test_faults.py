"""Faults survived, with the real launcher on a real local Ray and a real MLflow SQLite store.

One study, four cells, faults injected through ``STUDY_INJECT_FAULTS`` (``trainables/faults.py``):
a NaN loss and a SIGKILL of the trial's process that each fire once (the retry from the epoch checkpoint
succeeds), a CUDA-like out-of-memory error that fires in every attempt (the trial ends failed), and a
clean control cell; meanwhile the test locks the MLflow SQLite file for longer than the client retries.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

EPOCHS = 3
GRID = f"""
name: faults
base: smoke
finetune_epochs: {EPOCHS}
cells:
  - {{pretrain: none, strategy: full, num_samples: 1}}
  - {{pretrain: none, strategy: linear, num_samples: 1}}
  - {{pretrain: none, strategy: bitfit, num_samples: 1}}
  - {{pretrain: none, strategy: decoder, num_samples: 1}}
"""
FAULTS = [
    {"cell": "none__full__segresnet", "kind": "nan", "epoch": 2, "times": 1},
    {"cell": "none__linear__segresnet", "kind": "kill", "epoch": 2, "times": 1},
    {"cell": "none__bitfit__segresnet", "kind": "oom", "epoch": 1, "times": 2},
]
LOCK_S = 22  # longer than MLflow waits on a locked SQLite file (20 s), so writes are queued


def _child_runs(out: Path) -> list:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def _metric_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from metrics").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_study_survives_nan_kill_oom_and_a_locked_tracking_store(tmp_path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STUDY_INJECT_FAULTS": json.dumps(FAULTS),
           "STUDY_FAULT_DIR": str(tmp_path / "faults")}
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "study.launch", "--grid", str(grid), "--output", str(out),
                             "--max-failures", "1", "--checkpoint-every-s", "0"], stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # lock the tracking store as soon as trials report: the study must wait it out, not fail or lose writes
        db = out / "mlflow.db"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _metric_rows(db) == 0:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
        con = sqlite3.connect(db, timeout=30, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(LOCK_S)
        con.execute("ROLLBACK")
        con.close()
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "launcher.log").read_text()
    assert rc == 0, text[-3000:]
    assert "queued" in (out / "study.log").read_text()  # the queue, not only the client's retries, was used

    runs = _child_runs(out)
    by_cell = {r.data.tags["cell"]: r for r in runs}
    assert len(runs) == len(by_cell) == 4  # one run per trial: a retried trial is not logged twice
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")

    for cell, words in (("none__full__segresnet", "diverged"), ("none__linear__segresnet", "process died")):
        run = by_cell[cell]
        assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed", cell
        assert run.data.tags["retried_failures"] == "1", cell
        assert words in run.data.tags["last_failure_reason"], (
            cell, run.data.tags["last_failure_reason"])
        # the retry continued from the epoch-1 checkpoint: every epoch logged exactly once, none lost
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        assert steps == list(range(1, EPOCHS + 1)), (cell, steps)

    oom = by_cell["none__bitfit__segresnet"]
    assert oom.info.status == "FAILED" and oom.data.tags["outcome"] == "failed"
    assert "out of memory" in oom.data.tags["failure_reason"]

    control = by_cell["none__decoder__segresnet"]
    assert control.info.status == "FINISHED" and "retried_failures" not in control.data.tags
    steps = sorted(m.step for m in client.get_metric_history(control.info.run_id, "train_loss"))
    assert steps == list(range(1, EPOCHS + 1))
    assert "test_dice" in control.data.metrics

    # the report lists the failed trial with its reason
    report = (out / "report" / "report.md").read_text()
    assert "out of memory" in report


@pytest.mark.parametrize("value, message", [
    ("not json", "is not a JSON list of faults"),
    ('[{"kind": "meteor"}]', "unknown fault kind 'meteor'; valid kinds: nan, oom, raise, kill"),
    ('[{"kind": "nan", "epoch": 0}]', "'epoch' and 'times' must be integers >= 1"),
])
def test_malformed_fault_injection_is_refused_before_the_study(tmp_path, monkeypatch, capsys, value, message) -> None:
    from study.launch import main

    monkeypatch.setenv("STUDY_INJECT_FAULTS", value)
    monkeypatch.setenv("STUDY_FAULT_DIR", str(tmp_path))
    assert main(["--grid", "smoke", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()
