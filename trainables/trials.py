"""One study trial, Ray-free: a typed spec in, metrics out through a ``report`` callback.

The Ray Tune trainable (``trainables/tune_trainable.py``) turns Tune's plain-dict config into one of
these specs and passes ``ray.tune.report``; a benchmark or a test passes a plain function instead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainables import shared
from trainables.backbones import BackboneConfig, build_backbone
from trainables.data import DataConfig, load_split, make_loader
from trainables.engine import TrainConfig, fit
from trainables.errors import StudyInputError
from trainables.faults import FaultInjector, faults_from_env
from trainables.finetune import STRATEGIES
from trainables.finetune.storage import save_finetuned, task_storage_bytes
from trainables.pretrain.loop import PretrainConfig, cached_pretrain, load_checkpoint, load_meta, pretrain_key

# report(metrics, state) -> None; ``state`` returns a resumable checkpoint dict when called (it copies the
# trained parameters, so a report that does not checkpoint this epoch should not call it), or is None.
Report = Callable[[dict, Callable[[], dict] | None], None]


def _data_config(d: dict) -> DataConfig:
    d = dict(d)
    d["input_size"] = tuple(d["input_size"])
    d.setdefault("roi", "none")  # a trial config saved before registration existed (a resumed study): its crop
    if shared.is_remote(d["manifest"]):  # a cohort in an object store: this node's downloaded copy
        folder, name = d["manifest"].rstrip("/").rsplit("/", 1)
        d["manifest"] = str(shared.fetch_tree(folder) / name)
    return DataConfig(**d)


@dataclass
class PretrainTrial:
    """A pre-training trial: one (method, backbone, pre-training config), cached by its hash."""

    backbone: BackboneConfig
    pretrain: PretrainConfig
    data: DataConfig
    cache_dir: str
    data_id: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> PretrainTrial:
        return cls(
            backbone=BackboneConfig(**d["backbone"]),
            pretrain=PretrainConfig(**d["pretrain"]),
            data=_data_config(d["data"]),
            cache_dir=d["cache_dir"],
            data_id=d.get("data_id", ""),
        )

    def to_dict(self) -> dict:
        return {"stage": "pretrain", **asdict(self)}


@dataclass
class FinetuneTrial:
    """A fine-tuning trial: a cell's strategy and hyperparameters on a pre-trained body."""

    backbone: BackboneConfig
    strategy: str
    strategy_params: dict
    train: TrainConfig
    data: DataConfig
    pretrain_checkpoint: str | None = None
    output_dir: str | None = None  # where the fine-tuned (trained-parameters-only) model is saved
    extra: dict = field(default_factory=dict)

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
        )

    def to_dict(self) -> dict:
        return {"stage": "finetune", **asdict(self)}


def run_pretrain(spec: PretrainTrial, report: Report) -> dict:
    """Pre-train (or reuse the cached checkpoint); reports every epoch, the last report has the path."""
    loader = make_loader(load_split(spec.data, "pretrain"), spec.pretrain.batch_size, shuffle=True,
                         seed=spec.pretrain.seed)
    epochs: list[dict] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        if epoch < spec.pretrain.epochs:
            report({**metrics, "epoch": epoch}, None)
        epochs.append(metrics)

    if shared.is_remote(spec.cache_dir):
        path, result = _remote_cached_pretrain(spec, loader, on_epoch)
    else:
        path, result = cached_pretrain(spec.cache_dir, spec.backbone, spec.pretrain, loader, spec.data_id,
                                       on_epoch=on_epoch)
    final = dict(result.final) if result is not None else dict(load_meta(shared.fetch(path)).get("final", {}))
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
    remote, mirror = shared.join(spec.cache_dir, key), shared.local_mirror(spec.cache_dir)
    names = ("body.pt", "meta.json")
    if shared.exists(shared.join(remote, "meta.json")):
        for name in names:
            shared.get_file(shared.join(remote, name), mirror / key / name)
    path, result = cached_pretrain(mirror, spec.backbone, spec.pretrain, loader, spec.data_id, on_epoch=on_epoch)
    if result is not None:
        for name in names:
            shared.put_file(path.parent / name, shared.join(remote, name))
    return shared.join(remote, "body.pt"), result


def initial_model(spec: FinetuneTrial) -> torch.nn.Module:
    """The seeded backbone with the pre-trained body loaded (if any), before the strategy is applied."""
    torch.manual_seed(spec.train.seed)
    model = build_backbone(spec.backbone, spec.data.task_spec)
    if spec.pretrain_checkpoint:
        local = shared.find(spec.pretrain_checkpoint)  # this node's copy when it lies in an object store
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
    base = initial_model(spec)
    initial_body = base.body_fingerprint()  # which weights the trial started from (an MLflow tag)
    model = apply_strategy(base, spec)
    storage = task_storage_bytes(model)
    injector = FaultInjector(model, faults_from_env(cell_id, phase), start_epoch=int(resume["epoch"]) + 1 if resume else 1)

    def on_epoch(epoch: int, metrics: dict, state: Callable[[], dict]) -> None:
        injector.epoch_done(epoch)
        metrics["task_storage_bytes"] = storage
        metrics["initial_body_sha256"] = initial_body
        if "test_cases" in metrics:  # one JSON text: Tune's loggers skip text, not a list of hundreds of rows
            metrics["test_cases"] = json.dumps(metrics["test_cases"])
        if epoch == spec.train.epochs and spec.output_dir:
            metrics["model_path"] = _save_model(model, spec)
        if epoch == spec.train.epochs:  # which labelled subjects it trained on (a label fraction keeps part)
            metrics["train_subjects"] = ",".join(train.subject_ids)
        report(metrics, state)

    result = fit(model, loaders["train"], loaders["val"], spec.train, spacing_mm=train.spacing_mm,
                 test_loader=loaders["test"], on_epoch=on_epoch, resume=resume, task=spec.data.task_spec)
    return result.final


def _save_model(model: torch.nn.Module, spec: FinetuneTrial) -> str:
    """Save the trained parameters to ``output_dir/model.pt`` (uploaded when that is an object store)."""
    remote = shared.is_remote(spec.output_dir)
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
        return shared.put_file(path, shared.join(spec.output_dir, "model.pt"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_trial(config: dict, report: Report, resume: dict | None = None) -> dict:
    """Dispatch a plain-dict trial config (``stage`` = pretrain | finetune) to its runner."""
    stage = config.get("stage")
    if stage == "pretrain":
        return run_pretrain(PretrainTrial.from_dict(config), report)
    if stage == "finetune":
        return run_finetune(FinetuneTrial.from_dict(config), report, resume, cell_id=config.get("cell", {}).get("id", ""),
                            phase=config.get("phase", ""))
    raise StudyInputError(f"trial config has stage {stage!r}; expected 'pretrain' or 'finetune'")
