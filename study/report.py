"""``python -m study.report DIR``: the study's report, from what MLflow and Optuna hold.

Writes ``DIR/report/``: ``report.html`` (self-contained, images embedded), ``report.md``,
``report.json`` (the numbers, with run ids), ``plots/*.png`` and ``best_configs.yaml`` (re-run it with
``python -m study.launch --grid DIR/report/best_configs.yaml``); logs the folder to the study's MLflow
parent run and registers each cell's best model (``pcs-<study>-<cell>``, alias ``best``).

A cell's best trial is its finished (``outcome=completed``) search-phase fine-tuning run with the
highest final validation ``score``; with repeats of that configuration (seed re-runs, ``phase=seeds``, or
a race's repeats, ``phase=race``), the tables show mean ± sample std over the best run and its repeats, and
the statistics resample the repeats with the test subjects. A race's record (``race.json``, written by the
searcher) becomes the report's race section: each cell's round of elimination with its evidence, the
survivors with their intervals, and whether the race resolved the best.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainables import shared_storage
from trainables.atomic import atomic_write_text, strict_json
from trainables.errors import StudyInputError
from trainables.metric_names import FINAL_METRICS
from trainables.phases import REPEAT_PHASES, best_run_per_cell
from trainables.task import TaskSpec, as_task

COLUMNS = {k: (m.heading, m.fmt) for k, m in FINAL_METRICS.items()}  # MLflow metric -> (heading, format)
MIN_IMPORTANCE_TRIALS = 3
_SAME_CONFIG_IGNORES = {"train.seed", "output_dir", "phase", "race_round"}


@dataclass
class CellResult:
    """One cell: its best search run, the seed re-runs of that configuration and its trial counts."""

    id: str
    pretrain: str
    strategy: str
    backbone: str
    best: object | None = None  # mlflow Run
    seed_runs: list = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    registered: str | None = None
    version: int | None = None
    cases: list = field(default_factory=list)  # stats.Cases (test) of the best run and its repeats
    evidence_runs: list = field(default_factory=list)  # inference.Run (validation and test) of the same runs
    fraction: float = 1.0  # share of the labelled training subjects (--label-fractions)

    @property
    def row(self) -> str:
        """The pre-training method, with the label fraction when the cell uses part of the labels."""
        return self.pretrain if self.fraction == 1.0 else f"{self.pretrain} @{self.fraction:g}"

    @property
    def runs(self) -> list:
        return [self.best, *self.seed_runs] if self.best is not None else []

    def values(self, key: str) -> list[float]:
        runs = [self.best, *self.seed_runs] if self.best is not None else []
        return [r.data.metrics[key] for r in runs if key in r.data.metrics]

    def stat(self, key: str) -> tuple[float, float, int]:
        """(mean, sample std or nan, n) of ``key`` over the best run and its seed re-runs."""
        v = self.values(key)
        if not v:
            return math.nan, math.nan, 0
        return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v)

    def text(self, key: str) -> str:
        mean, std, n = self.stat(key)
        if n == 0:
            return "–"
        fmt = _fmt(key, mean)
        if not self.seed_runs:
            return fmt(mean)
        return f"{fmt(mean)} (n=1)" if n == 1 else f"{fmt(mean)} ± {fmt(std)} (n={n})"


@dataclass
class Study:
    """What the report reads: the study folder, its plan and arguments, MLflow runs per cell."""

    folder: Path
    plan: dict
    args: dict
    tracking_uri: str
    experiment: str
    parent_run_id: str
    client: object
    cells: list[CellResult]
    failed: list[dict]
    pretrain_runs: list = field(default_factory=list)
    comparison: object | None = None  # stats.Comparison
    evidence: dict | None = None  # inference.assess: the choice on validation, its confirmation on test
    task: TaskSpec | None = None  # the study's task (study.json); None for a study from before tasks: PCS


def _fmt(key: str, scale: float | None = None):
    """The formatter of a metric's values (``scale``: a value whose unit the others take, for storage)."""
    if key == "trainable_fraction":
        return lambda v: f"{100 * v:.2f}"
    if key == "task_storage_bytes":
        mb = (scale if scale is not None else 0.0) >= 2**20
        return lambda v: f"{v / 2**20:.2f} MB" if mb or (scale is None and v >= 2**20) else f"{v / 1024:.1f} KB"
    return COLUMNS.get(key, ("", "{:.4g}"))[1].format


