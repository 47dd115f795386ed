"""Racing against uniform seed re-runs at equal compute.

The same study (grid, budget, seed) runs twice with the same number of extra trials after the search:

- **uniform**: ``--seeds K`` re-runs every cell's best configuration K times (``K x cells`` trials);
- **race**: ``--race-budget K*cells`` spends at most as many repeats on the cells that can still be the best
  (:mod:`study.evidence.racing`), and fewer when it resolves the best early.

For each, from the study's ``report/report.json``: the extra trials run, the size of the set that may be best
(Hsu's MCB on validation, ``verdict.may_be_best``; the older test-split set where a report has no selection), the
chosen cell and the width of its 95% interval of the test score,
and the wall time of the whole study. Each arm has its own pre-training cache, so that both pay for
pre-training and their wall times compare.

    python -m bench.racing [--grid bench/racing_grid.yaml] [--budget laptop] [--seed 0] [--extra 2] \\
        [--work runs/racing]
    python -m bench.racing --analyse-only --work runs/racing     # two finished studies

An arm whose folder (``<work>/uniform``, ``<work>/race``) already holds a finished study is not run again.
Results: ``bench/results/racing.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import may_be_best, print_table, write_result

HERE = Path(__file__).resolve().parent


def run_arm(grid: str, budget: str, seed: int, folder: Path, flags: list[str]) -> float | None:
    """Run one arm's study to completion (unless it has finished before); its wall time in seconds."""
    if (folder / "report" / "report.json").is_file():
        print(f"{folder} already holds a finished study; it is reused", flush=True)
        return None
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "study.launch", "--grid", grid, "--budget", budget, "--seed", str(seed),
           "--output", str(folder), "--pretrain-cache", str(folder.parent / f"{folder.name}_pretrain_cache"), *flags]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def measure(folder: Path) -> dict:
    """What one finished arm achieved, from its report."""
    report = json.loads((folder / "report" / "report.json").read_text())
    verdict = report["verdict"]
    best = next(c for c in report["cells"] if c["cell"] == verdict["best"])
    lo, hi = best["statistics"]["ci"]["score"]
    extra = sum(v for c in report["cells"] for k, v in c["counts"].items()
                if k.startswith(("seed re-runs", "race repeats")))
    race = report.get("race") or {}
    return {"extra_trials": extra, "tied_with_best": len(may_be_best(verdict)),
            "best": verdict["best"], "best_score": best["statistics"]["estimate"]["score"],
            "best_ci_width": hi - lo, "best_runs": best["statistics"]["runs"], "race_status": race.get("status", "-"),
            "cells_left_in_race": len([c for c in race.get("cells", []) if c["outcome"] != "eliminated"]) or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.racing", description=__doc__.split("\n")[0])
    p.add_argument("--grid", default=str(HERE / "racing_grid.yaml"))
    p.add_argument("--budget", default="laptop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", type=int, default=2, help="uniform seed re-runs per cell (the race gets as many trials)")
    p.add_argument("--work", default="runs/racing", help="folder for the two studies")
    p.add_argument("--analyse-only", action="store_true", help="compare two finished studies in --work")
    args = p.parse_args(argv)
    from study.plan.grid import select_plan

    cells = len(select_plan(args.grid, budget=args.budget).cells)
    work = Path(args.work)
    arms = {"uniform": ["--seeds", str(args.extra)], "race": ["--race-budget", str(args.extra * cells)]}
    rows = []
    for arm, flags in arms.items():
        wall = None if args.analyse_only else run_arm(args.grid, args.budget, args.seed, work / arm, flags)
        rows.append({"arm": arm, "flags": " ".join(flags), **measure(work / arm),
                     "wall_s": round(wall, 1) if wall is not None else None})
        print(f"{arm}: done", flush=True)
    print_table(rows, list(rows[0]))
    write_result("racing", "python -m bench.racing " + " ".join(argv or sys.argv[1:]), rows,
                 extra={"grid": args.grid, "budget": args.budget, "seed": args.seed, "cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
