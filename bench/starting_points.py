"""Where each fine-tuning strategy's search starts: a short learning-rate sweep per strategy at the laptop budget
(issue 27, item 3).

Every registered strategy that needs no teacher runs as the cell ``method x strategy`` on SegResNet (``--method``,
default reconstruction: a frozen body is only worth tuning when it was pre-trained; a strategy that builds its own
network runs with ``none``), through the real trial code (``bench.variance``'s plan, data, trial factory and runner), with every learning rate of the
training loop (encoder, decoder, heads) set to each value of ``--lrs`` and the strategy's own parameters at its
first search trial's draw. Each (strategy, rate) runs ``--seeds`` seeds, paired across strategies and rates (the
race's round seeds). The rate chosen for a strategy is the one with the best mean **validation** score (the
selection split; the test score is reported beside it, never used to choose) where it beats the default 1e-3 by
``--learn-margin`` (else the default stays: rates within noise of each other say nothing), and becomes the strategy's
``lr_start`` (``register_strategy(..., lr_start=...)``): the rate of its cells' first search trial, the centre of
its searched ranges (``search_spaces.finetune.lr_ranges``). A strategy whose chosen mean validation score is not
above the split's chance score (an empty segmentation and a constant presence probability) by ``--learn-margin``
is marked as one that does not learn at this budget at any swept rate.

    python -m bench.starting_points [--lrs 1e-3,3e-3,1e-2] [--seeds 2] [--strategies all] [--recipe K=V,...]
        [--method reconstruction] [--backbone-options K=V,...] [--workers 2] [--work .variance/work] [--results DIR]
        [--tiny]

Writes ``starting_points.json`` (a row per strategy and rate, a row per strategy with the chosen rate, and every
run) to ``bench/results/`` or ``--results`` and prints both tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.common import print_table, write_result
from bench.variance import (
    BACKBONE,
    parse_head,
    parse_recipe,
    prepare,
    race_seeds,
    run_all,
)

DEFAULT_LR = 1e-3  # trainables.finetune.register_strategy's lr_start when a strategy declares none


def sweep_strategies(names: str) -> list[str]:
    """The strategies to sweep: ``all`` (every registered one that needs no teacher) or a comma list."""
    from trainables.finetune import STRATEGIES

    if names == "all":
        return [n for n in STRATEGIES.names() if not STRATEGIES.get(n).needs_teacher]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if STRATEGIES.get(name).needs_teacher:  # also the error listing valid names for an unknown one
            raise SystemExit(f"--strategies: {name} needs a teacher model; sweep the strategies that need none")
    return chosen


def sweep_method(method: str, strategy: str) -> str:
    """The pre-training method a strategy is swept on: ``method``, except ``none`` for a strategy that builds
    its own network (pre-training does not reach it)."""
    from trainables.finetune import STRATEGIES

    return "none" if STRATEGIES.get(strategy).from_scratch else method


def chance_score(prep) -> float:
    """The validation split's score of a model that learned nothing (:func:`trainables.metrics.chance_score`)."""
    import torch

    from trainables.data import load_split, make_loader
    from trainables.metrics import chance_score as score_of_nothing
    from trainables.trials import _data_config

    data = _data_config(prep.factory.data)
    batches = list(make_loader(load_split(data, "val"), 8, shuffle=False, seed=0))
    return score_of_nothing(torch.cat([b["label"] for b in batches]), torch.cat([b["cls"] for b in batches]),
                            data.spacing_mm, data.task_spec)


def sweep_tasks(prep, strategies: list[str], lrs: list[float], seeds: list[int], recipe: dict, head: dict,
                device: str) -> list[dict]:
    """One fine-tuning trial config per (strategy, rate, seed), in the order seed, rate, strategy (a sweep stopped
    early has every strategy at its first seed)."""
    from search_spaces.finetune import LR_FIELDS, first_trial

    tasks = []
    for seed in seeds:
        for lr in lrs:
            for cell in prep.cells:
                train = {**first_trial(cell.strategy), **dict.fromkeys(LR_FIELDS, lr), **recipe, "device": device}
                found = prep.pretrained.get(cell.pretrain_id)
                config = prep.factory.finetune(cell, found["checkpoint_path"] if found else None, train,
                                               prep.params[cell.id][1], seed, phase="search")
                config["backbone"].update(head)
                config["output_dir"] = str(prep.work / "models" / f"sweep__{cell.id}__lr{lr:g}__{seed}")
                tasks.append({"cell": cell.id, "init_seed": seed, "data_seed": seed, "replicate": 0,
                              "tags": {"strategy": cell.strategy, "lr": lr}, "config": config})
    return tasks