def typed(value: str) -> object:
    """An MLflow param string back to the value it was logged from (``'3'`` -> 3, ``'conv'`` -> 'conv')."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _config(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k.startswith(("train.", "strategy_params.")) and k not in
            _SAME_CONFIG_IGNORES}


def load_study(folder: str | Path) -> Study:
    """Read ``study.json`` and the study's MLflow runs; raise :class:`StudyInputError` when there is nothing to report."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    folder = Path(folder).resolve()
    study_file = folder / "study.json"
    if folder.is_file():
        raise StudyInputError(f"{folder} is a file, not a folder; give a study folder (python -m study.launch --output DIR)")
    if not study_file.is_file():
        raise StudyInputError(f"{folder}: no study.json; is it a study folder (python -m study.launch --output DIR)?")
    try:
        saved = json.loads(study_file.read_text())
        plan, args, parent_id = saved["plan"], saved.get("args", {}), saved["parent_run_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StudyInputError(f"{study_file}: not a study file written by study.launch ({exc!r})") from None
    uri = args.get("mlflow_uri") or f"sqlite:///{folder / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise StudyInputError(f"{folder}: no MLflow database {uri.removeprefix('sqlite:///')}; the study never ran")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise StudyInputError(f"{folder}: the study's parent run {parent_id} is not in {uri}") from None
    experiment = client.get_experiment(parent.info.experiment_id).name
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=50000)
    cells = {}
    from study.plan.grid import cell_id

    for c in plan.get("cells", []):
        fraction = float(c.get("fraction", 1.0))
        cid = cell_id(c["pretrain"], c["strategy"], c["backbone"], fraction)
        cells[cid] = CellResult(cid, c["pretrain"], c["strategy"], c["backbone"], fraction=fraction)
    failed = []
    for run in runs:
        tags = run.data.tags
        outcome = tags.get("outcome", "unfinished")
        if outcome == "failed":
            failed.append({"stage": tags.get("stage", ""), "cell": tags.get("cell", ""), "trial_id":
                           tags.get("trial_id", ""), "run_id": run.info.run_id,
                           "reason": tags.get("failure_reason", "unknown"), "phase": tags.get("phase", ""),
                           "race_round": tags.get("race_round")})
        if tags.get("stage") != "finetune":
            continue
        cid = tags.get("cell", "")
        cell = cells.setdefault(cid, CellResult(cid, tags.get("pretrain", ""), tags.get("strategy", ""),
                                                tags.get("backbone", ""), fraction=float(tags.get("fraction", 1.0))))
        kind = {"seeds": f"seed re-runs {outcome}", "race": f"race repeats {outcome}"}.get(tags.get("phase", ""),
                                                                                            outcome)
        cell.counts[kind] = cell.counts.get(kind, 0) + 1
    for cid, run in best_run_per_cell(runs).items():
        cells[cid].best = run
    for run in sorted(runs, key=lambda r: int(r.data.tags.get("race_round") or 0)):  # repeats of each best configuration
        tags = run.data.tags
        cell = cells.get(tags.get("cell", ""))
        if (cell is not None and cell.best is not None and tags.get("phase") in REPEAT_PHASES
                and tags.get("outcome") == "completed"
                and _config(run.data.params) == _config(cell.best.data.params)):
            cell.seed_runs.append(run)
    if not any(c.best for c in cells.values()):
        raise StudyInputError(f"{folder}: no finished fine-tuning trial in {uri}; nothing to report "
                              f"({len(runs)} trial run(s), {len(failed)} failed)")
    task = as_task(saved.get("task"))
    from study.evidence.inference import Run
    from study.run.tracking import VAL_CASES_FILE

    for cell in cells.values():
        for r in cell.runs:
            test = load_cases(client, r.info.run_id, task)
            val = load_cases(client, r.info.run_id, task, VAL_CASES_FILE) if test is not None else None
            if test is not None:
                cell.cases.append(test)
                cell.evidence_runs.append(Run(val, test, r.data.tags.get("phase", "search"), selected=r is cell.best))
    pretrain_runs = [r for r in runs if r.data.tags.get("stage") == "pretrain" and r.info.status == "FINISHED"]
    return Study(folder, plan, args, uri, experiment, parent_id, client, list(cells.values()), failed, pretrain_runs,
                 task=task)


