"""Shared helpers for the benchmarks: machine facts and writing results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

from study.run.provenance import code_version
from trainables.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def commit() -> str:
    """The commit of the code measured (``-dirty`` for local changes other than earlier results)."""
    return code_version(ignore=("bench/results",))


def write_result(name: str, command: str, rows: list[dict], extra: dict | None = None,
                 folder: Path | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (or into ``folder``), atomically, with the machine, date, commit
    and command."""
    folder = Path(folder) if folder else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": commit(), "command": command, "machine": machine(), "rows": rows, **(extra or {})}
    path = folder / f"{name}.json"
    atomic_write_text(path, json.dumps(doc, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def fixed_trials(work: Path, budget: str, cells: list[tuple[str, str]], per_cell: int, sampled: bool = True,
                 backbone: str = "segresnet", seed: int = 0):
    """Fine-tuning trial configs fixed in advance, the same for every run of a benchmark.

    Each cell ``(pretrain, strategy)`` gets ``per_cell`` trials with the seeds the study's searcher would
    give them; ``sampled``: hyperparameters drawn from the cell's real search space by a seeded Optuna
    random sampler (else the training defaults, identical across the cell's trials). Only ``none``
    (random initialisation) cells, so no pre-training runs. Returns ``(plan, factory, configs)``; the
    embedded cohort is generated and preprocessed in ``work/cohort`` first (not timed by callers).
    """
    import zlib

    import optuna

    from study.launch import TrialFactory, prepare_data
    from study.plan.grid import Cell, select_plan
    from study.run.searcher import sample_finetune_params

    if any(p != "none" for p, _ in cells):
        raise ValueError("fixed_trials takes 'none' cells only (no pre-training)")
    plan = select_plan("full", budget=budget, methods=["none"], strategies=sorted({s for _, s in cells}),
                       backbones=[backbone], seed=seed)
    data, data_id = prepare_data(plan, work, None)
    factory = TrialFactory(plan=plan, data=data, data_id=data_id, output=str(work), pretrain_cache=str(work / "cache"))
    configs = []
    for pretrain, strategy in cells:
        cell = Cell(pretrain, strategy, backbone)
        sampler = optuna.samplers.RandomSampler(seed=zlib.crc32(cell.id.encode()) + seed)
        study = optuna.create_study(sampler=sampler, direction="maximize")
        for k in range(per_cell):
            train, params = sample_finetune_params(study.ask(), strategy) if sampled else ({}, {})
            configs.append(factory.finetune(cell, None, train, params, plan.seed * 100003 + k + 1))
    return plan, factory, configs


def may_be_best(verdict: dict) -> list[str]:
    """A report's set that may be best: chosen on validation (Hsu's MCB, ``verdict.may_be_best``), or the
    test-split set (``indistinguishable_from_best``) of a report that predates the choice on validation."""
    return verdict.get("may_be_best") or verdict["indistinguishable_from_best"]
