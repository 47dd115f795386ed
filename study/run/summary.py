"""The table printed at the end of a study: the best fine-tuning trial per cell, from MLflow."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from study.plan.grid import StudyPlan
from study.run.tracking import StudyTracker, open_ui_command
from trainables.metric_names import FINAL_METRICS
from trainables.phases import best_run_per_cell

COLUMNS = ("score", *(k for k in FINAL_METRICS if k != "task_storage_bytes"))


def print_summary(results, plan: StudyPlan, tracker: StudyTracker, console: Console | None = None) -> None:
    console = console or Console(width=max(160, Console().width))
    best = best_run_per_cell(tracker.child_runs())
    table = Table(title=f"Best trial per cell ({len(best)}/{len(plan.cells)} cells)")
    fractions = bool(plan.label_fractions)  # a label-fraction study: which share of the labels each cell used
    for col in ("pretrain", "strategy", "backbone", *(["fraction"] if fractions else []), *COLUMNS):
        table.add_column(col)
    for cell in plan.cells:
        run = best.get(cell.id)
        names = [cell.pretrain, cell.strategy, cell.backbone, *([f"{cell.fraction:g}"] if fractions else [])]
        if run is None:
            table.add_row(*names, *(["-"] * len(COLUMNS)))
            continue
        m = run.data.metrics
        table.add_row(*names, *(f"{m[c]:.4g}" if c in m else "-" for c in COLUMNS))
    console.print(table)
    errors = [r for r in results if r.error] if results is not None else []
    if errors:
        console.print(f"{len(errors)} trial(s) failed; see the MLflow tag failure_reason")
    for line in open_ui_command(tracker.uri, tracker.experiment_id):
        console.print(line, soft_wrap=True, highlight=False)
