"""``--grid FILE.yaml``: a grid written by hand or by the report (``best_configs.yaml``).

Format (every key but ``cells`` optional)::

    name: lora-vs-full            # the study's name
    base: smoke                   # the budget whose sizes and epochs are the defaults (smoke | laptop | paper)
    num_samples: 4                # any StudyPlan field: finetune_epochs, width, input_size, seeds, ...
    cells:
      - pretrain: reconstruction
        strategy: lora
        backbone: segresnet       # default: segresnet
        num_samples: 2            # this cell's trials
        params:                   # fixed hyperparameters: this cell is not searched
          train: {lr_encoder: 0.0001, lr_decoder: 0.001, lr_heads: 0.001, weight_decay: 1.0e-5}
          strategy_params: {rank: 8, alpha: 16}

Loaded with ``yaml.safe_load`` only; every problem is a :class:`StudyInputError` naming the file, the
line where YAML can tell it, the cell and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from study.plan.grid import BUDGETS, DEFAULT_BACKBONE, Cell, StudyPlan
from trainables.atomic import atomic_write_text
from trainables.engine import TrainConfig
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES

# the plan fields a grid file may set (not the cells, the name, or what the launcher derives: left_out)
PLAN_FIELDS = {f.name for f in dataclasses.fields(StudyPlan)} - {"cells", "name", "left_out"}
_CELL_KEYS = {"pretrain", "strategy", "backbone", "num_samples", "params", "fraction", "teacher"}
_TRAIN_SEARCHED = {"lr_encoder", "lr_decoder", "lr_heads", "weight_decay", "seg_weight", "cls_weight"}


def _load_yaml(path: Path) -> object:
    if path.is_dir():
        raise StudyInputError(f"grid file {path} is a folder, not a file; give the path of a grid FILE.yaml")
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyInputError(f"grid file {path}: cannot be read ({exc.strerror}); check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StudyInputError(f"grid file {path}: malformed YAML{where}: {problem}") from None


def _string_keys(mapping: dict, where: str) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise StudyInputError(f"{where}: keys must be names, got {bad[:3]!r}")


def _cell(path: Path, i: int, raw: object) -> Cell:
    where = f"grid file {path}, cell {i + 1}"
    if not isinstance(raw, dict):
        raise StudyInputError(f"{where}: each cell must be a mapping with pretrain, strategy, backbone")
    _string_keys(raw, where)
    unknown = set(raw) - _CELL_KEYS
    if unknown:
        raise StudyInputError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_CELL_KEYS)}")
    for key in ("pretrain", "strategy"):
        if not isinstance(raw.get(key), str):
            raise StudyInputError(f"{where}: '{key}' is required and must be a name")
    if raw.get("backbone") is not None and not isinstance(raw["backbone"], str):
        raise StudyInputError(f"{where}: 'backbone' must be a name")
    n = raw.get("num_samples")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise StudyInputError(f"{where}: num_samples must be a positive integer, got {n!r}")
    params = raw.get("params")
    if params is not None:
        params = _check_params(where, raw["strategy"], params)
    fraction = raw.get("fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise StudyInputError(f"{where}: fraction must be a number in (0, 1] (the share of the labelled training "
                              f"subjects), got {fraction!r}")
    teacher = raw.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise StudyInputError(f"{where}: teacher must be a cell id of the grid, e.g. none__full__segresnet, "
                              f"got {teacher!r}")
    return Cell(raw["pretrain"], raw["strategy"], raw.get("backbone") or DEFAULT_BACKBONE, n, params, float(fraction),
                teacher)


def _check_params(where: str, strategy: str, params: object) -> dict:
    if not isinstance(params, dict) or any(not isinstance(k, str) for k in params) or set(params) - {
        "train", "strategy_params"
    }:
        raise StudyInputError(f"{where}: params must be a mapping with 'train' and/or 'strategy_params'")
    train = params.get("train") or {}
    strategy_params = params.get("strategy_params") or {}
    if not isinstance(train, dict) or not isinstance(strategy_params, dict):
        raise StudyInputError(f"{where}: params.train and params.strategy_params must be mappings")
    _string_keys(train, f"{where}: params.train")
    _string_keys(strategy_params, f"{where}: params.strategy_params")
    bad = set(train) - _TRAIN_SEARCHED
    if bad:
        raise StudyInputError(f"{where}: params.train has unknown keys {sorted(bad)}; allowed: {sorted(_TRAIN_SEARCHED)}")
    try:
        TrainConfig(**train)
    except (TypeError, ValueError) as exc:
        raise StudyInputError(f"{where}: params.train: {exc}") from None
    try:
        STRATEGIES.get(strategy).make_config(strategy_params)
    except StudyInputError as exc:
        raise StudyInputError(f"{where}: params.strategy_params: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise StudyInputError(f"{where}: params.strategy_params: {exc}") from None
    return {"train": dict(train), "strategy_params": dict(strategy_params)}


def load_grid_file(path: str | Path) -> StudyPlan:
    """Read and validate a grid file into a :class:`StudyPlan`."""
    path = Path(path)
    raw = _load_yaml(path)
    if not isinstance(raw, dict):
        raise StudyInputError(f"grid file {path}: expected a mapping with a 'cells' list at the top level")
    _string_keys(raw, f"grid file {path}")
    base = raw.get("base", "smoke")
    if not isinstance(base, str) or base not in BUDGETS:
        raise StudyInputError(f"grid file {path}: unknown base {base!r}; valid budgets: {', '.join(BUDGETS)}")
    unknown = set(raw) - PLAN_FIELDS - {"base", "cells", "name"}
    if unknown:
        raise StudyInputError(f"grid file {path}: unknown keys {sorted(unknown)}; allowed: "
                              f"{sorted(PLAN_FIELDS | {'base', 'cells', 'name'})}")
    cells = raw.get("cells")
    if not isinstance(cells, list) or not cells:
        raise StudyInputError(f"grid file {path}: 'cells' must be a non-empty list")
    plan = StudyPlan(name="grid", cells=[Cell("none", "full", DEFAULT_BACKBONE)], **BUDGETS[base])
    overrides = {k: raw[k] for k in raw if k in PLAN_FIELDS}
    for key, value in overrides.items():
        default = getattr(plan, key)
        if key == "input_size":
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and v >= 8 for v in value)):
                raise StudyInputError(f"grid file {path}: input_size must be a list of three integers >= 8")
            overrides[key] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise StudyInputError(f"grid file {path}: {key} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise StudyInputError(f"grid file {path}: {key} must be a {type(default).__name__}, got {value!r}")
        elif isinstance(value, (int, float)) and value < 0:
            raise StudyInputError(f"grid file {path}: {key} must be >= 0, got {value!r}")
    if isinstance(overrides.get("pretrained"), dict):  # checkpoint paths relative to the grid file
        overrides["pretrained"] = {name: str(path.parent / value) if isinstance(value, str) else value
                                   for name, value in overrides["pretrained"].items()}
    if "subjects" in overrides and "splits" not in overrides:
        overrides["splits"] = {}  # a cohort size of the file's own: split ~40/30/15/15%, not the base's splits
    name = str(raw.get("name") or path.stem)
    cells = [_cell(path, i, c) for i, c in enumerate(cells)]
    try:
        return dataclasses.replace(plan, name=name, cells=cells, **overrides)
    except StudyInputError as exc:
        raise StudyInputError(f"grid file {path}: {exc}") from None


def dump_grid_file(plan_fields: dict, cells: list[dict], path: str | Path) -> None:
    """Write a grid file (atomically) that :func:`load_grid_file` reads back."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump({**plan_fields, "cells": cells}, sort_keys=False))
