"""One study trial, Ray-free: a typed spec in, metrics out through a ``report`` callback.

The Ray Tune trainable (``trainables/tune_trainable.py``) turns Tune's plain-dict config into one of
these specs and passes ``ray.tune.report``; a benchmark or a test passes a plain function instead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from trainables import shared_storage
from trainables.backbones import BackboneConfig, build_backbone
from trainables.data import DataConfig, load_split, make_loader
from trainables.engine import TrainConfig, fit
from trainables.errors import StudyInputError
from trainables.faults import FaultInjector, faults_from_env
from trainables.finetune import STRATEGIES, TaskModule
from trainables.finetune.storage import save_finetuned, task_storage_bytes
from trainables.phases import REPEAT_PHASES
from trainables.pretrain.loop import PretrainConfig, cached_pretrain, load_checkpoint, load_meta, pretrain_key

# report(metrics, state) -> None; ``state`` returns a resumable checkpoint dict when called (it copies the
# trained parameters, so a report that does not checkpoint this epoch should not call it), or is None.
Report = Callable[[dict, Callable[[], dict] | None], None]


def _data_config(d: dict) -> DataConfig:
    d = dict(d)
    d["input_size"] = tuple(d["input_size"])
    d.setdefault("roi", "none")  # a trial config saved before registration existed (a resumed study): its crop
    return DataConfig(**d)


def _local_data(data: DataConfig) -> DataConfig:
    """The data config on this node: a cohort in an object store is read from this node's downloaded copy."""
    if not shared_storage.is_remote(data.manifest):
        return data
    folder, name = data.manifest.rstrip("/").rsplit("/", 1)
    return replace(data, manifest=str(shared_storage.fetch_tree(folder) / name))




@dataclass(frozen=True)
class CellRef:
    """Which cell a trial belongs to: its id (``study.plan.grid.cell_id``) and coordinates. A pre-training trial
    names its pre-training job (``study.plan.grid.pretrain_id``) and has no strategy."""

    id: str
    pretrain: str
    backbone: str
    strategy: str = ""
    fraction: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> CellRef:
        d = dict(d or {})
        return cls(str(d.get("id", "")), str(d.get("pretrain", "")), str(d.get("backbone", "")),
                   str(d.get("strategy", "")), float(d.get("fraction", 1.0)))


@dataclass
class PretrainTrial:
    """A pre-training trial: one (method, backbone, pre-training config), cached by its hash."""

    backbone: BackboneConfig
    pretrain: PretrainConfig
    data: DataConfig
    cache_dir: str
    data_id: str = ""
    cell: CellRef = field(default_factory=lambda: CellRef("", "", ""))
    stage = "pretrain"
    phase = ""

    @classmethod
    def from_dict(cls, d: dict) -> PretrainTrial:
        return cls(
            backbone=BackboneConfig(**d["backbone"]),
            pretrain=PretrainConfig(**d["pretrain"]),
            data=_data_config(d["data"]),
            cache_dir=d["cache_dir"],
            data_id=d.get("data_id", ""),
            cell=CellRef.from_dict(d.get("cell")),
        )

    def to_dict(self) -> dict:
        return {"stage": "pretrain", **asdict(self)}

    @property
    def epochs(self) -> int:
        return self.pretrain.epochs

    def ran_all_epochs(self, last: dict) -> bool:
        """A pre-training trial is never stopped early: it ran all its epochs if it ended without error."""
        return True


