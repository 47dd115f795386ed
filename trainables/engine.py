"""The Ray-free training core: train and evaluate an epoch, fit a model, measure time and memory.

Typed arguments in, metrics out; exceptions (never ``sys.exit``) on failure, so Ray Tune can mark a
trial failed and a plain Python loop, a test or a benchmark can call the same code.
"""

from __future__ import annotations

import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import psutil
import torch
from torch import nn

from trainables.backbones import MultiTaskNet, count_parameters
from trainables.errors import StudyInputError
from trainables.metrics import chance_score, per_case_rows, task_metrics
from trainables.task import TaskSpec, as_task


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf: the trial diverged (Tune marks it failed with this message)."""


LR_SCHEDULES = ("constant", "cosine")
KEEP_EPOCHS = ("best", "last")


@dataclass
class TrainConfig:
    """How to fine-tune.

    Args:
        epochs: passes over the training split.
        batch_size: volumes per step.
        lr_encoder: learning rate of encoder parameters (and what lives inside encoder stages).
        lr_decoder: learning rate of decoder parameters.
        lr_heads: learning rate of the task heads and of anything a strategy adds outside the body.
        weight_decay: AdamW weight decay.
        seg_weight: weight of the Dice-focal segmentation loss.
        cls_weight: weight of the classification cross-entropy (the mean over the task's targets).
        seed: seeds torch, numpy and Python's random.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        num_threads: torch CPU threads (0 = leave as is).
        lr_schedule: ``constant`` or ``cosine`` (the rates decay per step to 0 at the last step; Loshchilov &
            Hutter 2017, SGDR), after the warm-up.
        warmup_epochs: the rates rise linearly per step from 0 over this many epochs (0: no warm-up).
        ema_decay: 0 (off) or the decay of an exponential moving average of the weights
            (``torch.optim.swa_utils.AveragedModel``; Polyak & Juditsky 1992): validation, test and the saved
            model use the averaged weights.
        grad_clip_norm: 0 (off) or the largest gradient norm of a step (``torch.nn.utils.clip_grad_norm_``).
        keep_epoch: which epoch's weights the trial keeps and tests: ``best`` (the best validation score) or
            ``last`` (no choice on validation inside a run).
    """

    epochs: int = 5
    batch_size: int = 2
    lr_encoder: float = 1e-4
    lr_decoder: float = 1e-3
    lr_heads: float = 1e-3
    weight_decay: float = 1e-5
    seg_weight: float = 1.0
    cls_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    ema_decay: float = 0.0
    grad_clip_norm: float = 0.0
    keep_epoch: str = "best"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise StudyInputError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise StudyInputError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr_encoder", "lr_decoder", "lr_heads"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise StudyInputError(f"{name} must be in (0, 1), got {value!r}")
        if self.weight_decay < 0 or self.seg_weight < 0 or self.cls_weight < 0:
            raise StudyInputError("weight_decay, seg_weight and cls_weight must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise StudyInputError(f"lr_schedule {self.lr_schedule!r}: choose {' or '.join(LR_SCHEDULES)}")
        if not (isinstance(self.warmup_epochs, (int, float)) and 0 <= self.warmup_epochs < self.epochs):
            raise StudyInputError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise StudyInputError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.grad_clip_norm, (int, float)) and self.grad_clip_norm >= 0):
            raise StudyInputError(f"grad_clip_norm must be 0 (off) or positive, got {self.grad_clip_norm!r}")
        if self.keep_epoch not in KEEP_EPOCHS:
            raise StudyInputError(f"keep_epoch {self.keep_epoch!r}: choose {' or '.join(KEEP_EPOCHS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PeakMemory:
    """Peak memory since :meth:`reset`: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the
    process's resident set size, sampled every ``interval`` seconds by a background thread (so a
    trial in a reused worker process measures its own peak, not the process's lifetime peak).

    The resident set size includes the process's imported libraries (about 0.6 GB with torch and MONAI),
    so it cannot rank strategies on a CPU; the fine-tuning loop reports the peak tensor memory of a
    training step there (:func:`step_tensor_peak_mb`) and keeps this figure as ``peak_rss_mb``.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device, self.interval = device, interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def reset(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = self._proc.memory_info().rss
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def rss_mb(self) -> float:
        """The peak resident set size of the process since :meth:`reset`, in MB."""
        self._peak = max(self._peak, self._proc.memory_info().rss)
        return self._peak / 2**20

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.rss_mb()

    def close(self) -> None:
        """Stop the sampler thread and wait for it to end (so a reused worker never carries it into the next trial)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


def _tensor_bytes(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the distinct tensors a training step starts with: parameters, buffers, gradients and
    optimiser state (shared storages counted once)."""
    seen: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for module in modules:
        for p in module.parameters():
            add(p)
            add(p.grad)
        for b in module.buffers():
            add(b)
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                add(value)
    return sum(seen.values())


def step_tensor_peak_mb(step: Callable[[], object], modules: Iterable[nn.Module],
                        optimizers: Iterable[torch.optim.Optimizer]) -> tuple[object, float]:
    """Run ``step`` once under torch.profiler's CPU memory profiling; returns its result and the peak of
    live tensor memory in MB: the tensors it starts with (:func:`_tensor_bytes`) plus the highest running
    sum of the allocations and frees the profiler recorded during the step (activations kept for
    backward, gradients, optimiser state created at the first step, temporaries). Unlike the process's
    resident set size, which is dominated by imported libraries, this ranks what strategies cost."""
    from torch.profiler import ProfilerActivity, profile

    modules, optimizers = list(modules), list(optimizers)
    before = _tensor_bytes(modules, optimizers)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if events is None:
        return result, float("nan")
    changes = sorted((e.start_ns(), e.nbytes()) for e in events.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running = peak = 0
    for _, nbytes in changes:
        running += nbytes
        peak = max(peak, running)
    return result, (before + peak) / 2**20


def _part_of(name: str) -> str:
    """Which optimiser group a parameter belongs to, from its dotted name."""
    for piece in name.split("."):
        if piece in ("encoder", "decoder"):
            return piece
    return "heads"


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one learning rate per part (encoder / decoder / heads and strategy extras)."""
    lrs = {"encoder": cfg.lr_encoder, "decoder": cfg.lr_decoder, "heads": cfg.lr_heads}
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in lrs}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[_part_of(name)].append(p)
    param_groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
    if not param_groups:
        raise StudyInputError("the model has no trainable parameters: check the fine-tuning strategy")
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)


class MultiTaskLoss(nn.Module):
    """Dice-focal (MONAI) on the segmentation + cross-entropy per classification target: binary targets
    with a sigmoid (one logit per region), K-class targets with a softmax; the mean over targets."""

    def __init__(self, seg_weight: float = 1.0, cls_weight: float = 1.0, task: TaskSpec | None = None) -> None:
        super().__init__()
        self.task = as_task(task)
        from monai.losses import DiceFocalLoss

        self.seg = DiceFocalLoss(include_background=False, to_onehot_y=True, softmax=True)
        self.seg_weight, self.cls_weight = seg_weight, cls_weight

    def classification(self, logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the targets of flat logits ``(B, n_logits)`` and class indices ``(B, columns)``."""
        if not self.task.targets:
            return logits.new_zeros(())
        per_target, truths = self.task.split_logits(logits), self.task.split_truth(truth)
        losses = []
        for t in self.task.targets:
            x, y = per_target[t.name], truths[t.name]
            if t.binary:
                losses.append(nn.functional.binary_cross_entropy_with_logits(x[..., 0], y.float()))
            else:
                losses.append(nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1).long()))
        return torch.stack(losses).mean()

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The task's loss; a model may add its own term: ``out["aux_loss"]`` (e.g. distillation from a
        teacher) is added, and ``out["task_weight"]`` (default 1) weighs the task's loss against it."""
        seg = self.seg(out["seg"], batch["label"])
        cls = self.classification(out["cls"], batch["cls"])
        losses = {"seg_loss": seg, "cls_loss": cls}
        loss = self.seg_weight * seg + self.cls_weight * cls
        if "aux_loss" in out:
            losses["aux_loss"] = out["aux_loss"]
            loss = float(out.get("task_weight", 1.0)) * loss + out["aux_loss"]
        return {"loss": loss, **losses}