def load_cases(client, run_id: str, task: TaskSpec | None = None, artifact: str | None = None):
    """A run's per-case results (the ``test_cases.json`` table artifact, or ``artifact``: ``val_cases.json``) as
    :class:`study.evidence.stats.Cases`, or None for a run that has none (a study from before per-case results,
    or a failed upload)."""
    import os
    import tempfile

    from study.evidence.stats import Cases
    from study.run.tracking import TEST_CASES_FILE

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, artifact or TEST_CASES_FILE, tmp)
            table = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - no such artifact, or an unreadable one: the cell has no cases
            return None
    columns = table.get("columns", [])
    rows = [dict(zip(columns, row, strict=False)) for row in table.get("data", [])]
    return Cases.from_rows(rows, task) if rows else None


def reference_cell(study: Study) -> str | None:
    """The cell the others are compared with: ``--reference`` if given, else the from-scratch baseline
    ``none__full__<first backbone>`` when the study has it."""
    wanted = study.args.get("reference") or study.plan.get("reference")
    ids = [c.id for c in study.cells]
    if wanted:
        return wanted if wanted in ids else None
    backbone = next((c.backbone for c in study.cells), "")
    return f"none__full__{backbone}" if f"none__full__{backbone}" in ids else None


def compare_cells(study: Study):
    """The statistics of :mod:`study.evidence.stats` over the cells with per-case results (stored on the study)."""
    from study.evidence import stats
    from study.evidence.inference import assess, run_variance

    runs = {c.id: c.cases for c in study.cells if c.best is not None}
    # with repeats of some cells (a race, --seeds), every interval includes the variation between training runs,
    # pooled over the repeats (the search's chosen runs left out: they were picked for being high)
    between = run_variance({c.id: c.evidence_runs for c in study.cells if c.evidence_runs}, "test", "score")
    sd = between.sd if between is not None else None
    study.comparison = stats.compare(runs, reference=reference_cell(study), seed=int(study.plan.get("seed") or 0),
                                     between_run_sd=sd)
    from study.evidence.racing import read_confirmation

    chosen = (read_confirmation(study.folder) or {}).get("best")
    study.evidence = assess({c.id: c.evidence_runs for c in study.cells if c.evidence_runs}, reference_cell(study),
                            seed=int(study.plan.get("seed") or 0), chosen=chosen)
    return study.comparison


def best_params(run) -> dict:
    """``{"train": {...}, "strategy_params": {...}}`` of a run: the hyperparameters a grid file may fix."""
    from search_spaces.finetune import TRAIN_DEFAULTS
    from study.plan.grid_file import _TRAIN_SEARCHED
    from trainables.engine import TrainConfig

    defaults = TrainConfig()
    train, strategy = {}, {}
    for key, value in run.data.params.items():
        group, _, name = key.partition(".")
        # what the search samples, and a fixed loss weight only where it is not the default
        if group == "train" and name in _TRAIN_SEARCHED and (
                name in TRAIN_DEFAULTS or typed(value) != getattr(defaults, name)):
            train[name] = typed(value)
        elif group == "strategy_params":
            strategy[name] = typed(value)
    return {"train": train, "strategy_params": strategy}


def write_best_configs(study: Study, path: Path) -> Path:
    """``best_configs.yaml``: the plan's sizes and every reported cell with its best hyperparameters fixed."""
    from study.plan.grid_file import PLAN_FIELDS, dump_grid_file

    fields = {"name": f"{study.plan.get('name', 'study')}-best"}
    fields.update({k: v for k, v in study.plan.items() if k in PLAN_FIELDS and v is not None and k != "label_fractions"})
    cells = [{"pretrain": c.pretrain, "strategy": c.strategy, "backbone": c.backbone, "params": best_params(c.best),
              **({"fraction": c.fraction} if c.fraction != 1.0 else {})}  # the cells carry their label fraction
             for c in study.cells if c.best is not None]
    dump_grid_file(fields, cells, path)
    return path