@dataclass
class FinetuneTrial:
    """A fine-tuning trial: a cell's strategy and hyperparameters on a pre-trained body.

    This and :class:`PretrainTrial` are the schema of the plain-dict trial configs Tune carries: the
    launcher writes them with ``to_dict`` and everything that reads a trial's config (the trainable, the
    tracking, scheduling, progress and resource callbacks) reads it through :func:`parse_trial`.
    """

    backbone: BackboneConfig
    strategy: str
    strategy_params: dict
    train: TrainConfig
    data: DataConfig
    pretrain_checkpoint: str | None = None
    output_dir: str | None = None  # where the fine-tuned (trained-parameters-only) model is saved
    cell: CellRef = field(default_factory=lambda: CellRef("", "", ""))
    phase: str = "search"  # search | seeds (seed re-runs) | race (a race's repeats)
    race_round: int | None = None  # the race round a repeat belongs to
    labelled_subjects: int | None = None  # labelled training subjects the cell's label fraction keeps
    checkpoint_every_s: float = 0.0  # seconds between checkpoints (0: every epoch)
    pretrained: dict | None = None  # an external checkpoint's identity (name, file, sha256, loaded fractions)
    stage = "finetune"

    def __post_init__(self) -> None:
        STRATEGIES.get(self.strategy).make_config(self.strategy_params)  # validate before any work

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneTrial:
        return cls(
            backbone=BackboneConfig(**d["backbone"]),
            strategy=d["strategy"],
            strategy_params=dict(d.get("strategy_params") or {}),
            train=TrainConfig(**d["train"]),
            data=_data_config(d["data"]),
            pretrain_checkpoint=d.get("pretrain_checkpoint"),
            output_dir=d.get("output_dir"),
            cell=CellRef.from_dict(d.get("cell")),
            phase=d.get("phase", "search"),
            race_round=d.get("race_round"),
            labelled_subjects=d.get("labelled_subjects"),
            checkpoint_every_s=float(d.get("checkpoint_every_s", 0.0)),
            pretrained=d.get("pretrained"),
        )

    def to_dict(self) -> dict:
        d = {"stage": "finetune", **asdict(self)}
        d["data"]["input_size"] = list(self.data.input_size)
        for key in ("race_round", "pretrained"):
            if d[key] is None:
                d.pop(key)
        return d

    @property
    def epochs(self) -> int:
        return self.train.epochs

    @property
    def is_repeat(self) -> bool:
        """A seed re-run or a race's repeat of a cell's best configuration (never stopped early)."""
        return self.phase in REPEAT_PHASES

    def ran_all_epochs(self, last: dict) -> bool:
        """Whether the trial's last result is its last planned epoch (False: ASHA stopped it early)."""
        return ran_all_epochs(last, self.epochs)


def ran_all_epochs(last: dict, planned: int) -> bool:
    """Whether a fine-tuning trial whose last result is ``last`` ran all its ``planned`` epochs (the one rule:
    the searcher, the tracking, the progress and the launcher's count all ask it)."""
    return int(last.get("epoch", planned)) >= planned


TrialSpec = PretrainTrial | FinetuneTrial


def parse_trial(config: dict) -> TrialSpec:
    """A plain-dict trial config -> its typed spec; raises StudyInputError for an unknown stage."""
    stage = config.get("stage")
    if stage == "pretrain":
        return PretrainTrial.from_dict(config)
    if stage == "finetune":
        return FinetuneTrial.from_dict(config)
    raise StudyInputError(f"trial config has stage {stage!r}; expected 'pretrain' or 'finetune'")


def run_pretrain(spec: PretrainTrial, report: Report) -> dict:
    """Pre-train (or reuse the cached checkpoint); reports every epoch, the last report has the path."""
    loader = make_loader(load_split(spec.data, "pretrain"), spec.pretrain.batch_size, shuffle=True,
                         seed=spec.pretrain.seed)
    epochs: list[dict] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        if epoch < spec.pretrain.epochs:
            report({**metrics, "epoch": epoch}, None)
        epochs.append(metrics)

    if shared_storage.is_remote(spec.cache_dir):
        path, result = _remote_cached_pretrain(spec, loader, on_epoch)
    else:
        path, result = cached_pretrain(spec.cache_dir, spec.backbone, spec.pretrain, loader, spec.data_id,
                                       on_epoch=on_epoch)
    final = dict(result.final) if result is not None else dict(load_meta(shared_storage.fetch(path)).get("final", {}))
    final.update(checkpoint_path=str(path), cache_hit=float(result is None), epoch=spec.pretrain.epochs)
    report(final, None)
    return final


def _remote_cached_pretrain(spec: PretrainTrial, loader, on_epoch) -> tuple[str, object]:
    """:func:`cached_pretrain` against a cache in an object store, through this node's local mirror of it.

    A checkpoint already in the store is downloaded (``body.pt``, then ``meta.json``, the completion
    marker); a new one is trained locally and uploaded in the same order. Returns the store's URI of
    ``body.pt`` and the training result (``None`` on a cache hit).
    """
    key = pretrain_key(spec.backbone, spec.pretrain, spec.data_id)
    remote, mirror = shared_storage.join(spec.cache_dir, key), shared_storage.local_mirror(spec.cache_dir)
    names = ("body.pt", "meta.json")
    if shared_storage.exists(shared_storage.join(remote, "meta.json")):
        for name in names:
            shared_storage.get_file(shared_storage.join(remote, name), mirror / key / name)
    path, result = cached_pretrain(mirror, spec.backbone, spec.pretrain, loader, spec.data_id, on_epoch=on_epoch)
    if result is not None:
        for name in names:
            shared_storage.put_file(path.parent / name, shared_storage.join(remote, name))
    return shared_storage.join(remote, "body.pt"), result