def synthetic_batch(task: TaskSpec, batch_size: int, input_size: tuple[int, int, int], device: torch.device | str
                    ) -> dict[str, torch.Tensor]:
    """Random images with a label block of the first foreground class and the last class of every target: what
    a probe or a benchmark steps on (shapes and dtypes of a real batch of ``task``)."""
    x = torch.randn(batch_size, 1, *input_size, device=device)
    label = torch.zeros(batch_size, 1, *input_size, dtype=torch.long, device=device)
    label[:, :, : input_size[0] // 2, : input_size[1] // 4, : input_size[2] // 4] = 1
    classes = [len(t.classes) - 1 for t in task.targets for _ in t.regions]
    cls = torch.tensor(classes, dtype=torch.float32, device=device).expand(batch_size, len(classes))
    return {"image": x, "label": label, "cls": cls.contiguous()}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: MultiTaskLoss,
    device: torch.device,
    measure_memory: bool = False,
    grad_clip_norm: float = 0.0,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean losses, wall time, data-wait time and volumes/s, and with
    ``measure_memory`` (CPU) ``tensor_peak_mb``: the peak tensor memory of the first step
    (:func:`step_tensor_peak_mb`). ``grad_clip_norm`` > 0 clips each step's gradient norm; ``after_step`` runs
    after every optimiser step (the learning-rate schedule, the weight average)."""
    model.train()
    clipped = [p for group in optimizer.param_groups for p in group["params"]] if grad_clip_norm else []
    totals: dict[str, float] = {}
    n_batches = n_volumes = 0
    wait = 0.0
    measured: dict[str, float] = {}
    start = tick = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - tick
        batch = _to(batch, device)

        def step(batch=batch, index=n_batches) -> dict[str, torch.Tensor]:
            losses = loss_fn(model(batch["image"]), batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"training loss is {loss.item()} at batch {index}: the trial diverged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clipped:
                nn.utils.clip_grad_norm_(clipped, grad_clip_norm)
            optimizer.step()
            if after_step is not None:
                after_step()
            return losses

        if measure_memory and n_batches == 0:
            losses, measured["tensor_peak_mb"] = step_tensor_peak_mb(step, [model, loss_fn], [optimizer])
        else:
            losses = step()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        n_batches += 1
        n_volumes += batch["image"].shape[0]
        tick = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if n_batches == 0:
        raise StudyInputError("the training split produced no batches: it is empty or smaller than the batch size")
    out = {f"train_{k}": v / n_batches for k, v in totals.items()}
    out.update(epoch_time_s=elapsed, data_wait_s=wait, volumes_per_s=n_volumes / max(elapsed, 1e-9), **measured)
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, object]:
    """Concatenated outputs and targets over ``loader`` (on the CPU), with the subject ids in order and
    ``seconds_per_volume``: the model's forward time per volume (what predicting costs, data loading and
    metrics apart)."""
    model.eval()
    seg, cls, labels, targets, ids = [], [], [], [], []
    forward = 0.0
    for batch in loader:
        b = _to(batch, device)
        tick = time.perf_counter()
        out = model(b["image"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward += time.perf_counter() - tick
        seg.append(out["seg"].float().cpu())
        cls.append(out["cls"].float().cpu())
        labels.append(batch["label"])
        targets.append(batch["cls"])
        ids.extend(batch.get("subject_id") or [f"case-{len(ids) + i}" for i in range(len(batch["cls"]))])
    return {"seg": torch.cat(seg), "cls": torch.cat(cls), "label": torch.cat(labels), "target": torch.cat(targets),
            "subject_id": ids, "seconds_per_volume": forward / max(len(ids), 1)}


def _metrics(p: dict, spacing_mm: float, task: TaskSpec) -> dict[str, float]:
    metrics = task_metrics(p["seg"], p["label"], p["cls"], p["target"], spacing_mm, task)
    loss = MultiTaskLoss(task=task)({"seg": p["seg"], "cls": p["cls"]}, {"label": p["label"], "cls": p["target"]})
    metrics["loss"] = float(loss["loss"])
    metrics["seconds_per_volume"] = p["seconds_per_volume"]
    return metrics


def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device, spacing_mm: float,
             task: TaskSpec | None = None) -> dict[str, float]:
    """The task's metrics (:func:`trainables.metrics.task_metrics`), the loss and the selection score."""
    return _metrics(predict(model, loader, device), spacing_mm, as_task(task))


