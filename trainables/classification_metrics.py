"""Classification metrics: one function each, registered by name; adding a metric is one function here.

Every metric is computed from many rows at once: ``truth`` ``(R, n)`` class indices, ``prob`` ``(R, n, K)`` class
probabilities and ``pred`` ``(R, n)`` the called classes, for ``n`` (subject, region) cases; it returns ``(R,)``.
The training loop calls it on a split (one row), the report's bootstrap on thousands of resamples of the test
subjects (one row each), so a logged metric and its confidence interval are the same computation. Once
registered, a metric is logged for every run (``val_<name>``, ``test_<name>``), may weigh in a task's selection
score (``score:`` in a task spec), and with ``shown`` is a column of the report's and the summary's tables.

Numpy and scipy only (the report imports it without torch).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from trainables.registry import Registry

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ClassificationMetric:
    """A registered metric: its function, its table heading, whether it needs two classes and is shown."""

    name: str
    fn: MetricFn
    heading: str
    binary_only: bool = False
    shown: bool = True


CLASSIFICATION_METRICS: Registry[ClassificationMetric] = Registry("classification metric")


def register_metric(name: str, heading: str, binary_only: bool = False, shown: bool = True) -> Callable:
    """Decorator for ``fn(truth, prob, pred) -> (R,)``: registers it under ``name``."""

    def deco(fn: MetricFn) -> MetricFn:
        CLASSIFICATION_METRICS.register(name)(ClassificationMetric(name, fn, heading, binary_only, shown))
        return fn

    return deco


def called_class(prob: np.ndarray) -> np.ndarray:
    """The class called for each case of ``prob`` ``(..., K)``: two classes ``p(1) >= 0.5``; K, the most probable."""
    return (prob[..., 1] >= 0.5).astype(int) if prob.shape[-1] == 2 else prob.argmax(axis=-1)


def _nanmean(values: list[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():  # a row where every value is undefined stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(values), axis=0)


def _recall(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Share of the class-``k`` cases called ``k``; NaN where a row has none."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((pred == k) & (truth == k)).sum(1) / (truth == k).sum(1)


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC per row from ranks (the Mann-Whitney statistic, ties counted half); NaN where a row has one class."""
    ranks = scipy_stats.rankdata(scores, axis=1)
    n1 = positive.sum(1)
    n0 = positive.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positive).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


@register_metric("accuracy", "accuracy")
def accuracy(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return (pred == truth).mean(axis=1)


@register_metric("balanced_accuracy", "bal. acc.")
def balanced_accuracy(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The mean recall over the classes, a class absent from the truth counting 0 (binary: (sensitivity +
    specificity) / 2), so that always calling the commoner class is not rewarded."""
    return np.mean([np.nan_to_num(_recall(truth, pred, k), nan=0.0) for k in range(prob.shape[-1])], axis=0)


@register_metric("sensitivity", "sensitivity", binary_only=True, shown=False)
def sensitivity(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _recall(truth, pred, 1)


@register_metric("specificity", "specificity", binary_only=True, shown=False)
def specificity(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _recall(truth, pred, 0)


@register_metric("f1", "F1", shown=False)
def f1(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Binary: F1 of the second class; K classes: the mean F1 over the classes it is defined for."""
    classes = [1] if prob.shape[-1] == 2 else range(prob.shape[-1])
    scores = []
    for k in classes:
        tp = ((pred == k) & (truth == k)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores.append(2 * tp / ((pred == k).sum(1) + (truth == k).sum(1)))
    return _nanmean(scores)


@register_metric("auc", "AUC")
def auc(truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Binary: ROC AUC of ``p(1)``; K classes: the mean one-vs-rest AUC over the classes it is defined for."""
    if prob.shape[-1] == 2:
        return rank_auc(prob[..., 1], truth == 1)
    return _nanmean([rank_auc(prob[..., k], truth == k) for k in range(prob.shape[-1])])


def applicable(classes: int) -> list[ClassificationMetric]:
    """The registered metrics of a target with ``classes`` classes."""
    return [m for m in map(CLASSIFICATION_METRICS.get, CLASSIFICATION_METRICS.names())
            if classes == 2 or not m.binary_only]