def register_models(study: Study) -> list[str]:
    """Register each cell's best model; returns notes for the cells whose model file is missing."""
    from study.run.model_registry import register_best, registered_name

    notes = []
    for cell in study.cells:
        if cell.best is None:
            continue
        params = cell.best.data.params
        location = shared_storage.join(params.get("output_dir", ""), "model.pt")
        model = shared_storage.find(location)  # a local copy when the study's storage is an object store
        if model is None:
            notes.append(f"{cell.id}: model file {location} not found; not registered")
            continue
        name = registered_name(study.experiment, cell.id)
        info = {"cell": cell.id, "pretrain": cell.pretrain, "strategy": cell.strategy, "backbone": cell.backbone,
                "spacing_mm": typed(params.get("data.spacing_mm", "None")),
                "input_size": typed(params.get("data.input_size", "None")),
                "roi": params.get("data.roi", "none"),  # a study from before registration cropped centred
                "run_id": cell.best.info.run_id, "score": cell.best.data.metrics.get("score"),
                "experiment": study.experiment}
        cell.version = register_best(study.client, name, cell.best.info.run_id, model, info,
                                     tags={"cell": cell.id, "experiment": study.experiment})
        cell.registered = name
    return notes


def optuna_location(folder: Path, args: dict) -> str | Path:
    """Where the launcher kept the study's per-cell Optuna studies.

    The RDB URL of ``--optuna-storage`` when one was given, else the folder holding ``optuna.journal``:
    the shared ``--storage`` folder when one was given (the launcher writes the journal there and saves
    the folder's absolute path in ``study.json``), else the study folder (also with an object-store
    ``--storage``, which holds no journal).
    """
    if args.get("optuna_storage"):
        return str(args["optuna_storage"])
    if not args.get("storage") or shared_storage.is_remote(args["storage"]):
        return folder
    return Path(args["storage"]).expanduser()


def make_plots(study: Study, out: Path) -> tuple[list[tuple[str, Path]], dict[str, Path], list[str]]:
    """(main figures, importance figure per cell, notes)."""
    import optuna

    from study.evidence import plots
    from study.run.searcher import optuna_storage

    done = [c for c in study.cells if c.best is not None]
    comparison = study.comparison if study.comparison is not None else compare_cells(study)
    cis = {c: (s.ci["score"], s.indistinguishable_from_best) for c, s in comparison.cells.items()}

    def score_point(c: CellResult) -> dict:
        (lo, hi), tied = cis.get(c.id, ((math.nan, math.nan), False))
        estimate = comparison.cells[c.id].estimate["score"] if c.id in comparison.cells else c.stat("test_score")[0]
        return {"label": c.id, "pretrain": c.pretrain, "strategy": c.strategy, "score": estimate, "lo": lo,
                "hi": hi, "tied": tied, "memory": c.stat("peak_memory_mb")[0], "time": c.stat("time_per_epoch_s")[0]}

    points = [score_point(c) for c in done]
    figures = [("Cells by test score with 95% confidence intervals (forest plot; exploratory: measured after the "
                "choice on validation)",
                plots.plot_forest(points, out / "forest.png", reference=comparison.reference,
                                  between_runs=comparison.between_run_sd is not None)),
               *([("Rank uncertainty (blob plot): exploratory, on the test split after the choice on validation",
                   plots.plot_rank_blobs(study.evidence["ranks"]["cells"], out / "ranks.png",
                                         study.evidence["ranks"].get("kendall_tau")))]
                 if study.evidence and study.evidence.get("ranks", {}).get("cells") else []),
               ("Test score vs peak memory", plots.plot_tradeoff(points, "memory", "peak memory (MB)",
                                                                 out / "pareto_memory.png")),
               ("Test score vs time per epoch", plots.plot_tradeoff(points, "time", "time per epoch (s)",
                                                                    out / "pareto_time.png"))]
    for backbone in dict.fromkeys(c.backbone for c in study.cells):
        mine = [score_point(c) | {"key": (c.row, c.strategy)} for c in done if c.backbone == backbone]
        cells_here = [c for c in study.cells if c.backbone == backbone]
        path = plots.plot_heatmap({p["key"]: p["score"] for p in mine},
                                  list(dict.fromkeys(c.row for c in cells_here)),
                                  list(dict.fromkeys(c.strategy for c in cells_here)),
                                  f"test score, {backbone}", out / f"heatmap_{backbone}.png",
                                  intervals={p["key"]: (p["lo"], p["hi"]) for p in mine},
                                  tied={p["key"] for p in mine if p["tied"]})
        figures.append((f"Test score with 95% CI, method x strategy ({backbone})", path))
    label_curves = label_efficiency(study, comparison)
    if label_curves:
        figures.append(("Label efficiency: test score against labelled training subjects, 95% CI",
                        plots.plot_label_efficiency(label_curves, out / "label_efficiency.png")))
    curves = {c.id: [(m.step, m.value) for m in study.client.get_metric_history(c.best.info.run_id, "score")]
              for c in done}
    figures.append(("Learning curves (validation score)", plots.plot_learning_curves(curves, out / "curves.png")))
    importance, notes = {}, []
    where = optuna_location(study.folder, study.args)
    if isinstance(where, Path) and not (where / "optuna.journal").is_file():
        return figures, importance, [f"no Optuna journal {where / 'optuna.journal'}: no hyperparameter importances"]
    try:
        storage = optuna.storages.get_storage(where) if isinstance(where, str) else optuna_storage(None, where)
    except Exception as exc:  # an unreachable or wrong RDB URL: the report goes on without importances
        reason = " ".join(str(exc).split())[:200]
        return figures, importance, [f"cannot open the Optuna storage (--optuna-storage): {type(exc).__name__}: "
                                     f"{reason}; no hyperparameter importances"]
    for c in study.cells:
        result = plots.cell_importances(storage, f"{study.plan.get('name')}/{c.id}", MIN_IMPORTANCE_TRIALS)
        if isinstance(result, str):
            notes.append(f"{c.id}: {result}")
        else:
            importance[c.id] = plots.plot_importances(c.id, result, out / f"importance_{c.id}.png")
    return figures, importance, notes


