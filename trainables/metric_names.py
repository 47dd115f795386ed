"""The metrics every fine-tuning run logs to MLflow, and how they are shown: the one list the report's table,
the end-of-study summary and the tracking callback read (no torch here: the report imports it). The
classification metrics come from their registry (:mod:`trainables.classification_metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from trainables.classification_metrics import CLASSIFICATION_METRICS


@dataclass(frozen=True)
class MetricInfo:
    """How a logged metric is shown: its heading and number format."""

    heading: str
    fmt: str = "{:.3f}"


# Every fine-tuning run's final metrics in MLflow, in the order the report's and the summary's tables show them
# (the report's table, the end-of-study summary and the MLflow compare view read this one table).
FINAL_METRICS: dict[str, MetricInfo] = {
    "test_score": MetricInfo("test score"),
    **{f"test_{name}": MetricInfo(CLASSIFICATION_METRICS.get(name).heading) for name in CLASSIFICATION_METRICS.names()
       if CLASSIFICATION_METRICS.get(name).shown},
    "test_dice": MetricInfo("Dice"),
    "test_hd95": MetricInfo("HD95 mm", "{:.1f}"),
    "time_per_epoch_s": MetricInfo("s/epoch", "{:.2f}"),
    "test_seconds_per_volume": MetricInfo("s/volume", "{:.3f}"),  # the model's forward pass: predicting's cost
    "peak_memory_mb": MetricInfo("peak MB", "{:.0f}"),
    "trainable_fraction": MetricInfo("trainable %", "{:.2f}"),
    "task_storage_bytes": MetricInfo("storage", "{}"),
}
# Logged with every run but not shown as a table column.
EXTRA_FINAL_METRICS = ("time_total_s", "trainable_params")