def evaluate_cases(model: nn.Module, loader: Iterable[dict], device: torch.device, spacing_mm: float,
                   task: TaskSpec | None = None) -> tuple[dict[str, float], list[dict]]:
    """:func:`evaluate`'s metrics and, from the same predictions, one row per (subject, target, region)
    (:func:`trainables.metrics.per_case_rows`)."""
    task = as_task(task)
    p = predict(model, loader, device)
    rows = per_case_rows(p["subject_id"], p["seg"], p["label"], p["cls"], p["target"], spacing_mm, task)
    return _metrics(p, spacing_mm, task), rows


@dataclass
class Schedule:
    """A staged strategy's two phases (LP-FT, gradual unfreezing): ``first`` sets what trains in epochs
    ``1..switch_epoch``, ``second`` what trains after; the learning rates ramp up linearly over
    ``warmup_epochs`` after the switch (epoch ``switch + i`` at ``i / (warmup_epochs + 1)`` of each rate, from
    ``switch + warmup_epochs + 1`` at the full rate). The optimiser holds every parameter of either phase from
    the start (a frozen parameter has no gradient, so AdamW leaves it and its state alone), so a checkpoint
    taken in either phase resumes with the same optimiser."""

    switch_epoch: int
    first: Callable[[nn.Module], None]
    second: Callable[[nn.Module], None]
    warmup_epochs: int = 1

    def phase(self, epoch: int) -> int:
        return 1 if epoch <= self.switch_epoch else 2

    def enter(self, model: nn.Module, epoch: int) -> None:
        """Set what trains in ``epoch``'s phase."""
        (self.first if self.phase(epoch) == 1 else self.second)(model)

    def lr_scale(self, epoch: int) -> float:
        after = epoch - self.switch_epoch
        if after <= 0 or self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, after / (self.warmup_epochs + 1))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int, schedule: Schedule | None = None) -> Callable[[int], float]:
    """The factor of every base learning rate at optimiser step ``step`` (0-based) for
    ``torch.optim.lr_scheduler.LambdaLR``: the linear warm-up over ``cfg.warmup_epochs``, then ``cfg.lr_schedule``
    (constant, or a cosine to 0 at the last step), times a staged strategy's ramp after its switch
    (:meth:`Schedule.lr_scale` of the step's epoch)."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            value = (step + 1) / warmup
        elif cfg.lr_schedule == "cosine":
            value = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
        else:
            value = 1.0
        if schedule is not None:
            value *= schedule.lr_scale(step // steps_per_epoch + 1)
        return value

    return factor


def _steps_per_epoch(loader: Iterable[dict], batch_size: int) -> int:
    try:
        return max(len(loader), 1)  # type: ignore[arg-type]
    except TypeError as exc:
        raise StudyInputError("the training loader has no length: the learning-rate schedule counts steps per "
                              f"epoch (batch size {batch_size}); pass a DataLoader or a list of batches") from exc


@dataclass
class FitResult:
    history: list[dict[str, float]]
    final: dict[str, float]


def fit(
    model: MultiTaskNet | nn.Module,
    train_loader: Iterable[dict],
    val_loader: Iterable[dict],
    cfg: TrainConfig,
    spacing_mm: float,
    test_loader: Iterable[dict] | None = None,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    task: TaskSpec | None = None,
    schedule: Schedule | None = None,
) -> FitResult:
    """Fine-tune ``model`` for ``cfg.epochs`` epochs, validating after each.

    ``on_epoch(epoch, metrics, state)`` receives, every epoch, the training losses, ``val_*`` metrics,
    ``score`` (validation selection score), time and memory, and a function returning the resumable
    state (trained parameters, optimiser state, epoch, history); the Ray adapter reports the metrics
    to Tune and saves the state as the trial's checkpoint. ``resume`` is such a state: training
    continues after its epoch. After the last epoch the model is given the weights of its kept epoch
    (``cfg.keep_epoch``: the best validation score, or the last; the averaged weights with ``cfg.ema_decay``;
    ``best_epoch``; the last report's ``score`` is that epoch's); the last report carries that epoch's per-case
    validation rows (``val_cases``) and ``val_chance_score`` (the validation score of a model that learned
    nothing: :func:`trainables.metrics.chance_score`), then the test split (if given) is evaluated once:
    ``test_*`` metrics and ``test_cases``, one row per subject, target and region. ``task`` (default: the PCS
    task) defines the loss, the metrics and the score. ``schedule``: a
    staged strategy's phases (:class:`Schedule`); the model arrives with its second phase's parameters
    trainable, each epoch then trains its phase's, and the time, the memory and the trainable count are
    reported per phase (``phase1_*``, ``phase2_*``) besides the whole (memory: the larger phase's).
    """
    task = as_task(task)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)  # every parameter that trains in any phase
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    steps_per_epoch = _steps_per_epoch(train_loader, cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, schedule))
    averaged = None  # the weight average: what is validated, tested and kept
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    evaluated = averaged.module if averaged is not None else model

    def after_step() -> None:
        scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model)

    loss_fn = MultiTaskLoss(cfg.seg_weight, cfg.cls_weight, task).to(device)
    trainable, total = count_parameters(model)
    phase_trainable: dict[int, int] = {}
    if schedule is not None:
        for phase_epoch in (1, schedule.switch_epoch + 1):
            schedule.enter(model, phase_epoch)
            phase_trainable[schedule.phase(phase_epoch)] = count_parameters(model)[0]
    history: list[dict[str, float]] = []
    first_epoch, elapsed_before = 1, 0.0
    if resume is not None:
        model.load_state_dict(resume["trained"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        history = list(resume["history"])
        first_epoch = int(resume["epoch"]) + 1
        elapsed_before = history[-1]["time_total_s"] if history else 0.0
        if resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        else:  # a checkpoint written before the schedule was saved: the step it stopped at
            scheduler.last_epoch = (first_epoch - 1) * steps_per_epoch - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": the optimiser stepped
                warnings.simplefilter("ignore", UserWarning)  # in the run that wrote the checkpoint
                scheduler.step()
        if averaged is not None and resume.get("averaged") is not None:
            averaged.module.load_state_dict(resume["averaged"]["state"], strict=False)
            averaged.n_averaged.fill_(int(resume["averaged"]["n"]))

    # the weights of the epoch with the best validation score: the trial's test results and model are theirs
    best: dict = {"score": float("-inf"), "epoch": 0, "state": None}
    if resume is not None and resume.get("best") is not None:
        best = dict(resume["best"])

    # what training changes: the optimised parameters and the buffers (the same names in the model and its average)
    changing = {n for n, p in model.named_parameters() if id(p) in optimised} | {n for n, _ in model.named_buffers()}

    def changing_state(net: nn.Module) -> dict[str, torch.Tensor]:
        """What training changes in ``net`` (the model or its average), copied to the CPU."""
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in changing}

    def state() -> dict:
        trained = {k: v.detach().cpu().clone() for k, v in model.named_parameters() if id(v) in optimised}
        out = {"trained": trained, "optimizer": optimizer.state_dict(), "epoch": history[-1]["epoch"],
               "history": list(history), "best": best, "scheduler": scheduler.state_dict()}
        if averaged is not None:
            out["averaged"] = {"state": changing_state(averaged.module), "n": int(averaged.n_averaged)}
        return out

    start = time.perf_counter() - elapsed_before
    # CPU: the peak tensor memory of the first training step of each phase in this run of the loop
    tensor_peaks: dict[int, float] = {}
    phase_seconds: dict[int, list[float]] = {}
    for row in history:  # a resumed trial keeps the phase times and memory it measured before
        if "phase" in row:
            phase_seconds.setdefault(int(row["phase"]), []).append(row["epoch_time_s"])
            tensor_peaks.update({p: row[f"phase{p}_peak_memory_mb"] for p in (1, 2) if f"phase{p}_peak_memory_mb" in row})
    memory = PeakMemory(device).reset()
    try:  # the sampler thread must stop however the loop ends (an error, Tune stopping the trial)
        for epoch in range(first_epoch, cfg.epochs + 1):
            phase = 1
            if schedule is not None:
                schedule.enter(model, epoch)
                phase = schedule.phase(epoch)
            row = train_epoch(model, train_loader, optimizer, loss_fn, device,
                              measure_memory=device.type == "cpu" and phase not in tensor_peaks,
                              grad_clip_norm=cfg.grad_clip_norm, after_step=after_step)
            if "tensor_peak_mb" in row:
                tensor_peaks[phase] = row.pop("tensor_peak_mb")
            tensor_peak = max(tensor_peaks.values()) if tensor_peaks else None
            phase_seconds.setdefault(phase, []).append(row["epoch_time_s"])
            val = evaluate(evaluated, val_loader, device, spacing_mm, task)
            row.update({f"val_{k}": v for k, v in val.items()})
            row["score"] = val["score"]
            if schedule is not None:
                row.update(phase=phase, switch_epoch=schedule.switch_epoch, lr_scale=schedule.lr_scale(epoch))
                for p, seconds in phase_seconds.items():
                    row[f"phase{p}_time_per_epoch_s"] = sum(seconds) / len(seconds)
                for p, count in phase_trainable.items():
                    row[f"phase{p}_trainable_params"] = count
                for p, peak in tensor_peaks.items():
                    row[f"phase{p}_peak_memory_mb"] = peak
            if val["score"] > best["score"] or (cfg.keep_epoch == "last" and epoch == cfg.epochs):
                best = {"score": val["score"], "epoch": epoch, "state": changing_state(evaluated)}
            row.update(
                epoch=epoch,
                peak_memory_mb=memory.mb() if device.type == "cuda" else tensor_peak,
                peak_rss_mb=memory.rss_mb(),
                trainable_params=trainable,
                total_params=total,
                trainable_fraction=trainable / max(total, 1),
                time_total_s=time.perf_counter() - start,
            )
            row["time_per_epoch_s"] = row["time_total_s"] / epoch
            if epoch == cfg.epochs and best["state"] is not None and (best["epoch"] != epoch or averaged is not None):
                # the trial keeps its kept epoch's weights (averaged, with ema_decay); its last report carries
                # their validation score
                model.load_state_dict(best["state"], strict=False)
                row["score"] = best["score"]
            if epoch == cfg.epochs:
                row["best_epoch"] = best["epoch"]
            if epoch == cfg.epochs:  # the kept epoch's per-case validation rows: what selection reads
                predicted = predict(model, val_loader, device)
                row["val_cases"] = per_case_rows(predicted["subject_id"], predicted["seg"], predicted["label"],
                                                 predicted["cls"], predicted["target"], spacing_mm, task)
                row["val_chance_score"] = chance_score(predicted["label"], predicted["target"], spacing_mm, task)
            if epoch == cfg.epochs and test_loader is not None:  # the last report carries the test results
                test, cases = evaluate_cases(model, test_loader, device, spacing_mm, task)
                row.update({f"test_{k}": v for k, v in test.items()})
                row["test_cases"] = cases
            history.append(row)
            if on_epoch is not None:
                on_epoch(epoch, row, state)
    finally:
        memory.close()
    return FitResult(history=history, final=dict(history[-1]))
