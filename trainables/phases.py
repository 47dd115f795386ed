"""The phases of a fine-tuning trial, the one list of them (no torch here: the report imports it).

- ``search``: a trial Optuna suggested for its cell (ASHA may stop it early);
- ``seeds``: a re-run of a cell's best configuration with a new seed (``--seeds``);
- ``race``: a repeat of a contender's best configuration in a race (``study.evidence.racing``);
- ``confirm``: after the choice on validation, a fresh run of the chosen cell's and the reference's best
  configurations, whose test results confirm the choice (``study.evidence.inference.confirm``).

The repeats (seeds, race, confirm) always run all their epochs and are not candidates for a cell's best trial.
"""

from __future__ import annotations

SEARCH, SEEDS, RACE, CONFIRM = "search", "seeds", "race", "confirm"
REPEAT_PHASES = (SEEDS, RACE, CONFIRM)


def is_best_candidate(tags: dict[str, str], metrics: dict[str, float]) -> bool:
    """Whether an MLflow fine-tuning run can be its cell's best trial: a search-phase run that completed
    all its epochs (``outcome`` tag) with a final validation ``score``."""
    return (tags.get("stage") == "finetune" and tags.get("phase", SEARCH) not in REPEAT_PHASES
            and tags.get("outcome") == "completed" and "score" in metrics)


def best_run_per_cell(runs) -> dict[str, object]:
    """cell id -> the run with the highest final validation score among each cell's candidates
    (:func:`is_best_candidate`): the cell's best trial, for the report and the end-of-study summary."""
    best: dict[str, object] = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if not is_best_candidate(tags, metrics):
            continue
        cell = tags.get("cell", "")
        if cell not in best or metrics["score"] > best[cell].data.metrics["score"]:
            best[cell] = run
    return best