def summarise(runs: list[dict], strategies: list[str], lrs: list[float], chance: float, margin: float
              ) -> tuple[list[dict], list[dict]]:
    """Rows per (strategy, rate): runs, mean and SD of the validation and the test score; rows per strategy:
    the rate with the best mean validation score and whether it learns (mean validation score above chance by
    ``margin``)."""
    rows, chosen = [], []
    for strategy in strategies:
        mine = []
        for lr in lrs:
            done = [r for r in runs if r["strategy"] == strategy and r["lr"] == lr and "error" not in r]
            failed = sum(1 for r in runs if r["strategy"] == strategy and r["lr"] == lr and "error" in r)
            val = [r["val_score_best"] for r in done]
            test = [r["test_score"] for r in done]
            row = {"strategy": strategy, "lr": lr, "runs": len(done), "failed": failed,
                   "val_score_mean": statistics.fmean(val) if val else None,
                   "val_score_sd": statistics.stdev(val) if len(val) > 1 else None,
                   "test_score_mean": statistics.fmean(test) if test else None,
                   "test_score_sd": statistics.stdev(test) if len(test) > 1 else None,
                   "time_per_epoch_s": statistics.fmean(r["time_per_epoch_s"] for r in done) if done else None}
            rows.append(row)
            mine.append(row)
        scored = [r for r in mine if r["val_score_mean"] is not None]
        best = max(scored, key=lambda r: r["val_score_mean"]) if scored else None
        default = next((r for r in scored if r["lr"] == DEFAULT_LR), None)
        # the default rate stays unless the best is above it by the margin (two rates within noise of each
        # other, or a strategy that learns at none of them, say nothing about where to start)
        keep_default = best is not None and default is not None and (
            best["val_score_mean"] < default["val_score_mean"] + margin)
        start = default if keep_default else best
        chosen.append({"strategy": strategy, "best_rate": best["lr"] if best else None,
                       "lr_start": start["lr"] if start else None,
                       "val_score_mean": start["val_score_mean"] if start else None,
                       "test_score_mean": start["test_score_mean"] if start else None,
                       "at_1e-3_val": default["val_score_mean"] if default else None,
                       "learns": bool(best and best["val_score_mean"] >= chance + margin)})
    return rows, chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.starting_points", description=__doc__.splitlines()[0])
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma list of learning rates (every part at once)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per strategy and rate")
    p.add_argument("--strategies", default="all", help="'all' (those without a teacher) or a comma list")
    p.add_argument("--method", default="reconstruction", help="the pre-training method of the swept cells (a frozen "
                   "body is only worth tuning when it was pre-trained; a strategy that builds its own network: none)")
    p.add_argument("--recipe", default="", help="training-recipe fields for every run (bench.variance --recipe)")
    p.add_argument("--backbone-options", default="", help="head-only backbone fields (bench.variance)")
    p.add_argument("--learn-margin", type=float, default=0.05, help="above chance by this much counts as learning")
    p.add_argument("--budget", default="laptop", help="the study budget (study.plan.grid.BUDGETS)")
    p.add_argument("--study-seed", type=int, default=0, help="the study seed (cohort, Optuna, the race's seeds)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--workers", type=int, default=1, help="processes at once (1: in this process, in turn)")
    p.add_argument("--work", type=Path, default=Path(".variance/work"), help="folder for the cohort (reused)")
    p.add_argument("--results", type=Path, default=None, help="folder for starting_points.json")
    p.add_argument("--tiny", action="store_true", help="a few subjects, 16^3, 2 epochs: checks the path in seconds")
    p.add_argument("--summarise", type=Path, default=None, metavar="JSON", help="re-read the runs of an earlier "
                   "starting_points.json and write its tables again with this code's rule (no run); the file keeps "
                   "the command that measured it and records this one")
    return p


