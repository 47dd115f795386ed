"""Segmentation and classification metrics (MONAI's), the task's selection score, and the metric catalogue.

Everything here reads the task spec (:class:`trainables.task.TaskSpec`); nothing names a class.

Segmentation: mean Dice over the foreground classes and HD95 in mm.
  An image whose ground truth and prediction are both empty for a class counts Dice 1 (the structure is
  correctly absent); HD95 is averaged only over the cases where both are non-empty.
Classification, per target over every (subject, region): the registered metrics of
  :mod:`trainables.classification_metrics` (accuracy, balanced accuracy, AUC, F1; binary targets also
  sensitivity and specificity; the called class is ``p >= 0.5`` for two classes, else the most probable). A
  task with several targets names them ``<target>_<metric>`` and the plain names are their means.
Selection score: the task's weighted sum (the PCS task: ``(dice + balanced_accuracy) / 2``). The names and
headings of the metrics every run logs are in :mod:`trainables.metric_names`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from trainables.classification_metrics import applicable, called_class
from trainables.task import Target, TaskSpec, as_task


def _nanmean(values: torch.Tensor) -> float:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else float("nan")


def segmentation_per_case(seg_logits: torch.Tensor, labels: torch.Tensor, spacing_mm: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and foreground class ``(B, C - 1)``: Dice (empty truth and prediction count 1) and HD95 in mm
    (NaN unless both are non-empty), of argmax predictions against channel-index labels ``(B, 1, D, H, W)``."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    channels = seg_logits.shape[1]
    pred = one_hot(seg_logits.argmax(dim=1, keepdim=True), channels)
    truth = one_hot(labels.long(), channels)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred, truth)
    with warnings.catch_warnings():  # MONAI warns (and returns nan/inf) for empty masks; we skip those cases
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            pred, truth, spacing=spacing_mm
        )
    both = (pred[:, 1:].flatten(2).any(-1)) & (truth[:, 1:].flatten(2).any(-1))
    hd = torch.where(both, hd, torch.full_like(hd, float("nan")))
    return dice, hd


def segmentation_metrics(seg_logits: torch.Tensor, labels: torch.Tensor, spacing_mm: float) -> dict[str, float]:
    """Dice and HD95 (mm), averaged over images and foreground classes (HD95 where it is defined)."""
    dice, hd = segmentation_per_case(seg_logits, labels, spacing_mm)
    return {"dice": _nanmean(dice), "hd95": _nanmean(hd)}


def probabilities(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """``(N, logits_per_region)`` logits -> ``(N, K)`` class probabilities (binary: ``[1 - p, p]``)."""
    logits = logits.float()
    if target.binary:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def target_metrics(logits: torch.Tensor, truth: torch.Tensor, target: Target) -> dict[str, float]:
    """One target's registered metrics (:mod:`trainables.classification_metrics`) over every (subject, region):
    logits ``(B, regions, L)``, class indices ``(B, regions)``."""
    prob = probabilities(logits.reshape(-1, target.logits_per_region), target).numpy()[None]
    y = truth.reshape(1, -1).long().numpy()
    pred = called_class(prob)
    return {m.name: float(m.fn(y, prob, pred)[0]) for m in applicable(len(target.classes))}


def classification_metrics(cls_logits: torch.Tensor, truth: torch.Tensor, task: TaskSpec | None = None
                           ) -> dict[str, float]:
    """Every target's metrics from the flat outputs ``(B, n_logits)`` and class indices ``(B, columns)``: plain
    names for a one-target task; ``<target>_<metric>`` and the plain names as their means otherwise."""
    task = as_task(task)
    logits, truths = task.split_logits(cls_logits), task.split_truth(truth)
    per = {t.name: target_metrics(logits[t.name], truths[t.name], t) for t in task.targets}
    if len(per) == 1:
        return next(iter(per.values()))
    out: dict[str, float] = {}
    for name, metrics in per.items():
        out.update({f"{name}_{k}": v for k, v in metrics.items()})
    for key in dict.fromkeys(k for m in per.values() for k in m):
        values = [m[key] for m in per.values() if key in m and np.isfinite(m[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def task_metrics(seg_logits: torch.Tensor, labels: torch.Tensor, cls_logits: torch.Tensor, truth: torch.Tensor,
                 spacing_mm: float, task: TaskSpec | None = None) -> dict[str, float]:
    """Segmentation and classification metrics and the task's ``score`` (default task: PCS)."""
    task = as_task(task)
    metrics = segmentation_metrics(seg_logits, labels, spacing_mm)
    if task.targets:
        metrics.update(classification_metrics(cls_logits, truth, task))
    metrics["score"] = task.score_of(metrics)
    return metrics


def chance_score(labels: torch.Tensor, truth: torch.Tensor, spacing_mm: float, task: TaskSpec | None = None) -> float:
    """The score of a model that learned nothing, on these labels: it segments nothing (background everywhere)
    and gives every class the same probability. A run whose validation score is not above it did not learn."""
    task = as_task(task)
    seg = torch.zeros(labels.shape[0], task.seg_channels, *labels.shape[2:])
    seg[:, 0] = 1.0
    cls = torch.zeros(labels.shape[0], task.n_logits)
    return float(task_metrics(seg, labels, cls, truth, spacing_mm, task)["score"])


def per_case_rows(subject_ids: list[str], seg_logits: torch.Tensor, labels: torch.Tensor, cls_logits: torch.Tensor,
                  truth: torch.Tensor, spacing_mm: float, task: TaskSpec | None = None) -> list[dict]:
    """One row per (subject, target, region): ``target``, ``region``, ``dice`` (the region's segmentation class,
    or the mean over foreground classes), ``hd95`` (None where undefined), ``truth`` (the class index) and the
    called probabilities (binary: ``probability`` of the second class; K classes: ``probabilities``). A
    segmentation-only task has one row per subject (target and region ``""``). The test metrics are functions
    of these rows, so every statistic of the report can be recomputed from them."""
    task = as_task(task)
    dice, hd = segmentation_per_case(seg_logits, labels, spacing_mm)

    def seg_of(i: int, segment: str | None) -> tuple[float, float | None]:
        if segment is None:
            d, h = _nanmean(dice[i]), _nanmean(hd[i])
        else:
            c = task.channel_of(segment) - 1
            d, h = float(dice[i, c]), float(hd[i, c])
        return d, (h if np.isfinite(h) else None)

    if not task.targets:
        return [{"subject_id": str(s), "target": "", "region": "", **dict(zip(("dice", "hd95"), seg_of(i, None),
                                                                              strict=True))}
                for i, s in enumerate(subject_ids)]
    logits, truths = task.split_logits(cls_logits), task.split_truth(truth)
    rows = []
    for i, subject in enumerate(subject_ids):
        for t in task.targets:
            prob = probabilities(logits[t.name][i], t)
            for j, region in enumerate(t.regions):
                d, h = seg_of(i, t.segments[j] if t.segments else None)
                row = {"subject_id": str(subject), "target": t.name, "region": region, "dice": d, "hd95": h,
                       "truth": int(round(float(truths[t.name][i, j])))}
                if t.binary:
                    row["probability"] = float(prob[j, 1])
                else:
                    row["probabilities"] = [float(v) for v in prob[j]]
                rows.append(row)
    return rows
