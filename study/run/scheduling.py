"""Early stopping per cell: one Ray Tune ASHA scheduler for each cell's fine-tuning trials.

A single ASHA over the whole study would stop every trial of a weak cell (say, a linear probe) against
the trials of strong cells, and the study could no longer say what that cell achieves at its best. So
each cell gets its own :class:`~ray.tune.schedulers.AsyncHyperBandScheduler`, which compares its
trials with each other only. Pre-training trials and repeats of a best configuration (seed re-runs, a race's) are
never stopped.
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler


class PerCellASHA(FIFOScheduler):
    """ASHA on ``metric`` within each cell (``config["cell"]["id"]``); FIFO for everything else.

    Args:
        metric: the reported metric to compare (the selection score).
        mode: ``max`` or ``min``.
        max_t: the last epoch.
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA's eta.
        time_attr: the reported progress counter.
    """

    def __init__(self, metric: str = "score", mode: str = "max", max_t: int = 10, grace_period: int = 1,
                 reduction_factor: float = 2, time_attr: str = "epoch") -> None:
        super().__init__()
        self.kwargs = dict(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                           reduction_factor=reduction_factor, brackets=1)
        self.cells: dict[str, AsyncHyperBandScheduler] = {}
        self.stopped: set[str] = set()

    def _asha(self, trial) -> AsyncHyperBandScheduler | None:
        from trainables.trials import parse_trial

        spec = parse_trial(trial.config)
        if spec.stage != "finetune" or spec.is_repeat:  # repeats always finish
            return None
        cell = spec.cell.id
        if cell not in self.cells:
            self.cells[cell] = AsyncHyperBandScheduler(**self.kwargs)
        return self.cells[cell]

    def on_trial_add(self, tune_controller, trial) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._asha(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        action = asha.on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self.kwargs["time_attr"], 0) < self.kwargs["max_t"]:
            self.stopped.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"PerCellASHA: {len(self.cells)} cells, {len(self.stopped)} trials stopped early"