def labelled_subjects(cell: CellResult) -> float:
    """The labelled training subjects the cell's best run fine-tuned on (its fraction, when not recorded)."""
    value = typed(cell.best.data.params.get("labelled_subjects", "None")) if cell.best is not None else None
    return float(value) if isinstance(value, (int, float)) else cell.fraction


def label_efficiency(study: Study, comparison) -> dict:
    """``{(strategy, backbone): {pretrain: [(labelled subjects, score, lo, hi, fraction), ...]}}`` for a study
    with several label fractions (empty otherwise); intervals from :func:`compare_cells`."""
    fractions = sorted({c.fraction for c in study.cells})
    if len(fractions) < 2:
        return {}
    out: dict = {}
    for c in study.cells:
        stat = comparison.cells.get(c.id)
        if stat is None:
            continue
        lo, hi = stat.ci["score"]
        x = labelled_subjects(c)
        out.setdefault((c.strategy, c.backbone), {}).setdefault(c.pretrain, []).append(
            (x, stat.estimate["score"], lo, hi, c.fraction))
    for lines in out.values():
        for points in lines.values():
            points.sort()
    return out


def summary(study: Study) -> dict:
    """The report's numbers (also ``report.json``): per cell the best run, its metrics and seed statistics."""
    cells = []
    for c in study.cells:
        entry = {"cell": c.id, "pretrain": c.pretrain, "strategy": c.strategy, "backbone": c.backbone,
                 "counts": c.counts, "best_run_id": c.best.info.run_id if c.best else None,
                 "seed_run_ids": [r.info.run_id for r in c.seed_runs], "registered_model": c.registered,
                 "registered_version": c.version}
        if c.best is not None:
            entry["score"] = c.best.data.metrics["score"]
            entry["best"] = {k: c.best.data.metrics.get(k) for k in COLUMNS}
            entry["stats"] = {k: dict(zip(("mean", "std", "n"), c.stat(k), strict=True)) for k in COLUMNS}
            entry["params"] = best_params(c.best)
        cells.append(entry)
    comparison = study.comparison if study.comparison is not None else compare_cells(study)
    for entry in cells:
        stat = comparison.cells.get(entry["cell"])
        if stat is not None:
            entry["statistics"] = {
                "estimate": stat.estimate, "ci": {k: list(v) for k, v in stat.ci.items()}, "runs": stat.runs,
                "indistinguishable_from_best": stat.indistinguishable_from_best,
                "vs_best": _listed(stat.vs_best), "vs_reference": {k: _listed(v) for k, v in stat.vs_reference.items()}}
    from study.evidence.inference import MARGIN
    from study.evidence.verdict import claims, label_verdict, learning, learning_line, verdict

    evidence = study.evidence or {}
    ranks = (evidence.get("ranks") or {}).get("cells", {})
    learned = learning(study.cells)
    for entry in cells:
        if entry["cell"] in ranks:
            entry["rank"] = ranks[entry["cell"]]
        if entry["cell"] in learned:
            entry["learned"] = learned[entry["cell"]]["learned"]
            entry["chance_score"] = learned[entry["cell"]]["chance"]
    idle = learning_line(learned)
    text = verdict(comparison, evidence) + ([idle] if idle else []) + label_verdict(study.cells, comparison)
    return {"study": study.experiment, "folder": str(study.folder), "parent_run_id": study.parent_run_id,
            "tracking_uri": study.tracking_uri,
            "verdict": {"text": text, "best": (evidence.get("selection") or {}).get("best") or comparison.best,
                        "reference": comparison.reference,
                        "may_be_best": (evidence.get("selection") or {}).get("may_be_best", []),
                        # exploratory, on the test split after the choice: the cells whose test-score difference
                        # from the highest test score has an interval that includes 0
                        "best_on_test": comparison.best,
                        "indistinguishable_from_best": comparison.tied_with_best(),
                        "test_subjects": len(comparison.subjects), "resamples": comparison.resamples,
                        "confidence": comparison.confidence, "seeds_resampled": comparison.seeds_resampled,
                        "too_small_to_separate": comparison.too_small(),
                        "between_run_sd": comparison.between_run_sd,
                        "typical_ci_half_width": comparison.typical_half_width(),
                        "spread_of_cells": comparison.spread(), "cells_without_cases": comparison.missing,
                        "did_not_learn": sorted(k for k, v in learned.items() if v["learned"] is False)},
            "selection": evidence.get("selection"), "confirmation": evidence.get("confirmation"),
            "kendall_tau": (evidence.get("ranks") or {}).get("kendall_tau"),
            "variance_components": evidence.get("variance_components"),
            "what_it_would_take": evidence.get("what_it_would_take"),
            "claims": claims(comparison, study.cells, study.pretrain_runs,
                             float(study.args.get("margin") or MARGIN)),
            "race": race_summary(study, comparison),
            "remapping": remapping_summary(study, comparison),
            "cells": cells, "failed": study.failed}


