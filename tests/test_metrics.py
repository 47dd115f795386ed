"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import torch

from trainables.metrics import classification_metrics, segmentation_metrics
from trainables.task import default_task


def _logits_from_labels(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 10


def test_dice_hand_case() -> None:
    truth = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    truth[0, 0, 1:3, 1:3, 1:3] = 1  # 8 voxels of left PCS
    pred = torch.zeros_like(truth)
    pred[0, 0, 1:3, 1:3, 1:2] = 1  # 4 of them predicted
    # class 1: 2*4/(8+4) = 2/3; class 2 empty in both -> 1 (correctly absent)
    m = segmentation_metrics(_logits_from_labels(pred), truth, spacing_mm=2.0)
    assert math.isclose(m["dice"], (2 / 3 + 1.0) / 2, rel_tol=1e-6)


def test_hd95_in_mm() -> None:
    truth = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    truth[0, 0, 4, 4:8, 4:8] = 2
    pred = torch.zeros_like(truth)
    pred[0, 0, 7, 4:8, 4:8] = 2  # the same square shifted by 3 voxels
    m = segmentation_metrics(_logits_from_labels(pred), truth, spacing_mm=2.0)
    assert math.isclose(m["hd95"], 6.0, rel_tol=1e-5)  # 3 voxels x 2 mm


def test_classification_hand_case() -> None:
    logits = torch.tensor([[3.0, -3.0], [2.0, 1.0], [-2.0, -1.0]])  # probs >.5: T F T T F F
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # T F T F F T
    m = classification_metrics(logits, target)
    # TP=2 FP=1 TN=2 FN=1
    assert math.isclose(m["accuracy"], 4 / 6, rel_tol=1e-6)
    assert math.isclose(m["sensitivity"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(m["specificity"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(m["f1"], 2 * 2 / (2 * 2 + 1 + 1), rel_tol=1e-6)
    # AUC by pairs: positives' scores {3, 2, -1}, negatives' {-3, 1, -2}: 8 of 9 pairs ordered right
    assert math.isclose(m["auc"], 8 / 9, rel_tol=1e-6)


def test_selection_score() -> None:
    """The PCS task's score: (dice + balanced accuracy) / 2, a missing part counting 0."""
    task = default_task()
    assert math.isclose(task.score_of({"dice": 0.5, "balanced_accuracy": (1.0 + 0.0) / 2}), 0.5)
    assert task.score_of({"dice": float("nan"), "balanced_accuracy": (1.0 + 1.0) / 2}) == 0.5
