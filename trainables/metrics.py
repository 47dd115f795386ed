"""Segmentation and classification metrics (MONAI's), the task's selection score, and the metric catalogue.

Everything here reads the task spec (:class:`trainables.task.TaskSpec`); nothing names a class.

Segmentation: mean Dice over the foreground classes and HD95 in mm.
  An image whose ground truth and prediction are both empty for a class counts Dice 1 (the structure is
  correctly absent); HD95 is averaged only over the cases where both are non-empty.
Classification, per target over every (subject, region): ``accuracy``; ``balanced_accuracy``, the mean recall
  over the classes, a class absent from the truth counting 0 (so that always answering "present" is not
  rewarded when 60% of hemispheres have a PCS); ``auc`` (binary: ROC AUC; K classes: the mean one-vs-rest
  AUC over the classes it is defined for); ``f1`` (K classes: macro); binary targets also ``sensitivity`` and
  ``specificity`` (threshold 0.5, so ``balanced_accuracy = (sensitivity + specificity) / 2``). A task with
  several targets names them ``<target>_<metric>`` and the plain names are their means.
Selection score: the task's weighted sum (the PCS task: ``(dice + balanced_accuracy) / 2``). The names and
headings of the metrics every run logs are in :mod:`trainables.metric_names`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, ROCAUCMetric
from monai.networks.utils import one_hot

from trainables.task import Target, TaskSpec, as_task


def _nanmean(values: torch.Tensor) -> float:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else float("nan")


def segmentation_per_case(seg_logits: torch.Tensor, labels: torch.Tensor, spacing_mm: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and foreground class ``(B, C - 1)``: Dice (empty truth and prediction count 1) and HD95 in mm
    (NaN unless both are non-empty), of argmax predictions against channel-index labels ``(B, 1, D, H, W)``."""
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


def predicted_class(prob: torch.Tensor, target: Target) -> torch.Tensor:
    """The class called: binary ``p >= 0.5``; K classes the most probable."""
    return (prob[:, 1] >= 0.5).long() if target.binary else prob.argmax(dim=1)


def _auc(prob: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC of scores ``prob`` for the positives ``y`` (MONAI's); NaN when one class is missing."""
    if not 0 < int(y.sum()) < y.numel():
        return float("nan")
    metric = ROCAUCMetric()
    metric(prob[:, None], y[:, None].float())
    return float(metric.aggregate())


def target_metrics(logits: torch.Tensor, truth: torch.Tensor, target: Target) -> dict[str, float]:
    """One target's metrics over every (subject, region): logits ``(B, regions, L)``, class indices ``(B, regions)``."""
    prob = probabilities(logits.reshape(-1, target.logits_per_region), target)
    y = truth.reshape(-1).long()
    pred = predicted_class(prob, target)
    k = len(target.classes)
    if target.binary:
        cm = ConfusionMatrixMetric(metric_name=["sensitivity", "specificity", "accuracy", "f1 score"],
                                   reduction="mean")
        cm(pred[:, None].float(), y[:, None].float())
        sens, spec, acc, f1 = (float(t.item()) for t in cm.aggregate())
        recalls = [spec, sens]
        out = {"accuracy": acc, "f1": f1, "sensitivity": sens, "specificity": spec,
               "auc": _auc(prob[:, 1], y == 1)}
    else:
        recalls, f1s, aucs = [], [], []
        for c in range(k):
            tp = float(((pred == c) & (y == c)).sum())
            recalls.append(tp / float((y == c).sum()) if (y == c).any() else float("nan"))
            denominator = float((pred == c).sum() + (y == c).sum())
            f1s.append(2 * tp / denominator if denominator else float("nan"))
            aucs.append(_auc(prob[:, c], y == c))
        out = {"accuracy": float((pred == y).float().mean()), "f1": float(np.nanmean(f1s)) if np.isfinite(f1s).any()
               else float("nan"), "auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")}
    out["balanced_accuracy"] = float(np.mean([r if np.isfinite(r) else 0.0 for r in recalls]))
    return out


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
    for key in ("accuracy", "balanced_accuracy", "auc", "f1"):
        values = [m[key] for m in per.values() if np.isfinite(m[key])]
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
