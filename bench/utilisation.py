"""Slot utilisation of a study: sum of trial busy time / (wall time x concurrent slots).

    python -m bench.utilisation runs/full [--slots 2]        # a finished study
    python -m bench.utilisation --run [--budget laptop]      # run --grid full at the budget, timed, then measure

Busy time per trial is Tune's ``time_total_s`` (its wall time inside the worker); the study's wall time
runs from the first trial's start to the last trial's end in MLflow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from bench.common import print_table, write_result


def utilisation(folder: Path, slots: int) -> dict:
    study = json.loads((folder / "study.json").read_text())
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.get_run(study["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=50000)
    busy = sum(r.data.metrics.get("time_total_s", 0.0) for r in runs)
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time or r.info.start_time for r in runs) / 1000
    wall = end - start
    return {"study": str(folder), "trials": len(runs), "slots": slots, "wall_s": wall, "busy_s": busy,
            "utilisation": busy / (wall * slots) if wall > 0 else float("nan")}


def run_full(budget: str, work: Path) -> tuple[Path, float]:
    """``python -m study.launch --grid full --budget BUDGET`` in ``work``: (study folder, launcher wall s)."""
    out = work / "study"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "study.launch", "--grid", "full", "--budget", budget,
                           "--output", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the study failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?", help="a finished study's output folder")
    p.add_argument("--run", action="store_true", help="run --grid full at --budget first (in a temporary folder)")
    p.add_argument("--budget", default="laptop")
    p.add_argument("--slots", type=int, default=2, help="concurrent trial slots (cores / cpus-per-trial)")
    args = p.parse_args(argv)
    if args.run == (args.folder is not None):
        p.error("give a study folder or --run, not both")
    launcher_wall = None
    folder = args.folder
    if args.run:
        folder, launcher_wall = run_full(args.budget, Path(tempfile.mkdtemp(prefix="bench-full-")))
    row = utilisation(folder, args.slots)
    if launcher_wall is not None:
        row.update(budget=args.budget, launcher_wall_s=launcher_wall)
    print_table([row], list(row))
    write_result("utilisation", "python -m bench.utilisation " + " ".join(argv or sys.argv[1:]), [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
