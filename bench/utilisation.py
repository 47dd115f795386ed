"""Slot utilisation of a finished study: sum of trial busy time / (wall time x concurrent slots).

    python -m bench.utilisation runs/full [--slots 2]

Busy time per trial is Tune's ``time_total_s`` (its wall time inside the worker); the study's wall time
runs from the first trial's start to the last trial's end in MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from bench.common import print_table, write_result


def utilisation(folder: Path, slots: int) -> dict:
    study = json.loads((folder / "study.json").read_text())
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.get_run(study["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100000)
    busy = sum(r.data.metrics.get("time_total_s", 0.0) for r in runs)
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time or r.info.start_time for r in runs) / 1000
    wall = end - start
    return {"study": str(folder), "trials": len(runs), "slots": slots, "wall_s": wall, "busy_s": busy,
            "utilisation": busy / (wall * slots) if wall > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--slots", type=int, default=2, help="concurrent trial slots (cores / cpus-per-trial)")
    args = p.parse_args(argv)
    row = utilisation(args.folder, args.slots)
    print_table([row], list(row))
    write_result("utilisation", "python -m bench.utilisation " + " ".join(argv or sys.argv[1:]), [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