REMAPPING_STRATEGY, TWIN_STRATEGY = "distill", "student"


def remapping_summary(study: Study, comparison) -> list[dict]:
    """Per distillation cell: the student, its teacher cell and its label-only twin (``none__student``), each with
    its test score and interval, the paired difference from the teacher, its size, storage, time and memory:
    what remapping buys (a smaller, faster model) and what it costs (accuracy)."""
    from study.evidence.stats import interval
    from study.plan.grid import DEFAULT_TEACHER_STRATEGY, cell_id

    by_id = {c.id: c for c in study.cells}
    named = {cell_id(c["pretrain"], c["strategy"], c["backbone"], float(c.get("fraction", 1.0))): c.get("teacher")
             for c in study.plan.get("cells", [])}
    out = []
    for c in study.cells:
        if c.strategy != REMAPPING_STRATEGY or c.best is None:
            continue
        teacher = named.get(c.id) or cell_id(c.pretrain, DEFAULT_TEACHER_STRATEGY, c.backbone, c.fraction)
        twin = cell_id("none", TWIN_STRATEGY, c.backbone, c.fraction)
        rows = []
        for role, cid in (("student (distilled)", c.id), ("teacher", teacher), ("twin (labels only)", twin)):
            cell, stat = by_id.get(cid), comparison.cells.get(cid)
            if cell is None or cell.best is None:
                continue
            m = cell.best.data.metrics
            row = {"role": role, "cell": cid, "test_score": stat.estimate["score"] if stat else m.get("test_score"),
                   "ci": list(stat.ci["score"]) if stat else None,
                   "params": m.get("student_total_params", m.get("total_params")),
                   "task_storage_bytes": m.get("task_storage_bytes"), "time_per_epoch_s": m.get("time_per_epoch_s"),
                   "seconds_per_volume": m.get("test_seconds_per_volume"), "peak_memory_mb": m.get("peak_memory_mb")}
            if cid != c.id and c.id in comparison.samples and cid in comparison.samples:
                diff = comparison.samples[c.id]["score"] - comparison.samples[cid]["score"]
                row["student_minus_this"] = {"difference": comparison.cells[c.id].estimate["score"] - stat.estimate["score"],
                                             "ci": list(interval(diff, comparison.confidence))}
            rows.append(row)
        out.append({"cell": c.id, "teacher": teacher, "twin": twin, "rows": rows})
    return out


