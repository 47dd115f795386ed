"""Between-run variance: how much one cell's test score moves between training runs of the same configuration,
and where the movement comes from (issue 27, item 1).

Each cell (default: none x full, reconstruction x full, none x top, none x lora on SegResNet) runs the
fine-tuning trial its search starts with in a study: the config the launcher builds
(``study.launch.TrialFactory.finetune``) with its strategy's starting point (``search_spaces.finetune.first_trial``)
and the strategy parameters the cell's Optuna study draws for that first trial (the searcher's sampler, seed and
enqueued defaults), at the budget's input size, width, epochs, batch size and cohort (``study.plan.grid.BUDGETS``;
the data prepared by ``study.launch.prepare_data``). Every run goes through the real trial code
(``trainables.trials.run_trial``), Ray-free, in parallel processes. The K seeds are the race's round seeds
(``seed * 100003 + 70000 + k``) and are paired across cells. A cell with a pre-training method fine-tunes every
seed from one checkpoint (the pre-training trial runs once, through the same trial code, and is cached): the
figures are the variance of fine-tuning given one pre-trained body, not of pre-training.

Designs (``--designs``); a trial's ``train.seed`` sets the network's initialisation, the data order, the
augmentation and the training's other randomness (dropout) at once, so separating them takes one bench-side
wrapper of ``trainables.trials.initial_model`` that builds the network from another seed (the core is unchanged):

- ``seed``: the real trials: seed s_k for everything (the headline figures);
- ``init``: only the initialisation varies (network built from s_k; data order, augmentation, dropout from s_0);
- ``data``: only the data order, augmentation and dropout vary (network from s_0, the rest from s_k);
- ``repeat``: s_0 again ``--repeats`` times: what is left is the machine's nondeterminism (none on one CPU thread).

The best-epoch choice is read from each run's reported history: the trial keeps its epoch with the best
validation score, so the bench reports the validation score at that epoch and at the last one, how often the
best is the last, and the epoch-to-epoch spread of the validation score inside a run. (The test score of the
last epoch's weights is not reported by the trial, so the test side of that choice is not measured here.)

    python -m bench.variance [--seeds 8] [--cells none:full,reconstruction:full,none:top,none:lora]
        [--designs seed,init,data,repeat] [--repeats 2] [--device cpu|cuda] [--workers N] [--budget laptop]
        [--work .variance/work] [--results DIR] [--tiny] [--prepare-only] [--resume] [--commit SHA]

``--tiny`` (a few subjects, 16^3, 2 epochs) checks the whole path in seconds (``tests/test_variance_bench.py``).
``--prepare-only`` builds the work folder (cohort, pre-training checkpoints, the cells' first-trial parameters)
and stops: a GPU machine without Ray, nilearn or Optuna reuses that folder (``data.json``, ``first_trials.json``).
``--resume`` keeps the runs of an earlier or interrupted measurement with the same settings in ``--results`` and
runs the missing ones (each run records the machine it ran on). Writes ``variance.json`` (per cell and
design: mean, between-run SD with its 95% interval, per run: every figure) to ``bench/results/`` or ``--results``,
rewritten after each finished run, and prints the tables.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from bench.common import RESULTS, print_table, write_result

METRICS = ("test_score", "test_dice", "test_auc", "test_balanced_accuracy")
DEFAULT_CELLS = "none:full,reconstruction:full,none:top,none:lora"
DESIGNS = ("seed", "init", "data", "repeat")
BACKBONE = "segresnet"
RACE_SEED_OFFSET = 70000  # study.run.searcher: a race round's seed is seed * 100003 + 70000 + round
TINY_SPLITS = {"pretrain": 4, "train": 6, "val": 4, "test": 6}
FIRST_TRIALS = "first_trials.json"
DATA_FILE = "data.json"


# -- the plan, the data and the trial configs -----------------------------------------------------------------

def make_plan(budget: str, cells: list[tuple[str, str]], seed: int, tiny: bool):
    """The study plan of ``cells`` at ``budget`` (``tiny``: the smoke budget with a few more subjects)."""
    from study.plan.grid import select_plan

    plan = select_plan("full", budget="smoke" if tiny else budget, methods=sorted({m for m, _ in cells}),
                       strategies=sorted({s for _, s in cells}), backbones=[BACKBONE], seed=seed)
    if tiny:
        plan = replace(plan, splits=dict(TINY_SPLITS), finetune_epochs=2, pretrain_epochs=1)
    return plan


def first_trial_params(plan, cell) -> tuple[dict, dict]:
    """(train params, strategy params) of ``cell``'s first search trial, drawn as the study's searcher draws
    them (``study.run.searcher.StudySearcher.study`` and ``sample_finetune_params``): a TPE sampler seeded per
    cell, the training defaults enqueued, the strategy's own space sampled."""
    import optuna

    from search_spaces.finetune import first_trial, train_space
    from trainables.finetune import STRATEGIES

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cell_seed = (plan.seed * 1_000_003 + zlib.crc32(cell.id.encode())) % 2**31
    sampler = optuna.samplers.TPESampler(seed=cell_seed, n_startup_trials=max(2, plan.num_samples // 3))
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.enqueue_trial(first_trial(cell.strategy), skip_if_exists=True)
    trial = study.ask()
    return train_space(trial, cell.strategy), STRATEGIES.get(cell.strategy).space(trial)


def cell_params(plan, cells: list, work: Path) -> dict[str, tuple[dict, dict]]:
    """Each cell's first-trial parameters, cached in ``work/first_trials.json`` (Optuna only when missing)."""
    from trainables.finetune import STRATEGIES

    path = work / FIRST_TRIALS
    saved = json.loads(path.read_text()) if path.is_file() else {}
    # the key names the strategy's starting rate: a measured new lr_start draws the first trial anew
    keys = {cell.id: f"{cell.id}@seed{plan.seed}@lr{STRATEGIES.get(cell.strategy).lr_start:g}" for cell in cells}
    changed = False
    for cell in cells:
        if keys[cell.id] not in saved:
            saved[keys[cell.id]] = list(first_trial_params(plan, cell))
            changed = True
    if changed:
        path.write_text(json.dumps(saved, indent=2))
    return {cell.id: tuple(saved[keys[cell.id]]) for cell in cells}


def study_data(plan, work: Path) -> tuple[dict, str]:
    """The launcher's data for ``plan`` (``study.launch.prepare_data``: the embedded cohort generated in
    ``work/cohort``, validated and preprocessed) and its id; saved in ``work/data.json``, so that a machine without
    Ray (which the launcher's progress log needs) preprocesses the same cohort with the same settings."""
    from study.run.prepare import preprocess_cohort
    from trainables.data import read_manifest
    from trainables.trials import _data_config

    saved = work / DATA_FILE
    key = {"splits": plan.splits, "spacing_mm": plan.spacing_mm, "input_size": list(plan.input_size), "seed": plan.seed}
    try:
        from study.launch import prepare_data

        data, data_id = prepare_data(plan, work, None)
    except ImportError:  # no Ray here: the data an earlier --prepare-only saved
        doc = json.loads(saved.read_text()) if saved.is_file() else {}
        if doc.get("plan") != key:
            raise SystemExit(f"Ray is not installed here and {saved} does not hold this plan's data: run "
                             "--prepare-only with the same options on a machine with the project's requirements, "
                             "and bring its --work folder") from None
        data = {**doc["data"], "manifest": str(work / doc["manifest"])}
        cfg = _data_config(data)
        preprocess_cohort(cfg, read_manifest(cfg.manifest, cfg.task_spec))
        return data, doc["data_id"]
    manifest = Path(data["manifest"]).resolve().relative_to(work)
    saved.write_text(json.dumps({"plan": key, "data": data, "data_id": data_id, "manifest": str(manifest)}, indent=2))
    return data, data_id


def pretrain_checkpoints(plan, factory, device: str) -> dict[str, dict]:
    """Run each pre-training job once through the trial code (a cached checkpoint is reused); returns
    pretrain id -> {checkpoint_path, cache_hit, wall_s}."""
    from study.plan.grid import pretrain_id
    from trainables.trials import run_trial

    out = {}
    for method, backbone in plan.pretrain_jobs():
        config = factory.pretrain(method, backbone)
        config["pretrain"]["device"] = device
        start = time.perf_counter()
        final = run_trial(config, lambda metrics, state: None)
        out[pretrain_id(method, backbone)] = {"checkpoint_path": final["checkpoint_path"],
                                              "cache_hit": bool(final.get("cache_hit")),
                                              "wall_s": time.perf_counter() - start}
    return out


def race_seeds(plan, count: int) -> list[int]:
    """The race's round seeds 1..count (paired across cells: a round shares one seed)."""
    return [plan.seed * 100003 + RACE_SEED_OFFSET + k + 1 for k in range(count)]


def planned_runs(cells: list, seeds: list[int], designs: list[str], repeats: int) -> list[dict]:
    """One entry per distinct run: (cell, init seed, data seed, replicate); a run that several designs share
    (s_0 with s_0) is run once. In order of design, then seed, then cell, so that a run stopped early has
    every cell's first seeds of the first design."""
    s0, keys = seeds[0], {}
    for design in designs:
        if design == "seed":
            combos = [(s, s, 0) for s in seeds]
        elif design == "init":
            combos = [(s, s0, 0) for s in seeds]
        elif design == "data":
            combos = [(s0, s, 0) for s in seeds]
        else:
            combos = [(s0, s0, r) for r in range(repeats + 1)]
        for init, data, rep in combos:
            for cell in cells:
                keys.setdefault((cell.id, init, data, rep), {"cell": cell.id, "init_seed": init, "data_seed": data,
                                                             "replicate": rep})
    return list(keys.values())


def design_runs(design: str, runs: list[dict], cell: str, seeds: list[int], repeats: int) -> list[dict]:
    """The finished runs of ``cell`` that make up ``design``."""
    s0 = seeds[0]
    want = {"seed": {(s, s, 0) for s in seeds}, "init": {(s, s0, 0) for s in seeds},
            "data": {(s0, s, 0) for s in seeds}, "repeat": {(s0, s0, r) for r in range(repeats + 1)}}[design]
    return [r for r in runs if r["cell"] == cell and (r["init_seed"], r["data_seed"], r["replicate"]) in want
            and "error" not in r]


# -- one run ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def init_from(seed: int | None):
    """Within the block, fine-tuning trials build their network (and a strategy's added parameters) from
    ``seed`` instead of ``train.seed``; everything else in the trial keeps ``train.seed``. ``None``: no change."""
    from trainables import trials

    if seed is None:
        yield
        return
    original = trials.initial_model

    def seeded(spec):
        return original(replace(spec, train=replace(spec.train, seed=seed)))

    trials.initial_model = seeded
    try:
        yield
    finally:
        trials.initial_model = original


def run_one(task: dict) -> dict:
    """Run one fine-tuning trial config (in a worker process); returns the run's figures."""
    import torch

    from trainables.trials import run_trial

    torch.set_num_threads(1)
    history: list[dict] = []
    keep = ("epoch", "score", "val_score", "val_dice", "val_auc", "val_balanced_accuracy", "train_loss",
            "epoch_time_s")

    def report(metrics: dict, state) -> None:
        history.append(metrics)

    run = {k: task[k] for k in ("cell", "init_seed", "data_seed", "replicate")}
    run.update(task.get("tags", {}))  # what another bench varies besides the seed (bench.starting_points: lr)
    start = time.perf_counter()
    try:
        with init_from(task["init_seed"] if task["init_seed"] != task["data_seed"] else None):
            final = run_trial(task["config"], report)
    except Exception as exc:  # noqa: BLE001 - a diverged or failed trial is a result of the bench
        return {**run, "error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - start}
    run["wall_s"] = time.perf_counter() - start
    run["machine"] = run_machine()
    for key in (*METRICS, "test_accuracy", "test_hd95", "best_epoch", "time_total_s", "time_per_epoch_s",
                "peak_memory_mb"):
        value = final.get(key)
        run[key] = float(value) if isinstance(value, (int, float)) else None
    run["val_score_best"] = float(final["score"])  # the last report's score is its best epoch's
    run["val_score_last"] = float(final["val_score"])  # the last epoch's own validation score
    run["epochs"] = [{k: float(h[k]) for k in keep if isinstance(h.get(k), (int, float))} for h in history]
    return run


def run_machine() -> str:
    """Where a run ran (a resumed measurement may hold runs of several machines)."""
    import platform

    import torch

    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


# -- resuming ---------------------------------------------------------------------------------------------------

SAME_MEASUREMENT = ("budget", "tiny", "device", "input_size", "width", "finetune_epochs", "pretrain_epochs",
                    "batch_size", "splits", "cells", "recipe", "backbone_options")


def measurement_key(settings: dict) -> dict:
    """What runs must share to be pooled: the settings that change a run's figures (the pre-training checkpoint by
    its cache key)."""
    key = {k: settings.get(k) for k in SAME_MEASUREMENT}
    key["pretrain"] = {k: Path(v["checkpoint_path"]).parent.name for k, v in settings.get("pretrain", {}).items()}
    return json.loads(json.dumps(key))


def earlier_runs(path: Path, settings: dict) -> dict:
    """The runs, commands and wall times of an earlier (or interrupted) measurement in ``path`` with the same
    settings; each run keeps the machine it ran on."""
    doc = json.loads(path.read_text())
    if measurement_key(doc.get("settings", {})) != measurement_key(settings):
        raise SystemExit(f"--resume: {path} was measured with other settings (budget, cells, device, data or "
                         "pre-training); give another --results folder or the same options")
    machine = f"{doc['machine'].get('platform')}, {doc['machine'].get('cpus')} CPUs, torch {doc['machine'].get('torch')}"
    runs = [{**r, "machine": r.get("machine", machine)} for r in doc["runs"] if "error" not in r]
    return {"runs": runs, "commands": doc.get("commands", [doc["command"]]),
            "wall_s": doc.get("wall_s_per_command", [doc.get("wall_s")])}


# -- figures ----------------------------------------------------------------------------------------------------

def finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def spread(values: list[float]) -> dict:
    """Mean, between-run SD (n - 1), the SD's 95% interval (chi-square, normal runs) and the mean's (t)."""
    from scipy import stats as scipy_stats

    xs = finite(values)
    out: dict = {"n": len(xs), "mean": statistics.fmean(xs) if xs else None, "sd": None, "sd_ci": None,
                 "mean_ci": None}
    if len(xs) >= 2:
        n, sd = len(xs), statistics.stdev(xs)
        chi = scipy_stats.chi2
        out["sd"] = sd
        out["sd_ci"] = [sd * math.sqrt((n - 1) / chi.ppf(0.975, n - 1)), sd * math.sqrt((n - 1) / chi.ppf(0.025, n - 1))]
        half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out["mean_ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def within_run_sd(run: dict) -> float | None:
    """SD of the validation score over the run's second half of epochs (how much the best-epoch pick can move)."""
    scores = [e["val_score"] for e in run.get("epochs", []) if "val_score" in e]
    half = scores[len(scores) // 2:]
    return statistics.stdev(half) if len(half) >= 2 else None


def summarise(runs: list[dict], cells: list[str], designs: list[str], seeds: list[int], repeats: int
              ) -> tuple[list[dict], list[dict]]:
    """Rows per (cell, design) with each metric's spread; rows per cell with the variance decomposition and
    the best-epoch figures."""
    rows, parts = [], []
    for cell in cells:
        sds = {}
        for design in designs:
            chosen = design_runs(design, runs, cell, seeds, repeats)
            failed = sum(1 for r in runs if r["cell"] == cell and "error" in r)
            row: dict = {"cell": cell, "design": design, "runs": len(chosen), "failed_runs_of_cell": failed}
            for metric in METRICS:
                s = spread([r[metric] for r in chosen])
                row[metric] = s
                row[f"{metric}_mean"], row[f"{metric}_sd"] = s["mean"], s["sd"]
            sds[design] = {m: row[f"{m}_sd"] for m in METRICS}
            row["time_per_epoch_s"] = statistics.fmean(finite(r["time_per_epoch_s"] for r in chosen)) if chosen else None
            rows.append(row)
        seeded = design_runs("seed", runs, cell, seeds, repeats) if "seed" in designs else []
        part: dict = {"cell": cell}
        for design in ("seed", "init", "data", "repeat"):
            part[f"score_sd_{design}"] = sds.get(design, {}).get("test_score")
            part[f"auc_sd_{design}"] = sds.get(design, {}).get("test_auc")
        for design in ("init", "data", "repeat"):
            joint, own = part["score_sd_seed"], part[f"score_sd_{design}"]
            part[f"score_var_share_{design}"] = own**2 / joint**2 if joint and own is not None else None
        if seeded:
            epochs = len(seeded[0].get("epochs", [])) or None
            best = finite(r["best_epoch"] for r in seeded)
            part.update(
                best_epoch_mean=statistics.fmean(best) if best else None,
                best_is_last_share=sum(b == epochs for b in best) / len(best) if best else None,
                val_best_sd=spread([r["val_score_best"] for r in seeded])["sd"],
                val_last_sd=spread([r["val_score_last"] for r in seeded])["sd"],
                val_best_minus_last=statistics.fmean(r["val_score_best"] - r["val_score_last"] for r in seeded),
                val_within_run_sd=statistics.fmean(finite(within_run_sd(r) for r in seeded)) if finite(
                    within_run_sd(r) for r in seeded) else None,
                val_test_score_r=_pearson([r["val_score_best"] for r in seeded], [r["test_score"] for r in seeded]),
            )
        parts.append(part)
    return rows, parts


def _pearson(x: list, y: list) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    xs, ys = zip(*pairs, strict=True)
    if statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


# -- main -------------------------------------------------------------------------------------------------------

def parse_fields(text: str, config_cls: type, flag: str) -> dict:
    """``KEY=VALUE,...`` -> fields of ``config_cls`` (numbers as numbers, true/false as booleans), checked by
    building the config."""
    from dataclasses import fields

    known = [f.name for f in fields(config_cls)]
    out: dict = {}
    for item in (c.strip() for c in text.split(",") if c.strip()):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"{flag} {item!r}: write KEY=VALUE with KEY one of {', '.join(known)}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key] = value
    return out


def parse_recipe(text: str) -> dict:
    """``--recipe``: TrainConfig fields, checked by TrainConfig."""
    from trainables.engine import TrainConfig

    out = parse_fields(text, TrainConfig, "--recipe")
    TrainConfig(**out)
    return out


def parse_head(text: str) -> dict:
    """``--backbone-options``: BackboneConfig fields that shape only the heads (the body, and so the
    pre-training checkpoint, stays the same)."""
    from trainables.backbones import HEAD_ONLY_FIELDS, BackboneConfig

    out = parse_fields(text, BackboneConfig, "--backbone-options")
    if set(out) - set(HEAD_ONLY_FIELDS):
        raise SystemExit(f"--backbone-options: only {', '.join(HEAD_ONLY_FIELDS)} (the heads) can change here")
    BackboneConfig(**out)
    return out


RECIPE_FIELDS = ("lr_schedule", "warmup_epochs", "ema_decay", "grad_clip_norm", "keep_epoch")


def effective_recipe(tasks: list[dict]) -> dict:
    """The training-recipe fields the runs used (explicit or default), from their trial configs."""
    return {f: tasks[0]["config"]["train"][f] for f in RECIPE_FIELDS} if tasks else {}


def effective_head(tasks: list[dict]) -> dict:
    """The head-only backbone fields the runs used (explicit or default), from their trial configs."""
    from trainables.backbones import HEAD_ONLY_FIELDS

    return {f: tasks[0]["config"]["backbone"][f] for f in HEAD_ONLY_FIELDS} if tasks else {}


def parse_cells(text: str) -> list[tuple[str, str]]:
    cells = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        method, sep, strategy = item.partition(":")
        if not sep or not method or not strategy:
            raise SystemExit(f"--cells {item!r}: write METHOD:STRATEGY, e.g. none:full,reconstruction:full")
        cells.append((method, strategy))
    return cells


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.variance", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8, help="K: seeds per cell and design (>= 2)")
    p.add_argument("--cells", default=DEFAULT_CELLS, help="comma list of METHOD:STRATEGY (SegResNet)")
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"comma list of {', '.join(DESIGNS)}")
    p.add_argument("--repeats", type=int, default=2, help="extra runs of seed s_0 for the repeat design")
    p.add_argument("--budget", default="laptop", help="the study budget (study.plan.grid.BUDGETS)")
    p.add_argument("--recipe", default="", help="training-recipe fields for every run, KEY=VALUE,... of "
                   "trainables.engine.TrainConfig (e.g. ema_decay=0.99,lr_schedule=cosine): a lever to measure")
    p.add_argument("--backbone-options", default="", help="head-only BackboneConfig fields for every fine-tuning "
                   "run, KEY=VALUE,... (e.g. cls_reads_seg=true)")
    p.add_argument("--study-seed", type=int, default=0, help="the study seed (cohort, Optuna, the race's seeds)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (every trial; a pre-training too)")
    p.add_argument("--workers", type=int, default=1, help="processes at once (1: in this process, in turn)")
    p.add_argument("--work", type=Path, default=Path(".variance/work"),
                   help="folder for the cohort, the pre-training cache and the first-trial parameters (reused)")
    p.add_argument("--results", type=Path, default=None, help="folder for variance.json (default bench/results)")
    p.add_argument("--tiny", action="store_true", help="a few subjects, 16^3, 2 epochs: checks the path in seconds")
    p.add_argument("--prepare-only", action="store_true", help="build the work folder and stop")
    p.add_argument("--resume", action="store_true", help="keep the runs an earlier (or interrupted) measurement "
                   "with the same settings left in --results' variance.json, and run only the missing ones")
    p.add_argument("--commit", default=None, help="the commit to record where the code runs without its git "
                   "checkout (a GPU machine's copy); default: this checkout's")
    return p


@dataclass
class Prepared:
    """What every run of the bench shares: the plan, the cells, the launcher's trial factory, each cell's
    first-trial parameters and the pre-training checkpoints."""

    plan: object
    cells: list
    factory: object
    params: dict
    pretrained: dict
    work: Path
    seconds: float


def prepare(args: argparse.Namespace) -> Prepared:
    """The plan and its data (the launcher's ``prepare_data``), the cells' parameters and pre-training."""
    from study.launch import TrialFactory
    from study.plan.grid import Cell
    from trainables.data import read_manifest
    from trainables.task import as_task

    pairs = parse_cells(args.cells)
    plan = make_plan(args.budget, pairs, args.study_seed, args.tiny)
    cells = [Cell(m, s, BACKBONE) for m, s in pairs]
    missing = [c.id for c in cells if c.id not in {k.id for k in plan.cells}]
    if missing:
        raise SystemExit(f"cells {', '.join(missing)} are not in the {plan.name} grid at this width")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, data_id = study_data(plan, work)
    train_subjects = sum(r.split == "train" for r in read_manifest(data["manifest"], as_task(data["task"])))
    factory = TrialFactory(plan=plan, data=data, data_id=data_id, output=str(work / "models"),
                           pretrain_cache=str(work / "cache"), train_subjects=train_subjects)
    params = cell_params(plan, cells, work)
    pretrained = pretrain_checkpoints(plan, factory, args.device)
    return Prepared(plan, cells, factory, params, pretrained, work, time.perf_counter() - start)


def trial_tasks(prep: Prepared, seeds: list[int], designs: list[str], repeats: int, device: str,
                recipe: dict | None = None, head: dict | None = None) -> list[dict]:
    """One fine-tuning trial config per planned run, as the launcher builds it (``TrialFactory.finetune``), with
    the run's data seed as ``train.seed`` and its own model folder."""
    tasks = []
    for run in planned_runs(prep.cells, seeds, designs, repeats):
        cell = next(c for c in prep.cells if c.id == run["cell"])
        train, strategy_params = prep.params[cell.id]
        found = prep.pretrained.get(cell.pretrain_id)
        config = prep.factory.finetune(cell, found["checkpoint_path"] if found else None,
                                       {**train, **(recipe or {}), "device": device},
                                       strategy_params, run["data_seed"], phase="search")
        config["backbone"].update(head or {})
        name = f"{cell.id}__i{run['init_seed']}_d{run['data_seed']}_r{run['replicate']}"
        config["output_dir"] = str(prep.work / "models" / name)
        tasks.append({**run, "config": config})
    return tasks


def run_all(tasks: list[dict], workers: int, on_run) -> list[dict]:
    """Run ``tasks`` (in this process when ``workers`` <= 1, else in a pool); ``on_run(runs)`` after each."""
    runs: list[dict] = []
    if workers <= 1:
        for task in tasks:
            runs.append(run_one(task))
            on_run(runs)
        return runs
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for job in futures.as_completed([pool.submit(run_one, t) for t in tasks]):
            runs.append(job.result())
            on_run(runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m bench.variance " + " ".join(argv if argv is not None else sys.argv[1:])
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if not designs or set(designs) - set(DESIGNS):
        raise SystemExit(f"--designs {args.designs!r}: choose from {', '.join(DESIGNS)}")
    if args.seeds < 2:
        raise SystemExit("--seeds must be >= 2 (an SD needs two runs)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    prep = prepare(args)
    print(f"prepared in {prep.seconds:.0f} s; pre-training {prep.pretrained}", flush=True)
    if args.prepare_only:
        return 0
    plan, ids = prep.plan, [c.id for c in prep.cells]
    seeds = race_seeds(plan, args.seeds)
    recipe, head = parse_recipe(args.recipe), parse_head(args.backbone_options)
    tasks = trial_tasks(prep, seeds, designs, args.repeats, args.device, recipe, head)
    settings = {"budget": plan.name if args.tiny else args.budget, "tiny": args.tiny, "seeds": seeds,
                "designs": designs, "repeats": args.repeats, "device": args.device, "workers": args.workers,
                "input_size": list(plan.input_size), "width": plan.width, "finetune_epochs": plan.finetune_epochs,
                "pretrain_epochs": plan.pretrain_epochs, "batch_size": plan.batch_size, "splits": plan.splits,
                "cells": {c: {"train": prep.params[c][0], "strategy_params": prep.params[c][1]} for c in ids},
                "pretrain": prep.pretrained, "prepare_s": prep.seconds, "recipe": recipe,
                "backbone_options": head, "head": effective_head(tasks), "train_recipe": effective_recipe(tasks)}
    earlier = {"runs": [], "commands": [], "wall_s": []}
    result = (args.results or RESULTS) / "variance.json"
    if args.resume and result.is_file():
        earlier = earlier_runs(result, settings)
    done = {_key(r) for r in earlier["runs"]}
    planned = len(tasks)
    tasks = [t for t in tasks if _key(t) not in done]
    started = time.perf_counter()

    def save(new: list[dict], complete: bool) -> Path:
        runs = sorted(earlier["runs"] + new, key=lambda r: (ids.index(r["cell"]), *_key(r)[1:]))
        rows, parts = summarise(runs, ids, designs, seeds, args.repeats)
        wall = [*earlier["wall_s"], time.perf_counter() - started]
        extra = {"settings": settings, "complete": complete, "planned_runs": planned, "wall_s": sum(filter(None, wall)),
                 "commands": [*earlier["commands"], command], "wall_s_per_command": wall,
                 "machines": sorted({r["machine"] for r in runs if "machine" in r}), "decomposition": parts, "runs": runs}
        if args.commit:
            extra["commit"] = args.commit
        return write_result("variance", command, rows, extra, folder=args.results)

    def on_run(new: list[dict]) -> None:
        _progress(new, len(tasks), started)
        save(new, False)

    print(f"{len(tasks)} runs on {args.device} with {args.workers} worker(s)"
          + (f" ({len(done)} done earlier)" if done else ""), flush=True)
    path = save(run_all(tasks, args.workers, on_run), True)
    doc = json.loads(path.read_text())
    rows, parts = doc["rows"], doc["decomposition"]
    print()
    print_table(rows, ["cell", "design", "runs", *(f"{m}_{s}" for m in METRICS for s in ("mean", "sd"))])
    print()
    print_table(parts, ["cell", "score_sd_seed", "score_sd_init", "score_sd_data", "score_sd_repeat",
                        "score_var_share_init", "score_var_share_data", "auc_sd_seed", "best_epoch_mean",
                        "best_is_last_share", "val_best_sd", "val_last_sd", "val_within_run_sd", "val_test_score_r"])
    print(f"wrote {path}")
    return 0


def _key(run: dict) -> tuple:
    return (run["cell"], run["init_seed"], run["data_seed"], run["replicate"])


def _progress(runs: list[dict], total: int, started: float) -> None:
    last = runs[-1]
    what = last.get("error") or f"test score {last['test_score']:.3f}"
    print(f"[{len(runs)}/{total} {time.perf_counter() - started:.0f} s] {last['cell']} init {last['init_seed']} "
          f"data {last['data_seed']} rep {last['replicate']}: {what} ({last['wall_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
