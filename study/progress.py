"""Plain progress lines for a study (one per finished, stopped or failed trial) and a log file."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ray.tune import Callback

log = logging.getLogger("study")


def setup_logging(output: Path) -> Path:
    """Log to stdout and to ``<output>/study.log``."""
    path = output / "study.log"
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in log.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    log.propagate = False
    return path


class ProgressCallback(Callback):
    """Counts trials by outcome and prints a line whenever one ends, with the best score so far."""

    def __init__(self, total_trials: int) -> None:
        self.total = total_trials
        self.done = self.failed = 0
        self.best = float("-inf")
        self.start = time.time()

    def _line(self, trial, what: str) -> None:
        cfg = trial.config
        cell = cfg.get("cell", {}).get("id", "?")
        last = trial.last_result or {}
        score = last.get("score")
        if score is not None:
            self.best = max(self.best, score)
        elapsed = time.time() - self.start
        finished = self.done + self.failed
        eta = elapsed / finished * (self.total - finished) if finished else float("nan")
        score_txt = f" score {score:.3f}" if score is not None else ""
        log.info(f"[{finished}/{self.total}] {cfg.get('stage', '?')} {cell} {trial.trial_id}: {what}{score_txt}; "
                 f"best {self.best:.3f}; elapsed {elapsed:.0f}s, eta {eta:.0f}s")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self._line(trial, "FAILED")