def race_summary(study: Study, comparison) -> dict | None:
    """The race's record (``race.json``) with the MLflow side of it: the repeats each cell has in MLflow,
    the reasons of failed repeats, the survivors' intervals over all their runs, and the text of the outcome."""
    from study.evidence.racing import read_race
    from study.run.progress import duration

    race = read_race(study.folder)
    if race is None:
        return None
    in_mlflow = {c.id: c.counts.get("race repeats completed", 0) for c in study.cells}
    rows = []
    for cell, e in sorted(race["eliminated"].items(), key=lambda kv: (kv[1]["round"], kv[0])):
        rows.append({"cell": cell, "outcome": "eliminated", "round": e["round"], "difference": e.get("difference"),
                     "by": e.get("by"), "threshold": e.get("threshold"), "alpha": e.get("alpha"),
                     "reason": e.get("reason", ""),
                     "repeats": race["repeats"].get(cell, 0), "repeats_in_mlflow": in_mlflow.get(cell, 0)})
    last = race["rounds"][-1]["evidence"] if race["rounds"] else {}
    for cell in race["alive"]:
        stat = comparison.cells.get(cell)
        e = last.get(cell, {})
        rows.append({"cell": cell, "outcome": "best" if cell == race["best"] else "still in the race",
                     "round": None, "difference": e.get("difference"), "by": None, "threshold": None,
                     "alpha": e.get("alpha"), "test_score_ci": list(stat.ci["score"]) if stat else None,
                     "test_score": stat.estimate["score"] if stat else None,
                     "repeats": race["repeats"].get(cell, 0), "repeats_in_mlflow": in_mlflow.get(cell, 0)})
    failed = [{**f, "reason": next((x["reason"] for x in study.failed if x.get("phase") == "race"
                                    and x["cell"] == f["cell"] and str(x.get("race_round")) == str(f["round"])),
                                   f["reason"])} for f in race["failed"]]
    rounds = race["round"]
    spent = f"{race['trials_used']} repeat(s) in {rounds} round(s), {duration(race['elapsed_s'])}"
    seed_sd = next((e["run_sd"] for r in reversed(race["rounds"]) for e in r.get("evidence", {}).values()
                    if e.get("run_sd") is not None), None)
    for cell, e in sorted(race.get("not_raced", {}).items()):
        rows.append({"cell": cell, "outcome": "not raced", "round": None, "difference": None, "by": None,
                     "threshold": None, "alpha": None, "reason": e.get("reason", ""), "test_score_ci": None,
                     "test_score": None, "repeats": 0, "repeats_in_mlflow": in_mlflow.get(cell, 0)})
    budget = " and ".join(x for x in (f"{race['max_trials']} repeats" if race["max_trials"] else "",
                                      f"{race['max_minutes']:g} minutes" if race["max_minutes"] else "") if x)
    if race["status"] == "resolved" and rounds == 0:
        text = f"Only one cell, {race['best']}, had per-case test results after the search: there was nothing to race."
    elif race["status"] == "resolved":
        text = (f"The race resolved the best cell on validation: {race['best']} is shown better than every other "
                f"cell in the race after {spent} (budget {budget}).")
    elif race["status"] == "budget":
        text = (f"The race's budget ({budget}) ran out after {spent}, with {len(race['alive'])} cells still in the "
                f"race: {', '.join(race['alive'])}. The best on validation, {race['best']}, is not shown better than "
                "them; more repeats (--race-budget) or more validation subjects would be needed.")
    elif race["status"] == "failed":
        text = (f"The race stopped after {spent}: every repeat of round {rounds} failed (below), so another round "
                f"would fail alike. {len(race['alive'])} cells were still in the race: {', '.join(race['alive'])}.")
    elif race["status"] == "no_contest":
        text = ("No race: no two cells had a finished search trial with per-case test results on the same test "
                "subjects.")
    else:
        text = f"The race did not finish (status {race['status']}, after {spent}); resume the study to finish it."
    if seed_sd is not None:
        text += (f" Between two training runs of a configuration the validation score varied by {seed_sd:.3f} "
                 "(standard deviation, pooled over the cells' repeats); the race's tests include it.")
    text += (f" Error control: an elimination needs {race.get('min_runs', 3)} repeats of each cell compared and a "
             "difference beyond Tukey-Kramer's studentized-range threshold on validation, at a level that spends "
             f"alpha {race['alpha']:g} over the race's tests (6 alpha / (pi^2 t^2) at the t-th), so the chance of "
             "ever eliminating a cell no other cell beats is at most alpha.")
    mismatch = [r["cell"] for r in rows if r["repeats"] != r["repeats_in_mlflow"]]
    return {"status": race["status"], "text": text, "best": race["best"], "alpha": race["alpha"],
            "max_trials": race["max_trials"], "max_minutes": race["max_minutes"], "trials_used": race["trials_used"],
            "rounds": rounds, "elapsed_s": race["elapsed_s"], "cells": rows, "failed": failed, "seed_sd": seed_sd,
            "cells_whose_mlflow_repeats_differ": mismatch}