def initial_model(spec: FinetuneTrial) -> torch.nn.Module:
    """The seeded backbone with the pre-trained body loaded (if any), before the strategy is applied."""
    torch.manual_seed(spec.train.seed)
    model = build_backbone(spec.backbone, spec.data.task_spec)
    if spec.pretrain_checkpoint:
        local = shared_storage.find(spec.pretrain_checkpoint)  # this node's copy when it lies in an object store
        if local is None:
            raise StudyInputError(f"pre-training checkpoint {spec.pretrain_checkpoint} does not exist")
        model.load_body(load_checkpoint(local))
    return model


def apply_strategy(model: torch.nn.Module, spec: FinetuneTrial) -> torch.nn.Module:
    strategy = STRATEGIES.get(spec.strategy)
    return strategy.apply(model, strategy.make_config(spec.strategy_params))


def run_finetune(spec: FinetuneTrial, report: Report, resume: dict | None = None, cell_id: str = "",
                 phase: str = "") -> dict:
    """Fine-tune and evaluate; reports every epoch (``score`` = validation selection score).

    ``cell_id`` and ``phase`` select the faults of ``STUDY_INJECT_FAULTS`` that apply (see :mod:`trainables.faults`).
    """
    train = load_split(spec.data, "train")
    loaders = {
        "train": make_loader(train, spec.train.batch_size, shuffle=True, seed=spec.train.seed, augment=True),
        "val": make_loader(load_split(spec.data, "val"), spec.train.batch_size, shuffle=False, seed=0),
        "test": make_loader(load_split(spec.data, "test"), spec.train.batch_size, shuffle=False, seed=0),
    }
    strategy = STRATEGIES.get(spec.strategy)
    if strategy.needs_teacher and not spec.strategy_params.get("teacher"):
        raise StudyInputError(f"strategy {spec.strategy!r} learns from a teacher model, and cell {spec.cell.id} has "
                              "none: the study gives it its teacher cell's best model (strategy_params.teacher)")
    base = initial_model(spec)
    initial_body = base.body_fingerprint()  # which weights the trial started from (an MLflow tag)
    model = apply_strategy(base, spec)
    storage = task_storage_bytes(model)
    schedule = None
    if strategy.schedule is not None:  # a staged strategy: its two phases
        schedule = strategy.schedule(model, strategy.make_config(spec.strategy_params), spec.train.epochs)
    injector = FaultInjector(model, faults_from_env(cell_id, phase), start_epoch=int(resume["epoch"]) + 1 if resume else 1)

    extra = {k: v for m in model.modules() if isinstance(m, TaskModule) for k, v in m.metrics().items()}

    def on_epoch(epoch: int, metrics: dict, state: Callable[[], dict]) -> None:
        injector.epoch_done(epoch)
        metrics.update(extra)  # what a strategy's own modules say about the model (e.g. a student's size)
        metrics["task_storage_bytes"] = storage
        metrics["initial_body_sha256"] = initial_body
        for key in ("val_cases", "test_cases"):  # one JSON text: Tune's loggers skip text, not hundreds of rows
            if key in metrics:
                metrics[key] = json.dumps(metrics[key])
        if epoch == spec.train.epochs and spec.output_dir:
            metrics["model_path"] = _save_model(model, spec)
        if epoch == spec.train.epochs:  # which labelled subjects it trained on (a label fraction keeps part)
            metrics["train_subjects"] = ",".join(train.subject_ids)
        report(metrics, state)

    result = fit(model, loaders["train"], loaders["val"], spec.train, spacing_mm=train.spacing_mm,
                 test_loader=loaders["test"], on_epoch=on_epoch, resume=resume, task=spec.data.task_spec,
                 schedule=schedule)
    return result.final


def _save_model(model: torch.nn.Module, spec: FinetuneTrial) -> str:
    """Save the trained parameters to ``output_dir/model.pt`` (uploaded when that is an object store)."""
    remote = shared_storage.is_remote(spec.output_dir)
    folder = Path(tempfile.mkdtemp(prefix="model-")) if remote else Path(spec.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    save_finetuned(
        model,
        path,
        backbone_cfg=spec.backbone.to_dict(),
        strategy=spec.strategy,
        strategy_cfg=spec.strategy_params,
        pretrain_ref=spec.pretrain_checkpoint,
    )
    if not remote:
        return str(path)
    try:
        return shared_storage.put_file(path, shared_storage.join(spec.output_dir, "model.pt"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_trial(config: dict, report: Report, resume: dict | None = None) -> dict:
    """Dispatch a plain-dict trial config (``stage`` = pretrain | finetune) to its runner."""
    spec = parse_trial(config)
    if isinstance(spec, PretrainTrial):
        return run_pretrain(replace(spec, data=_local_data(spec.data)), report)
    return run_finetune(replace(spec, data=_local_data(spec.data)), report, resume, cell_id=spec.cell.id,
                        phase=spec.phase)
