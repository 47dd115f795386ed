"""Segmentation and classification metrics (MONAI's), and the one selection score.

Segmentation: mean Dice over the two PCS classes (left, right) and HD95 in mm.
  An image whose ground truth and prediction are both empty for a class counts Dice 1 (the sulcus is
  correctly absent); HD95 is averaged only over the cases where both are non-empty.
Classification: per (subject, hemisphere) presence with a 0.5 probability threshold: accuracy, AUC,
  F1, sensitivity, specificity.
Selection score: ``score = (dice + balanced_accuracy) / 2`` where ``balanced_accuracy =
  (sensitivity + specificity) / 2``. Both halves lie in [0, 1]; the balanced accuracy does not reward
  always answering "present" when 60% of hemispheres have a PCS.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, ROCAUCMetric
from monai.networks.utils import one_hot

from trainables.backbones import SEG_CLASSES


def _nanmean(values: torch.Tensor) -> float:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else float("nan")


def segmentation_per_case(seg_logits: torch.Tensor, labels: torch.Tensor, spacing_mm: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and PCS class ``(B, 2)``: Dice (empty truth and prediction count 1) and HD95 in mm (NaN
    unless both are non-empty), of argmax predictions against integer labels ``(B, 1, D, H, W)``."""
    pred = one_hot(seg_logits.argmax(dim=1, keepdim=True), SEG_CLASSES)
    truth = one_hot(labels.long(), SEG_CLASSES)
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
    """Dice and HD95 (mm) of argmax predictions against integer labels ``(B, 1, D, H, W)``, averaged over
    images and the two PCS classes (HD95 over the cases where it is defined)."""
    dice, hd = segmentation_per_case(seg_logits, labels, spacing_mm)
    return {"dice": _nanmean(dice), "hd95": _nanmean(hd)}


def classification_metrics(cls_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Presence metrics over every (subject, hemisphere) pair; logits and targets are ``(B, 2)``."""
    prob = torch.sigmoid(cls_logits.float()).flatten()
    y = targets.float().flatten()
    pred = (prob >= 0.5).float()
    cm = ConfusionMatrixMetric(metric_name=["sensitivity", "specificity", "accuracy", "f1 score"], reduction="mean")
    cm(pred[:, None], y[:, None])
    sens, spec, acc, f1 = (float(t.item()) for t in cm.aggregate())
    auc = float("nan")
    if 0 < y.sum() < y.numel():
        auc_metric = ROCAUCMetric()
        auc_metric(prob[:, None], y[:, None])
        auc = float(auc_metric.aggregate())
    return {"accuracy": acc, "auc": auc, "f1": f1, "sensitivity": sens, "specificity": spec}


HEMISPHERES = ("left", "right")  # presence target j and segmentation class j + 1


def per_case_rows(subject_ids: list[str], seg_logits: torch.Tensor, labels: torch.Tensor, cls_logits: torch.Tensor,
                  targets: torch.Tensor, spacing_mm: float) -> list[dict]:
    """One row per (subject, hemisphere): ``dice``, ``hd95`` (None where undefined), presence
    ``probability`` and ``truth`` (0/1). The test metrics are functions of these rows: ``dice`` is their
    mean Dice, ``accuracy``/``auc``/``sensitivity``/``specificity`` those of ``probability >= 0.5``
    against ``truth``, so every statistic of the report can be recomputed from them."""
    dice, hd = segmentation_per_case(seg_logits, labels, spacing_mm)
    prob = torch.sigmoid(cls_logits.float())
    rows = []
    for i, subject in enumerate(subject_ids):
        for j, side in enumerate(HEMISPHERES):
            rows.append({"subject_id": str(subject), "hemisphere": side, "dice": float(dice[i, j]),
                         "hd95": finite_or_none(float(hd[i, j])), "probability": float(prob[i, j]),
                         "truth": int(targets[i, j] > 0.5)})
    return rows


def selection_score(metrics: dict[str, float]) -> float:
    """``(dice + balanced accuracy) / 2``; a missing (nan) part counts 0."""

    def part(x: float) -> float:
        return 0.0 if x is None or math.isnan(x) else x

    balanced = (part(metrics.get("sensitivity", 0.0)) + part(metrics.get("specificity", 0.0))) / 2
    return (part(metrics.get("dice", 0.0)) + balanced) / 2


def finite_or_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)
