"""Study progress: a live terminal display (rich) when stdout is a terminal, plain log lines otherwise
(CI, files), and always a log file in the output folder."""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger("study")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (it may be replaced after set-up, e.g. by a test)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(output: Path) -> Path:
    """Log to stdout and to ``<output>/study.log``."""
    path = output / "study.log"
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in log.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        sh = _StdoutHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    log.propagate = False
    return path


class ProgressCallback(Callback):
    """Cells done / running / pending, trials finished / stopped / failed, best score, ETA."""

    def __init__(self, total_trials: int, cells: list[str], live: bool | None = None) -> None:
        self.total = total_trials
        self.cells = list(cells)
        self.cell_trials: dict[str, int] = defaultdict(int)  # ended trials per cell
        self.cell_running: dict[str, int] = defaultdict(int)
        self.counts = {"finished": 0, "stopped": 0, "failed": 0}
        self.best = float("-inf")
        self.best_cell = ""
        self.start = time.time()
        self.live_enabled = sys.stdout.isatty() if live is None else live
        self._live: Live | None = None

    def __getstate__(self) -> dict:  # Tune pickles callbacks; the live display is rebuilt after a restore
        return {**self.__dict__, "_live": None}

    # -- numbers ----------------------------------------------------------------------------------
    def ended(self) -> int:
        return sum(self.counts.values())

    def eta_s(self) -> float:
        done = self.ended()
        return (time.time() - self.start) / done * (self.total - done) if done else float("nan")

    def _cell(self, trial) -> str:
        return trial.config.get("cell", {}).get("id", "?")

    def table(self) -> Table:
        started = set(self.cell_trials) | {c for c, n in self.cell_running.items() if n}
        running = sum(1 for c, n in self.cell_running.items() if n)
        t = Table(title="study progress", show_header=False)
        t.add_row("cells", f"{len(started) - running} touched, {running} running, "
                           f"{len(self.cells) - len(started)} pending of {len(self.cells)}")
        t.add_row("trials", f"{self.ended()}/{self.total}: {self.counts['finished']} finished, "
                            f"{self.counts['stopped']} stopped early, {self.counts['failed']} failed")
        t.add_row("best score", f"{self.best:.3f} ({self.best_cell})" if self.best_cell else "-")
        t.add_row("elapsed / eta", f"{time.time() - self.start:.0f}s / {self.eta_s():.0f}s")
        return t

    # -- Tune callbacks ---------------------------------------------------------------------------
    def setup(self, **info) -> None:
        if self.live_enabled and self._live is None:
            self._live = Live(self.table(), console=Console(), refresh_per_second=2, transient=False)
            self._live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.cell_running[self._cell(trial)] += 1
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        planned = trial.config.get("train", {}).get("epochs")
        stopped = trial.config.get("stage") == "finetune" and planned and last.get("epoch", planned) < planned
        self._end(trial, "stopped" if stopped else "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None

    def _end(self, trial, outcome: str) -> None:
        cell = self._cell(trial)
        self.counts[outcome] += 1
        self.cell_running[cell] = max(0, self.cell_running[cell] - 1)
        self.cell_trials[cell] += 1
        score = (trial.last_result or {}).get("score")
        if score is not None and score > self.best:
            self.best, self.best_cell = score, cell
        score_txt = f" score {score:.3f}" if score is not None else ""
        line = (f"[{self.ended()}/{self.total}] {trial.config.get('stage', '?')} {cell} {trial.trial_id}: "
                f"{outcome}{score_txt}; best {f'{self.best:.3f}' if self.best_cell else '-'}; elapsed {time.time() - self.start:.0f}s, "
                f"eta {self.eta_s():.0f}s")
        if self._live is not None:
            for h in log.handlers:  # the file keeps every line; the terminal shows the live table
                if isinstance(h, logging.FileHandler):
                    h.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))
        else:
            log.info(line)
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
