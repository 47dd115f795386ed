"""The Ray-free pre-training loop and its checkpoint cache.

``pretrain`` trains any registered objective (one AdamW optimiser per player, i.e. per loss key) and
returns the body's weights; ``cached_pretrain`` stores them under a hash of everything that
determines them, so a second trial with the same pre-training config reuses the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainables.atomic import atomic_write
from trainables.backbones import HEAD_ONLY_FIELDS, BackboneConfig, build_backbone
from trainables.engine import (
    NonFiniteLossError,
    PeakMemory,
    resolve_device,
    seed_everything,
    step_tensor_peak_mb,
)
from trainables.errors import StudyInputError
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, build_objective, check, method_config

CODE_VERSION = "pretrain-1"  # bump when a change to the objectives or this loop changes what a config trains
_TRAINING_FIELDS = ("epochs", "batch_size", "lr", "weight_decay")


@dataclass
class PretrainConfig:
    """How to pre-train.

    Args:
        method: registered pre-training method (``none`` = random initialisation, no training).
        method_params: fields of the method's config (defaults for those left out).
        epochs: passes over the loader.
        batch_size: volumes per batch; the caller builds the loader with it (it is part of the cache key).
        lr: AdamW learning rate (the adversarial discriminator's is scaled by its ``disc_lr_ratio``).
        weight_decay: AdamW weight decay.
        seed: seeds the initialisation and the objectives' randomness.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; not part of the cache key.
    """

    method: str = "reconstruction"
    method_params: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        method_config(self.method, self.method_params)  # unknown method or bad parameters -> StudyInputError
        check(
            isinstance(self.epochs, int) and self.epochs >= 1,
            f"pre-training epochs must be >= 1, got {self.epochs!r}",
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"pre-training batch_size must be >= 1, got {self.batch_size!r}",
        )
        check(
            self.method != "contrastive" or self.batch_size >= 2,
            "contrastive pre-training needs batch_size >= 2 (the negatives come from the batch)",
        )
        check(
            isinstance(self.lr, (int, float)) and 0 < self.lr < 1,
            f"pre-training lr must be in (0, 1), got {self.lr!r}",
        )
        check(self.weight_decay >= 0, f"pre-training weight_decay must be >= 0, got {self.weight_decay!r}")
        check(isinstance(self.seed, int), f"pre-training seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PretrainResult:
    """The body's weights (on the CPU), one metrics row per epoch, and the final numbers."""

    body_state: dict[str, torch.Tensor]
    history: list[dict]
    final: dict


def make_optimizers(objective: PretrainObjective, cfg: PretrainConfig) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per player (loss key), in the objective's order."""
    return {
        name: torch.optim.AdamW(params, lr=cfg.lr * objective.lr_scale(name), weight_decay=cfg.weight_decay)
        for name, params in objective.players().items()
    }


def train_step(
    objective: PretrainObjective, optimizers: dict[str, torch.optim.Optimizer], images: torch.Tensor
) -> dict[str, float]:
    """One forward, then each player's loss back-propagated into its own parameters only, then every step.

    All gradients are taken at the same weights (simultaneous updates), so a later player's graph is
    never invalidated by an earlier player's step. Raises :class:`NonFiniteLossError` on NaN/Inf.
    """
    losses = objective(images)
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(f"pre-training {name} is {value.item()}: the trial diverged")
    names = list(optimizers)
    for i, name in enumerate(names):
        params = optimizers[name].param_groups[0]["params"]
        optimizers[name].zero_grad(set_to_none=True)
        losses[name].backward(inputs=params, retain_graph=i < len(names) - 1)
    for opt in optimizers.values():
        opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def pretrain(
    backbone_cfg: BackboneConfig,
    cfg: PretrainConfig,
    loader: Iterable[dict],
    on_epoch: Callable[[int, dict], None] | None = None,
) -> PretrainResult:
    """Pre-train a freshly built, seeded ``backbone_cfg`` network with ``cfg.method`` on ``loader``.

    Batches are dicts with ``image`` ``(B, C, D, H, W)``; anything else in them (labels) is ignored.
    ``on_epoch(epoch, metrics)`` gets each epoch's mean losses (``loss`` and every other key the
    objective returns, e.g. ``d_loss``), ``epoch_time_s``, ``time_total_s``, ``peak_memory_mb`` and
    ``volumes_per_s``. The ``none`` method trains nothing and returns the seeded initial body.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = build_backbone(backbone_cfg)
    objective = build_objective(cfg.method, backbone, cfg.method_params).to(device)
    memory = PeakMemory(device).reset()
    tensor_peak: float | None = None  # CPU: the first step's peak tensor memory (as in fine-tuning)
    try:  # the sampler thread must stop however pre-training ends
        history: list[dict] = []
        start = time.perf_counter()
        if objective.trains:
            objective.train()
            optimizers = make_optimizers(objective, cfg)
            for epoch in range(1, cfg.epochs + 1):
                row = _train_epoch(objective, optimizers, loader, device,
                                   measure_memory=device.type == "cpu" and tensor_peak is None)
                tensor_peak = row.pop("tensor_peak_mb", tensor_peak)
                row.update(epoch=epoch, time_total_s=time.perf_counter() - start,
                           peak_memory_mb=memory.mb() if device.type == "cuda" else tensor_peak,
                           peak_rss_mb=memory.rss_mb())
                history.append(row)
                if on_epoch is not None:
                    on_epoch(epoch, row)
        elapsed = time.perf_counter() - start
        final = dict(history[-1]) if history else {}
        final.update(
            time_total_s=elapsed,
            time_per_epoch_s=elapsed / len(history) if history else 0.0,
            peak_memory_mb=memory.mb() if device.type == "cuda" or tensor_peak is None else tensor_peak,
            peak_rss_mb=memory.rss_mb(),
            epochs_trained=len(history),
        )
    finally:
        memory.close()
    body = {k: v.cpu() for k, v in backbone.body_state_dict().items()}
    return PretrainResult(body_state=body, history=history, final=final)


def _train_epoch(
    objective: PretrainObjective,
    optimizers: dict[str, torch.optim.Optimizer],
    loader: Iterable[dict],
    device: torch.device,
    measure_memory: bool = False,
) -> dict[str, float]:
    totals: dict[str, float] = {}
    n_batches = n_volumes = 0
    measured: dict[str, float] = {}
    start = time.perf_counter()
    for batch in loader:
        if not isinstance(batch, dict) or "image" not in batch:
            raise StudyInputError("pre-training batches must be dicts with an 'image' tensor (B, C, D, H, W)")
        images = batch["image"].to(device, non_blocking=True).float()
        if measure_memory and n_batches == 0:  # the first step's peak tensor memory (CPU)
            losses, measured["tensor_peak_mb"] = step_tensor_peak_mb(
                lambda images=images: train_step(objective, optimizers, images), [objective], optimizers.values())
        else:
            losses = train_step(objective, optimizers, images)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v
        n_batches += 1
        n_volumes += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if n_batches == 0:
        raise StudyInputError(
            "the pre-training data produced no batches: it is empty or smaller than the batch size"
        )
    row = {k: v / n_batches for k, v in totals.items()}
    row.update(epoch_time_s=elapsed, volumes_per_s=n_volumes / max(elapsed, 1e-9), **measured)
    return row


def pretrain_key(backbone_cfg: BackboneConfig, cfg: PretrainConfig, data_id: str) -> str:
    """Short sha256 of everything that determines the checkpoint (not the device).

    The method's parameters are filled with their defaults first, so ``{}`` and explicit defaults hash
    alike. The backbone's head-only fields (``HEAD_ONLY_FIELDS``) are left out; so are the training
    fields and ``data_id`` for a method that does not train (``none``).
    """
    backbone = {k: v for k, v in backbone_cfg.to_dict().items() if k not in HEAD_ONLY_FIELDS}
    pre = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    pre["method_params"] = asdict(method_config(cfg.method, cfg.method_params))
    payload = {"backbone": backbone, "pretrain": pre, "data_id": data_id, "code_version": CODE_VERSION}
    if not PRETRAIN_METHODS.get(cfg.method).trains:
        payload["data_id"] = None
        for name in _TRAINING_FIELDS:
            pre.pop(name)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_pretrain(
    cache_dir: str | Path,
    backbone_cfg: BackboneConfig,
    cfg: PretrainConfig,
    loader: Iterable[dict],
    data_id: str,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> tuple[Path, PretrainResult | None]:
    """Pre-train unless ``cache_dir/<key>/`` already holds a complete checkpoint.

    Returns ``(path of body.pt, result)``, ``result`` being ``None`` on a cache hit. ``body.pt`` and
    then ``meta.json`` (configs, final metrics, history) are each written atomically; ``meta.json``
    is the completion marker, so a half-written or interrupted checkpoint is never used.
    """
    folder = Path(cache_dir) / pretrain_key(backbone_cfg, cfg, data_id)
    body, meta = folder / "body.pt", folder / "meta.json"
    if body.is_file() and meta.is_file():
        return body, None
    result = pretrain(backbone_cfg, cfg, loader, on_epoch)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(body, lambda p: torch.save(result.body_state, p))
    info = {
        "key": folder.name,
        "code_version": CODE_VERSION,
        "data_id": data_id,
        "backbone": backbone_cfg.to_dict(),
        "pretrain": cfg.to_dict(),
        "final": result.final,
        "history": result.history,
    }
    atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
    return body, result


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The body state dict saved at ``path`` (``body.pt`` or the folder holding it), on the CPU."""
    path = Path(path)
    if path.is_dir():
        path = path / "body.pt"
    if not path.is_file():
        raise StudyInputError(
            f"no pre-training checkpoint at {path}: run the pre-training first or fix the path"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudyInputError(f"{path} is not a body state dict (name -> tensor)")
    return state


def load_meta(path: str | Path) -> dict:
    """The ``meta.json`` next to a checkpoint (configs and final pre-training metrics), e.g. after a cache hit."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / "meta.json").read_text())