def resummarise(path: Path, command: str, results: Path | None) -> int:
    """``--summarise``: the tables of an earlier measurement's runs, with this code's rule."""
    import json

    doc = json.loads(path.read_text())
    s = doc["settings"]
    rows, chosen = summarise(doc["runs"], s["strategies"], s["lrs"], s["chance_val_score"], s["learn_margin"])
    extra = {k: v for k, v in doc.items() if k not in ("benchmark", "date", "commit", "command", "machine", "rows")}
    extra.update(by_rate=rows, measured={k: doc[k] for k in ("date", "commit", "command", "machine")})
    out = write_result("starting_points", command, chosen, extra, folder=results)
    print_table(chosen, ["strategy", "best_rate", "lr_start", "val_score_mean", "test_score_mean", "at_1e-3_val",
                         "learns"])
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    command = "python -m bench.starting_points " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.summarise is not None:
        return resummarise(args.summarise, command, args.results)
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--lrs {args.lrs!r}: a comma list of numbers, e.g. 1e-3,3e-3,1e-2") from None
    if not lrs or not all(0 < v < 1 for v in lrs):
        raise SystemExit(f"--lrs {args.lrs!r}: every rate in (0, 1)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    recipe, head = parse_recipe(args.recipe), parse_head(args.backbone_options)
    strategies = sweep_strategies(args.strategies)
    args.cells = ",".join(f"{sweep_method(args.method, s)}:{s}" for s in strategies)
    prep = prepare(args)
    chance = chance_score(prep)
    seeds = race_seeds(prep.plan, args.seeds)
    tasks = sweep_tasks(prep, strategies, lrs, seeds, recipe, head, args.device)
    settings = {"budget": prep.plan.name if args.tiny else args.budget, "tiny": args.tiny, "lrs": lrs,
                "seeds": seeds, "strategies": strategies, "recipe": recipe, "backbone_options": head,
                "backbone": BACKBONE, "width": prep.plan.width, "finetune_epochs": prep.plan.finetune_epochs,
                "splits": prep.plan.splits, "chance_val_score": chance, "learn_margin": args.learn_margin,
                "strategy_params": {c.strategy: prep.params[c.id][1] for c in prep.cells},
                "method": args.method}
    started = time.perf_counter()
    print(f"{len(tasks)} runs ({len(strategies)} strategies x {len(lrs)} rates x {len(seeds)} seeds) on "
          f"{args.device}; chance validation score {chance:.3f}", flush=True)

    def save(runs: list[dict], complete: bool) -> Path:
        rows, chosen = summarise(runs, strategies, lrs, chance, args.learn_margin)
        return write_result("starting_points", command, chosen, {
            "settings": settings, "complete": complete, "planned_runs": len(tasks),
            "wall_s": time.perf_counter() - started, "by_rate": rows, "runs": runs}, folder=args.results)

    def on_run(runs: list[dict]) -> None:
        last = runs[-1]
        what = last.get("error") or f"val {last['val_score_best']:.3f} test {last['test_score']:.3f}"
        print(f"[{len(runs)}/{len(tasks)} {time.perf_counter() - started:.0f} s] {last['strategy']} lr "
              f"{last['lr']:g} seed {last['data_seed']}: {what}", flush=True)
        save(runs, False)

    path = save(run_all(tasks, args.workers, on_run), True)
    import json

    doc = json.loads(path.read_text())
    print()
    print_table(doc["by_rate"], ["strategy", "lr", "runs", "failed", "val_score_mean", "val_score_sd",
                                 "test_score_mean", "test_score_sd", "time_per_epoch_s"])
    print()
    print_table(doc["rows"], ["strategy", "best_rate", "lr_start", "val_score_mean", "test_score_mean", "at_1e-3_val",
                              "learns"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
