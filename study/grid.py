"""The study's grid: cells (pre-training method x fine-tuning strategy x backbone) and their budget.

``smoke`` is a tiny end-to-end run (16^3 volumes, a few trials, a couple of minutes on 2 cores);
``full`` is every registered pre-training method x every registered strategy on the default backbone,
sized for a 2-core laptop. The names come from the registries; no other list of names is kept here.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

from trainables.backbones import BACKBONES
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES
from trainables.pretrain import PRETRAIN_METHODS

DEFAULT_BACKBONE = "segresnet"


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    pretrain: str
    strategy: str
    backbone: str

    @property
    def id(self) -> str:
        return f"{self.pretrain}__{self.strategy}__{self.backbone}"

    @property
    def pretrain_key(self) -> tuple[str, str]:
        return (self.pretrain, self.backbone)

    def to_dict(self) -> dict:
        return asdict(self)


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
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cells:
            raise StudyInputError("the grid has no cells: check --methods/--strategies/--backbones")
        if self.num_samples < 1:
            raise StudyInputError(f"--num-samples must be >= 1, got {self.num_samples}")
        for cell in self.cells:
            PRETRAIN_METHODS.get(cell.pretrain)
            STRATEGIES.get(cell.strategy)
            BACKBONES.get(cell.backbone)
            if cell.backbone == "swinunetr" and any(s % 32 for s in self.input_size):
                raise StudyInputError(
                    f"cell {cell.id}: swinunetr needs an input size that is a multiple of 32, got {self.input_size}"
                )

    def backbone_width(self, backbone: str) -> int:
        return 12 * max(1, round(self.width / 12)) if backbone == "swinunetr" else self.width

    def pretrain_jobs(self) -> list[tuple[str, str]]:
        """Distinct (method, backbone) pre-training jobs, in grid order."""
        return list(dict.fromkeys(c.pretrain_key for c in self.cells))


def cross(pretrain: list[str], strategies: list[str], backbones: list[str]) -> list[Cell]:
    return [Cell(p, s, b) for b, p, s in itertools.product(backbones, pretrain, strategies)]


def smoke_plan(name: str = "smoke") -> StudyPlan:
    """A couple of minutes on 2 cores: 2 pre-training methods x 3 strategies, 16^3 volumes."""
    cells = cross(["none", "reconstruction"], ["full", "top", "lora"], [DEFAULT_BACKBONE])
    return StudyPlan(name=name, cells=cells, num_samples=1, pretrain_epochs=1, finetune_epochs=2, width=8,
                     subjects=12, spacing_mm=4.0, input_size=(16, 16, 16), grace_period=1)


def full_plan(name: str = "full") -> StudyPlan:
    """Every registered pre-training method x every registered strategy on the default backbone."""
    cells = cross(PRETRAIN_METHODS.names(), STRATEGIES.names(), [DEFAULT_BACKBONE])
    return StudyPlan(name=name, cells=cells)


GRIDS = {"smoke": smoke_plan, "full": full_plan}


def select_plan(grid: str, *, methods: list[str] | None = None, strategies: list[str] | None = None,
                backbones: list[str] | None = None, **overrides: object) -> StudyPlan:
    """The named grid, filtered by method/strategy/backbone lists and with field overrides."""
    if grid not in GRIDS:
        raise StudyInputError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    plan = GRIDS[grid]()
    for names, registry in ((methods, PRETRAIN_METHODS), (strategies, STRATEGIES), (backbones, BACKBONES)):
        for n in names or []:
            registry.get(n)
    cells = plan.cells
    if backbones:
        # a backbone filter replaces the grid's backbones, keeping its methods x strategies
        base = list(dict.fromkeys((c.pretrain, c.strategy) for c in cells))
        cells = [Cell(p, s, b) for b in backbones for p, s in base]
    cells = [c for c in cells if (not methods or c.pretrain in methods) and (not strategies or c.strategy in strategies)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(plan, cells=cells, **overrides)
