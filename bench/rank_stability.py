"""Rank stability: the same study twice with different ``--seed`` (another cohort draw, other trial seeds,
other Optuna samples), then, for the test score, Dice and AUC, Spearman's rank correlation of the cells
between the two runs, and whether each run's best cell is inside the other run's set of cells that cannot
be told apart from the best. A ranking that does not survive a change of seed is not an answer.

    python -m bench.rank_stability [--grid full] [--budget laptop] [--seeds 0,1] [--work runs/rank_stability]
    python -m bench.rank_stability --analyse-only --work runs/rank_stability   # two finished studies

A seed whose folder (``<work>/seed<N>``) already holds a finished study (``report/report.json``) is not run
again, so an interrupted measurement resumes with the study it lacks.

Each study is the real launcher (``python -m study.launch``) as ``make study`` runs it; its wall time is
recorded. Results: ``bench/results/rank_stability.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from bench.common import may_be_best, write_result

METRICS = ("score", "dice", "auc")


def run_study(grid: str, budget: str, seed: int, folder: Path) -> float:
    """Run one study to completion; returns its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "study.launch", "--grid", grid, "--budget", budget, "--seed",
                           str(seed), "--output", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the study with --seed {seed} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def estimates(folder: Path) -> tuple[dict[str, dict[str, float]], dict]:
    """cell -> {metric: estimate, "half_width": of the test score's interval} and the verdict, from a
    study's report.json."""
    data = json.loads((folder / "report" / "report.json").read_text())
    cells = {c["cell"]: {**c["statistics"]["estimate"],
                         "half_width": (c["statistics"]["ci"]["score"][1] - c["statistics"]["ci"]["score"][0]) / 2}
             for c in data["cells"] if c.get("statistics")}
    return cells, data["verdict"]


def compare_runs(a: Path, b: Path) -> dict:
    """Spearman's rho per metric over the cells both studies have, and the cross-membership of the best cells."""
    cells_a, verdict_a = estimates(a)
    cells_b, verdict_b = estimates(b)
    common = sorted(set(cells_a) & set(cells_b))
    out = {"cells": len(common), "best_a": verdict_a["best"], "best_b": verdict_b["best"],
           "best_a_inside_b_tied_set": verdict_a["best"] in may_be_best(verdict_b),
           "best_b_inside_a_tied_set": verdict_b["best"] in may_be_best(verdict_a),
           "tied_set_size_a": len(may_be_best(verdict_a)),
           "tied_set_size_b": len(may_be_best(verdict_b))}
    for metric in METRICS:
        x = [cells_a[c][metric] for c in common]
        y = [cells_b[c][metric] for c in common]
        rho = scipy_stats.spearmanr(x, y, nan_policy="omit")
        out[f"spearman_{metric}"] = float(rho.statistic)
    # where the disagreement comes from: the test score of a cell moves between the runs by more than its
    # interval (over test subjects) says
    a = np.array([cells_a[c]["score"] for c in common])
    b = np.array([cells_b[c]["score"] for c in common])
    top = np.argsort(-a)[:20]
    learned = np.maximum(a, b) > 0.5
    out.update(pearson_score=float(scipy_stats.pearsonr(a, b).statistic),
               spearman_score_top20_of_a=float(scipy_stats.spearmanr(a[top], b[top]).statistic),
               cells_near_chance_in_both=int(np.sum((a < 0.35) & (b < 0.35))),
               rms_score_change=float(np.sqrt(np.mean((a - b) ** 2))),
               rms_score_change_cells_that_learn=float(np.sqrt(np.mean((a - b)[learned] ** 2))),
               cells_that_learn=int(learned.sum()),
               median_ci_half_width_a=float(np.median([cells_a[c]["half_width"] for c in common])))
    # A classical test-retest reading: one run's noise variance s2 (half the mean squared change), the cells'
    # true spread (observed variance less s2), and the Pearson correlation to expect between two studies
    # whose cells each average k runs.
    s2 = float(np.mean((a - b) ** 2) / 2)
    spread = float((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2) - s2
    out["run_sd_all_cells"] = s2**0.5
    for k in (1, 2, 3):
        out[f"expected_pearson_with_{k}_runs_per_cell"] = spread / (spread + s2 / k)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rank_stability", description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="full")
    p.add_argument("--budget", default="laptop")
    p.add_argument("--seeds", default="0,1", help="two study seeds")
    p.add_argument("--work", default="runs/rank_stability", help="folder for the two studies")
    p.add_argument("--analyse-only", action="store_true", help="compare two finished studies in --work")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != 2:
        p.error("--seeds takes two seeds, e.g. 0,1")
    work = Path(args.work)
    folders = [work / f"seed{s}" for s in seeds]
    walls = {}
    if not args.analyse_only:
        for seed, folder in zip(seeds, folders, strict=True):
            if (folder / "report" / "report.json").is_file():
                print(f"--seed {seed}: {folder} already holds a finished study; it is reused", flush=True)
                continue
            walls[f"wall_s_seed{seed}"] = run_study(args.grid, args.budget, seed, folder)
            print(f"--seed {seed}: {walls[f'wall_s_seed{seed}']:.0f} s", flush=True)
    row = {"grid": args.grid, "budget": args.budget, "seeds": args.seeds, **compare_runs(*folders), **walls}
    for key, value in row.items():  # one per line: the row is too wide for a table
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    write_result("rank_stability", "python -m bench.rank_stability " + " ".join(argv or sys.argv[1:]), [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
