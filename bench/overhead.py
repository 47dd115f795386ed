"""Orchestration overhead: N fine-tuning trials run by the study (Ray Tune + Optuna + MLflow) and the
same N configurations replayed by a bare Python loop calling the same Ray-free core.

    python -m bench.overhead [--trials 6] [--budget laptop] [--strategy full]

The study runs one searched cell (``none`` x strategy: Optuna suggests, no early stopping) one trial at
a time (``--max-concurrent 1``, one torch thread per trial); the loop then replays the exact configs
the study ran (read from Tune's experiment state), one torch thread too. Per trial:

- ``overhead_s`` = (study span - loop total) / N, where the span runs from the first trial's start to
  the last trial's end (MLflow run times); ``overhead_fraction`` = overhead_s / the loop's mean trial time;
- split into ``in_trial_s`` (Tune's ``time_total_s`` - the loop's time: reporting and the per-epoch
  checkpoint) and ``between_trials_s`` (scheduling, searcher, MLflow writes, actor reuse);
- ``startup_s``: the launcher's wall time outside the span (imports, Ray start, cohort, report), paid
  once per study, not per trial.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table, write_result


def run_study(work: Path, budget: str, strategy: str, trials: int) -> tuple[Path, float]:
    grid = work / "grid.yaml"
    grid.write_text(f"name: overhead\nbase: {budget}\ncells:\n"
                    f"  - {{pretrain: none, strategy: {strategy}, num_samples: {trials}}}\n")
    out = work / "study"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "study.launch", "--grid", str(grid), "--output", str(out),
                           "--max-concurrent", "1", "--cpus-per-trial", "1", "--early-stopping", "none"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the study failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out, wall


def study_trials(out: Path) -> tuple[list[dict], list[float], float]:
    """(configs in trial order, Tune's time_total_s per trial, span first start -> last end in s)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    runs.sort(key=lambda r: int(r.data.tags["trial_number"]))
    from ray.tune import ExperimentAnalysis

    by_id = {t.trial_id: t.config for t in ExperimentAnalysis(str(out / "tune" / "study")).trials}
    configs = [by_id[r.data.tags["trial_id"]] for r in runs]
    busy = [r.data.metrics["time_total_s"] for r in runs]
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return configs, busy, span


def run_loop(configs: list[dict], work: Path) -> list[float]:
    import torch

    from trainables.trials import run_trial

    torch.set_num_threads(1)
    times = []
    for i, cfg in enumerate(configs):
        cfg = {**cfg, "output_dir": str(work / "loop" / str(i))}
        start = time.perf_counter()
        run_trial(cfg, lambda metrics, state: None)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--budget", default="laptop")
    p.add_argument("--strategy", default="full")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    out, wall = run_study(work, args.budget, args.strategy, args.trials)
    configs, busy, span = study_trials(out)
    loop = run_loop(configs, work)
    n = len(configs)
    mean_loop = sum(loop) / n
    overhead = (span - sum(loop)) / n
    row = {"budget": args.budget, "strategy": args.strategy, "trials": n, "loop_trial_s": mean_loop,
           "study_trial_s": span / n, "overhead_s": overhead, "overhead_fraction": overhead / mean_loop,
           "in_trial_s": (sum(busy) - sum(loop)) / n, "between_trials_s": (span - sum(busy)) / n,
           "startup_s": wall - span, "study_wall_s": wall}
    print_table([row], list(row))
    path = write_result("overhead", "python -m bench.overhead " + " ".join(argv or sys.argv[1:]), [row],
                        {"loop_times_s": loop, "study_time_total_s": busy})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
