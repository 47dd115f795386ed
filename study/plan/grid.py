"""The study's grid: cells (pre-training method x fine-tuning strategy x backbone) and their budget.

A *grid* says which cells (``smoke``: 2 methods x 3 strategies; ``full``: every registered method x
every registered strategy; or a grid file), a *budget* how big (``smoke``, ``laptop``, ``paper``).
The names come from the registries; no other list of names is kept here.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainables.backbones import BACKBONES, backbone_info
from trainables.data import labelled_count  # noqa: F401 - the launcher and the report count labels with it
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES
from trainables.pretrain import PRETRAIN_METHODS

DEFAULT_BACKBONE = "segresnet"
DEFAULT_TEACHER_STRATEGY = "full"  # a distillation cell learns from this strategy's cell unless it names one


@dataclass(frozen=True)
class Cell:
    """One cell of the grid.

    Args:
        pretrain, strategy, backbone: registered names.
        num_samples: trials for this cell (default: the plan's ``num_samples``).
        params: fixed hyperparameters ``{"train": {...}, "strategy_params": {...}}``: the cell is not
            searched, every trial uses these (with its own seed), e.g. from ``best_configs.yaml``.
    """

    pretrain: str
    strategy: str
    backbone: str
    num_samples: int | None = field(default=None, compare=False)
    params: dict | None = field(default=None, compare=False, hash=False)
    fraction: float = 1.0  # share of the labelled training subjects the cell fine-tunes on (--label-fractions)
    teacher: str | None = field(default=None, compare=False)  # a distillation cell's teacher cell (None: default)

    @property
    def id(self) -> str:
        return cell_id(self.pretrain, self.strategy, self.backbone, self.fraction)

    @property
    def pretrain_key(self) -> tuple[str, str]:
        """(method, backbone): the pre-training job this cell fine-tunes from."""
        return (self.pretrain, self.backbone)

    @property
    def pretrain_id(self) -> str:
        """The pre-training job's id (:func:`pretrain_id`)."""
        return pretrain_id(self.pretrain, self.backbone)

    @property
    def teacher_id(self) -> str | None:
        """A distillation cell's teacher: the named cell, else the same pre-training, backbone and label fraction
        fine-tuned with ``full``; None for a strategy without a teacher."""
        if not STRATEGIES.get(self.strategy).needs_teacher:
            return None
        return self.teacher or cell_id(self.pretrain, DEFAULT_TEACHER_STRATEGY, self.backbone, self.fraction)

    def to_dict(self) -> dict:
        return {"pretrain": self.pretrain, "strategy": self.strategy, "backbone": self.backbone,
                "fraction": self.fraction, **({"teacher": self.teacher} if self.teacher else {})}


def pretrain_id(method: str, backbone: str) -> str:
    """``method__backbone``: a pre-training job's id (its trials' cell id, the searcher's checkpoint key, an
    external checkpoint's key)."""
    return f"{method}__{backbone}"


def cell_id(pretrain: str, strategy: str, backbone: str, fraction: float = 1.0) -> str:
    """``pretrain__strategy__backbone``, with ``__f<fraction>`` when the cell uses part of the labels."""
    base = f"{pretrain}__{strategy}__{backbone}"
    return base if float(fraction) == 1.0 else f"{base}__f{float(fraction):g}"




OPTIMISER_SETTINGS = ("lr", "weight_decay")  # the pre-training settings of pretrain_params outside the method


@dataclass
class StudyPlan:
    """Everything the launcher needs to run a study: cells, trial counts, sizes, epochs.

    Args:
        name: the study's name (MLflow experiment, default output folder).
        cells: the grid's cells.
        num_samples: Optuna trials per cell.
        pretrain_epochs: epochs of each pre-training trial.
        finetune_epochs: epochs of each fine-tuning trial.
        width: base channels of the backbones.
        batch_size: volumes per step.
        subjects: subjects of the embedded cohort (ignored with a user manifest).
        spacing_mm: voxel spacing the volumes are resampled to.
        input_size: model input size (voxels per side).
        seed: the study's seed (cohort, Optuna samplers, trial seeds).
        grace_period: epochs every fine-tuning trial runs before ASHA may stop it.
        seeds: after a cell's search, re-run its best configuration with this many new seeds (0 = no);
            uniform repeats for every cell, instead of a race.
        race: after the search, race the cells that can still be the best (:mod:`study.evidence.racing`): re-run
            their best configurations a seed at a time and drop each as soon as it is shown worse.
        race_trials: the race's budget in repeats (0: no limit on repeats).
        race_minutes: the race's budget in minutes (0: no limit on time). With both 0 there is no race.
        confirm_runs: after the choice on validation (the race's, else the search's), fresh runs of the chosen
            cell's and the reference's configurations, whose test results confirm the choice
            (:func:`study.evidence.inference.confirm`; 0: no confirmation, the report then says the test figures
            are measured after selection). A resolved difference needs 3 on each side.
        reference: the cell the chosen one is confirmed against (None: ``none__full__<first backbone>``, training
            from scratch, when the grid has it).
        splits: subjects per split of the embedded cohort (``pretrain``, ``train``, ``val``, ``test``);
            replaces ``subjects`` (empty: ~40/30/15/15% of ``subjects``).
        pretrain_params: per pre-training method, settings that replace its defaults: ``lr`` and
            ``weight_decay`` of the pre-training optimiser and any field of the method's config, e.g.
            ``{"contrastive": {"temperature": 0.2, "lr": 3e-4}}``. Pre-training is not searched: one
            checkpoint per (method, backbone, these settings) serves every cell of the method.
        pretrained: external checkpoints as pre-training methods, ``{NAME: PATH}`` (a .pt/.pth/.ckpt file or
            a pre-training cache folder): every cell with ``pretrain`` NAME fine-tunes from the weights at
            PATH (:mod:`trainables.pretrained`) instead of a pre-training trial. NAME must not be a
            registered method's name.
        label_fractions: shares of the labelled training subjects, e.g. ``[0.1, 0.25, 1.0]``: every cell runs
            at each (nested subsets, the same subjects for every cell at a study seed); empty: all labels.
        left_out: the cells a preset grid left out because their strategy cannot run on their backbone at
            this width (cell id -> the reason); the launcher logs them.
    """

    name: str
    cells: list[Cell]
    num_samples: int = 2
    pretrain_epochs: int = 3
    finetune_epochs: int = 4
    width: int = 16
    batch_size: int = 2
    subjects: int = 24
    spacing_mm: float = 2.0
    input_size: tuple[int, int, int] = (32, 32, 32)
    seed: int = 0
    grace_period: int = 2
    seeds: int = 0
    race: bool = True
    race_trials: int = 0
    race_minutes: float = 0.0
    confirm_runs: int = 0
    reference: str | None = None
    pretrain_params: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    pretrained: dict = field(default_factory=dict)
    label_fractions: list = field(default_factory=list)
    left_out: dict = field(default_factory=dict)  # cell id -> why a preset grid left it out at this width

    def __post_init__(self) -> None:
        self.pretrained = check_pretrained(self.pretrained)
        self.label_fractions = check_fractions(self.label_fractions)
        if self.splits:
            from trainables.data import check_splits

            self.splits = check_splits(self.splits)
            self.subjects = sum(self.splits.values())
        if not self.cells:
            raise StudyInputError("the grid has no cells: check --methods/--strategies/--backbones")
        twice = sorted({c.id for c in self.cells if sum(d.id == c.id for d in self.cells) > 1})
        if twice:
            raise StudyInputError(f"the grid names cell(s) {', '.join(twice)} more than once; a cell is one "
                                  "(pretrain, strategy, backbone): keep one entry of each, with num_samples for "
                                  "more trials")
        for method, params in self.pretrain_params.items():
            self.pretrain_settings(method, params)  # unknown methods and fields are refused here
        if self.num_samples < 1:
            raise StudyInputError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.race_trials < 0 or self.race_minutes < 0:
            raise StudyInputError(f"the race budget must be >= 0, got {self.race_trials} trials, "
                                  f"{self.race_minutes} minutes")
        if self.confirm_runs < 0:
            raise StudyInputError(f"confirm_runs must be >= 0, got {self.confirm_runs}")
        ids = {c.id for c in self.cells}
        if self.reference is not None and self.reference not in ids:
            raise StudyInputError(f"reference {self.reference!r} is not a cell of this study; its cells: "
                                  f"{', '.join(sorted(ids)[:20])}")
        for cell in self.cells:
            if cell.pretrain not in self.pretrained:
                PRETRAIN_METHODS.get(cell.pretrain)
            STRATEGIES.get(cell.strategy)
            info = backbone_info(cell.backbone)
            if not info.fits(tuple(self.input_size)):
                raise StudyInputError(
                    f"cell {cell.id}: {cell.backbone} needs an input size that is a multiple of {info.input_multiple}, "
                    f"got {tuple(self.input_size)}")
            why = STRATEGIES.get(cell.strategy).why_unfit(cell.backbone, self.backbone_width(cell.backbone),
                                                          (cell.params or {}).get("strategy_params"))
            if why:
                raise StudyInputError(f"cell {cell.id}: {why}")
            teacher = cell.teacher_id
            if teacher is not None and teacher not in ids:
                raise StudyInputError(
                    f"cell {cell.id} learns from its teacher cell {teacher}, which is not in the grid: add strategy "
                    f"{DEFAULT_TEACHER_STRATEGY} (e.g. --strategies {DEFAULT_TEACHER_STRATEGY},{cell.strategy}) or "
                    "name a teacher cell of the grid (a grid file cell's teacher:)")

    def pretrain_settings(self, method: str, params: dict | None = None) -> dict:
        """The PretrainConfig fields ``pretrain_params`` sets for ``method``: optimiser ones and ``method_params``."""
        from trainables.pretrain import method_config

        try:
            PRETRAIN_METHODS.get(method)
        except StudyInputError as exc:
            raise StudyInputError(f"pretrain_params: {exc}") from None
        params = self.pretrain_params.get(method, {}) if params is None else params
        if not isinstance(params, dict):
            raise StudyInputError(f"pretrain_params.{method} must be a mapping of setting -> value, got {params!r}")
        settings = {k: params[k] for k in OPTIMISER_SETTINGS if k in params}
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise StudyInputError(f"pretrain_params.{method}.{key} must be a number >= 0, got {value!r}")
        method_params = {k: v for k, v in params.items() if k not in OPTIMISER_SETTINGS}
        try:
            method_config(method, method_params)
        except (StudyInputError, TypeError, ValueError) as exc:
            raise StudyInputError(f"pretrain_params.{method}: {exc}") from None
        return {**settings, "method_params": method_params}

    @property
    def racing(self) -> bool:
        """A race follows the search: racing is on, it has a budget and no uniform seed re-runs replace it."""
        return bool(self.race and not self.seeds and (self.race_trials > 0 or self.race_minutes > 0))

    def reference_cell(self) -> str | None:
        """The cell the others are compared with: ``reference``, else ``none__full__<first backbone>`` when the
        grid has it, else None."""
        if self.reference:
            return self.reference
        default = f"none__full__{self.cells[0].backbone}"
        return default if any(c.id == default for c in self.cells) else None

    def samples(self, cell: Cell) -> int:
        """Search trials of ``cell``."""
        return cell.num_samples or self.num_samples

    def total_trials(self) -> int:
        """Pre-training jobs + every cell's search trials + the seed re-runs (a race's repeats are not
        known in advance: at most ``race_trials``)."""
        return len(self.pretrain_jobs()) + sum(self.samples(c) + self.seeds for c in self.cells)

    def backbone_width(self, backbone: str) -> int:
        """The plan's width rounded to the backbone's ``width_step`` (SwinUNETR: a multiple of 12)."""
        return rounded_width(backbone, self.width)

    def pretrain_jobs(self) -> list[tuple[str, str]]:
        """Distinct (method, backbone) pre-training jobs, in grid order.

        Methods that train nothing (``none``: random initialisation) need no job: their cells start at
        once, each fine-tuning trial building its own seeded initial network.
        """
        jobs = dict.fromkeys(c.pretrain_key for c in self.cells
                             if c.pretrain not in self.pretrained and PRETRAIN_METHODS.get(c.pretrain).trains)
        return list(jobs)

    def external_jobs(self) -> list[tuple[str, str]]:
        """Distinct (external checkpoint name, backbone) pairs of the grid, in grid order."""
        return list(dict.fromkeys(c.pretrain_key for c in self.cells if c.pretrain in self.pretrained))


def rounded_width(backbone: str, width: int) -> int:
    """``width`` rounded to the backbone's ``width_step`` (SwinUNETR: a multiple of 12)."""
    step = backbone_info(backbone).width_step
    return step * max(1, round(width / step))


def check_fractions(fractions: object) -> list[float]:
    """Label fractions, validated: numbers in (0, 1], each once; returned in ascending order."""
    if fractions is None:
        return []
    if not isinstance(fractions, (list, tuple)):
        raise StudyInputError(f"label_fractions must be a list of numbers in (0, 1], e.g. [0.1, 0.25, 1.0], "
                              f"got {fractions!r}")
    out = []
    for value in fractions:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise StudyInputError(f"label fraction {value!r} must be a number in (0, 1], e.g. 0.25 for a quarter "
                                  "of the labelled training subjects")
        if float(value) in out:
            raise StudyInputError(f"label fraction {value!r} is given twice; give each fraction once")
        out.append(float(value))
    return sorted(out)


_EXTERNAL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(_[A-Za-z0-9-]+)*$")


def check_pretrained(pretrained: object) -> dict[str, str]:
    """``{NAME: PATH}`` of external checkpoints, validated: names are new, plain and unique; paths exist."""
    from trainables.pretrained import checkpoint_file

    if not isinstance(pretrained, dict):
        raise StudyInputError(f"pretrained must map NAME -> checkpoint path, got {pretrained!r}")
    out = {}
    for name, path in pretrained.items():
        if not isinstance(name, str) or not _EXTERNAL_NAME.match(name):
            raise StudyInputError(f"pretrained name {name!r}: use letters, digits, '-' and single '_' starting with "
                                  "a letter, e.g. suprem_segresnet")
        if name in PRETRAIN_METHODS.names():
            raise StudyInputError(f"pretrained name {name!r} is a registered pre-training method; choose another "
                                  f"name for the checkpoint, e.g. {name}_ext")
        if not isinstance(path, (str, Path)) or not str(path):
            raise StudyInputError(f"pretrained {name}: give the checkpoint's path, got {path!r}")
        checkpoint_file(path)  # exists, or one line saying what to give
        out[name] = str(Path(path).resolve())
    return out


def cross(pretrain: list[str], strategies: list[str], backbones: list[str]) -> list[Cell]:
    """Every method x strategy x backbone, except that a strategy building its own network from scratch
    (``from_scratch``: the distillation student's label-only twin) meets only ``none``: pre-training would not
    reach it."""
    return [Cell(p, s, b) for b, p, s in itertools.product(backbones, pretrain, strategies)
            if p == "none" or not STRATEGIES.get(s).from_scratch]


# Budgets: the sizes and counts a grid is run at. Wall times are measured in bench/ (see README).
BUDGETS: dict[str, dict] = {
    # the whole path in a couple of minutes on 2 cores
    # (no race: its 2 test subjects cannot separate anything; --race-budget N turns one on)
    "smoke": dict(num_samples=1, pretrain_epochs=1, finetune_epochs=2, width=8, spacing_mm=4.0,
                  input_size=(16, 16, 16), grace_period=1, race_trials=0,
                  splits={"pretrain": 4, "train": 4, "val": 2, "test": 2}),
    # the full grid on a 2-core laptop: 16^3 at 4 mm (the 64 mm crop box), narrow networks. The training split
    # and the epochs were calibrated with bench/calibrate.py (its figures: bench/results/calibrate.json): 64
    # labelled subjects is where from-scratch none x full learns both to segment and to call presence in 10
    # epochs; 160 unlabelled subjects for pre-training; each trial keeps its best epoch.
    # The race after the search may run 12 repeats (3 rounds of the 4 best cells on validation), then the chosen
    # cell and the reference get 3 confirmation runs each; 100 validation subjects to choose on, 120 to confirm on.
    "laptop": dict(num_samples=2, pretrain_epochs=6, finetune_epochs=10, width=8, spacing_mm=4.0,
                   input_size=(16, 16, 16), grace_period=4, race_trials=12, confirm_runs=3,
                   splits={"pretrain": 160, "train": 64, "val": 100, "test": 120}),
    # a GPU cluster: 1 mm template resolution, every backbone, tens of epochs and trials per cell
    "paper": dict(num_samples=20, pretrain_epochs=50, finetune_epochs=40, width=24, spacing_mm=1.0,
                  input_size=(64, 64, 64), grace_period=8, race_trials=100, confirm_runs=5,
                  splits={"pretrain": 400, "train": 64, "val": 100, "test": 200}),
}


def default_budget() -> str:
    """``paper`` where torch sees a GPU, ``laptop`` otherwise."""
    import torch

    return "paper" if torch.cuda.is_available() else "laptop"


def smoke_grid(name: str = "smoke", budget: str = "smoke") -> StudyPlan:
    """2 pre-training methods x 3 strategies on the default backbone."""
    cells = cross(["none", "reconstruction"], ["full", "top", "lora"], [DEFAULT_BACKBONE])
    return StudyPlan(name=name, cells=cells, **BUDGETS[budget])


def full_grid(name: str = "full", budget: str = "laptop") -> StudyPlan:
    """Every registered pre-training method x every registered strategy; every backbone at the paper budget."""
    backbones = BACKBONES.names() if budget == "paper" else [DEFAULT_BACKBONE]
    cells = cross(PRETRAIN_METHODS.names(), STRATEGIES.names(), backbones)
    return StudyPlan(name=name, cells=cells, **BUDGETS[budget])


def leave_out_unfit(cells: list[Cell], width: int) -> tuple[list[Cell], dict[str, str]]:
    """The cells whose strategy can run on their backbone at ``width``, and the others' ids with the reason
    (e.g. a distillation student that could not be narrower than its teacher)."""
    kept, left_out = [], {}
    for cell in cells:
        why = STRATEGIES.get(cell.strategy).why_unfit(cell.backbone, rounded_width(cell.backbone, width))
        if why:
            left_out[cell.id] = why
        else:
            kept.append(cell)
    return kept, left_out


GRIDS = {"smoke": smoke_grid, "full": full_grid}
GRID_DEFAULT_BUDGET = {"smoke": "smoke"}


def select_plan(grid: str, *, budget: str | None = None, methods: list[str] | None = None,
                strategies: list[str] | None = None, backbones: list[str] | None = None,
                **overrides: object) -> StudyPlan:
    """The named grid (or grid file) at a budget, filtered by method/strategy/backbone lists and with
    field overrides."""
    if budget is not None and budget not in BUDGETS:
        raise StudyInputError(f"unknown budget {budget!r}; valid budgets: {', '.join(BUDGETS)}")
    if Path(grid).is_dir():
        raise StudyInputError(f"--grid {grid} is a folder, not a file; give a grid FILE.yaml (such as a report's "
                              f"best_configs.yaml) or a preset: {', '.join(GRIDS)}")
    if grid.endswith((".yaml", ".yml")):
        from study.plan.grid_file import load_grid_file

        plan = load_grid_file(grid)
        if budget is not None:
            plan = replace(plan, **BUDGETS[budget])
    elif grid not in GRIDS:
        raise StudyInputError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}, or a FILE.yaml")
    else:
        plan = GRIDS[grid](grid, budget or GRID_DEFAULT_BUDGET.get(grid) or default_budget())
    pretrained = check_pretrained({**plan.pretrained, **dict(overrides.pop("pretrained", None) or {})})
    for names, registry in ((methods, PRETRAIN_METHODS), (strategies, STRATEGIES), (backbones, BACKBONES)):
        for n in names or []:
            if registry is not PRETRAIN_METHODS or n not in pretrained:
                registry.get(n)
    cells = plan.cells
    new = [name for name in pretrained if name not in {c.pretrain for c in cells}]
    if new:  # an external checkpoint from --pretrained joins the grid as a method: every strategy x backbone
        pairs = list(dict.fromkeys((c.strategy, c.backbone) for c in cells if not STRATEGIES.get(c.strategy).from_scratch))
        cells = [*cells, *(Cell(name, s, b) for name in new for s, b in pairs)]
    if backbones:
        # a backbone filter replaces the grid's backbones, keeping its methods x strategies
        base = list(dict.fromkeys((c.pretrain, c.strategy) for c in cells))  # teachers: the default ones
        cells = [Cell(p, s, b) for b in backbones for p, s in base]  # per-cell params do not carry over
    cells = [c for c in cells if (not methods or c.pretrain in methods or c.pretrain in new)
             and (not strategies or c.strategy in strategies)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    left_out: dict[str, str] = {}
    if not grid.endswith((".yaml", ".yml")):  # a preset crosses everything: leave out what cannot run at this width
        cells, left_out = leave_out_unfit(cells, int(overrides.get("width", plan.width)))
        if not cells and left_out:
            raise StudyInputError(f"no cell of the grid can run: {next(iter(left_out.values()))}")
    fractions = check_fractions(overrides.pop("label_fractions", None) or plan.label_fractions)
    if fractions:  # every cell at each share of the labelled training subjects
        cells = [*(replace(c, fraction=f) for f in fractions for c in cells if c.fraction == 1.0),
                 *(c for c in cells if c.fraction != 1.0)]
    return replace(plan, cells=cells, pretrained=pretrained, label_fractions=fractions, left_out=left_out, **overrides)