def _listed(d: dict) -> dict:
    """A difference entry with its interval as a list (JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def write_report(output_dir: str | Path, *, register: bool = True, log_to_mlflow: bool = True,
                 reference: str | None = None) -> Path:
    """Write ``<output_dir>/report/`` (see the module docstring); returns that folder. ``reference``: the
    cell the others are compared with (default: the study's ``--reference``, else ``none__full__<backbone>``)."""
    from study.report_render import render_html, render_markdown

    study = load_study(output_dir)
    if reference:
        if reference not in {c.id for c in study.cells}:
            raise StudyInputError(f"--reference {reference!r} is not a cell of the study in {study.folder}; its "
                                  f"cells: {', '.join(c.id for c in study.cells[:20])}")
        study.args = {**study.args, "reference": reference}
    compare_cells(study)
    out = study.folder / "report"
    out.mkdir(exist_ok=True)
    notes = register_models(study) if register else []
    figures, importance, importance_notes = make_plots(study, out / "plots")
    configs = write_best_configs(study, out / "best_configs.yaml")
    data = summary(study)
    data["notes"], data["importance_notes"] = notes, importance_notes
    atomic_write_text(out / "report.json", strict_json(data))
    atomic_write_text(out / "report.md", render_markdown(study, data, figures, importance, importance_notes, notes,
                                                         configs, out))
    atomic_write_text(out / "report.html", render_html(study, data, figures, importance, importance_notes, notes,
                                                       configs))
    if log_to_mlflow:
        study.client.log_artifacts(study.parent_run_id, str(out), "report")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    from study.cli import OneLineParser, run_command

    parser = OneLineParser(prog="python -m study.report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the study folder (python -m study.launch --output DIR)")
    parser.add_argument("--no-register", action="store_true", help="do not register the best models in MLflow")
    parser.add_argument("--reference", metavar="CELL", help="compare every cell with this one (default: the "
                        "study's --reference, else none__full__<backbone>)")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    def report(args) -> None:
        out = write_report(args.folder, register=not args.no_register, reference=args.reference)
        print(f"report: {out / 'report.html'}")

    return run_command(parser, argv, report)


if __name__ == "__main__":
    sys.exit(main())
