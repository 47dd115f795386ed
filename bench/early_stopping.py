"""Early stopping: compute spent and best selection score found with the study's per-cell ASHA vs the
same trials without early stopping (same configurations, same seeds).

    python -m bench.early_stopping [--budget laptop] [--per-cell 6] [--strategies full,linear,lora,bitfit]

Each cell's configurations are drawn in advance from its real search space by a seeded Optuna random
sampler (``bench.common.fixed_trials``), so both runs train exactly the same trials; the study's
trainable runs them on a local Ray Tune with the study's scheduler (``--early-stopping asha``) or
FIFO (``none``). Compute = the sum of Tune's ``time_total_s``; epochs = the epochs actually trained.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fixed_trials, print_table, write_result


def run(configs: list[dict], plan, mode: str, work: Path) -> dict:
    from ray import tune
    from ray.tune.search import Searcher

    from study.launch import make_scheduler
    from study.run.resources import trial_resources
    from trainables.tune_trainable import study_trainable

    class FixedConfigs(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=None, mode=None)
            self.left = list(configs)

        def suggest(self, trial_id: str):
            return self.left.pop(0) if self.left else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

    start = time.perf_counter()
    results = tune.Tuner(
        tune.with_resources(study_trainable, trial_resources(1.0, 0.0, {}, {})),
        tune_config=tune.TuneConfig(search_alg=FixedConfigs(), scheduler=make_scheduler(plan, mode),
                                    num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(work / "tune"), name=mode, verbose=0),
    ).fit()
    wall = time.perf_counter() - start
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"cell": r.config["cell"]["id"], "seed": r.config["train"]["seed"],
                       "params": {**r.config["train"], **r.config["strategy_params"]},
                       "epochs": m.get("epoch", 0), "score": m.get("score"), "time_total_s": m.get("time_total_s", 0.0)})
    full = [t for t in trials if t["epochs"] == plan.finetune_epochs and t["score"] is not None]
    best: dict[str, dict] = {}
    for t in full:
        if t["cell"] not in best or t["score"] > best[t["cell"]]["score"]:
            best[t["cell"]] = t
    return {"mode": mode, "trials": len(trials), "errors": results.num_errors,
            "stopped_early": sum(t["epochs"] < plan.finetune_epochs for t in trials),
            "epochs_trained": sum(t["epochs"] for t in trials), "compute_s": sum(t["time_total_s"] for t in trials),
            "wall_s": wall, "best_score": max((t["score"] for t in full), default=None),
            "best_per_cell": {c: {"score": t["score"], "seed": t["seed"]} for c, t in sorted(best.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="laptop")
    p.add_argument("--per-cell", type=int, default=6)
    p.add_argument("--strategies", default="full,linear,lora,bitfit")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = p.parse_args(argv)
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-es-"))
    plan, _, configs = fixed_trials(work, args.budget, [("none", s) for s in args.strategies.split(",")],
                                    args.per_cell)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [run(configs, plan, mode, work) for mode in ("none", "asha")]
    ray.shutdown()
    none, asha = rows
    same = sum(asha["best_per_cell"].get(c, {}).get("seed") == v["seed"] for c, v in none["best_per_cell"].items())
    for r in rows:
        r["compute_vs_no_es"] = r["compute_s"] / none["compute_s"]
        r["same_best_trial_cells"] = f"{same}/{len(none['best_per_cell'])}" if r is asha else "-"
    cols = ["mode", "trials", "stopped_early", "epochs_trained", "compute_s", "compute_vs_no_es", "wall_s",
            "best_score", "same_best_trial_cells", "errors"]
    print_table(rows, cols)
    path = write_result("early_stopping", "python -m bench.early_stopping " + " ".join(argv or sys.argv[1:]), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
