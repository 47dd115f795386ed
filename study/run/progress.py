"""Study progress: a live terminal display (rich) when stdout is a terminal, plain log lines otherwise
(CI, files), and always a log file in the output folder.

Ray's and Ray Tune's own console output (start-up messages, Tune's configuration box and TensorBoard
hint, warnings) is not the study's: :func:`ray_console_to_log` sends it to ``study.log`` while the
study's own lines and its live table keep the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger("study")

# Where the study's own lines go while Ray's console output is redirected: the terminal's stream and, while
# the live table is drawn, its console (which prints a line above the table instead of through it).
_screen: dict[str, object] = {"stream": None, "console": None}


# phases whose trials are not counted per cell: how many there will be is known only as they come
UNPLANNED = ("race", "confirm")


class _StdoutHandler(logging.StreamHandler):
    """Writes to the study's screen: the live display's console, the terminal saved by
    :func:`ray_console_to_log`, or whatever ``sys.stdout`` is now (a test may replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return _screen["stream"] or sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        console = _screen["console"]
        if console is None:
            super().emit(record)
            return
        try:
            console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


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


@contextlib.contextmanager
def ray_console_to_log(path: Path) -> Iterator[None]:
    """Everything printed to ``sys.stdout``/``sys.stderr`` inside (Ray's loggers, Tune's ``print``s, Python
    warnings) is appended to ``path``; the study's logger and live table keep writing to the terminal."""
    terminal = _screen["stream"]
    _screen["stream"] = terminal or sys.stdout
    # Ray's "ray" logger holds the stderr of the moment it was set up, not whatever sys.stderr is now.
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:]
    with open(path, "a", buffering=1, errors="replace") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.handlers = [handler]
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            ray_logger.handlers = saved
            _screen["stream"] = terminal


def duration(seconds: float) -> str:
    """``"42s"``, ``"3m 05s"``, ``"1h 02m"``; an unknown duration is ``"–"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class ProgressCallback(Callback):
    """Pre-training jobs and cells done / in progress / waiting, trials by outcome, best score, ETA.

    Args:
        cell_trials: fine-tuning cell id -> the trials it will run (search trials + seed re-runs).
        pretrain_jobs: the pre-training jobs of the study (they are not cells).
        live: draw a live table (default: when stdout is a terminal); otherwise one log line per trial.
    """

    def __init__(self, cell_trials: dict[str, int], pretrain_jobs: int, live: bool | None = None) -> None:
        self.cell_trials = dict(cell_trials)
        self.pretrain_jobs = pretrain_jobs
        self.total = pretrain_jobs + sum(self.cell_trials.values())
        self.ended_per_cell: dict[str, int] = {}
        self.pretrain_ended = 0
        self.running: dict[str, str] = {}  # trial id -> cell id (a pre-training job's id is not a cell)
        self.race_running: set[str] = set()  # trial ids of a race's repeats (not counted per cell)
        self.race_ended = 0
        self.counts = {"finished": 0, "stopped": 0, "failed": 0}
        self.best = float("-inf")
        self.best_cell = ""
        self.start = time.time()
        screen = _screen["stream"] or sys.stdout
        self.live_enabled = screen.isatty() if live is None else live
        self._live: Live | None = None

    def __getstate__(self) -> dict:  # Tune pickles callbacks; the live display is rebuilt after a restore
        return {**self.__dict__, "_live": None}

    # -- numbers ----------------------------------------------------------------------------------
    def ended(self) -> int:
        return sum(self.counts.values())

    def eta_s(self) -> float:
        """Seconds left at the rate trials have ended so far; NaN before the first one ends."""
        done = self.ended()
        if not done:
            return float("nan")
        return (time.time() - self.start) / done * max(0, self.total - done)

    def cell_counts(self) -> tuple[int, int, int]:
        """(done, in progress, waiting) fine-tuning cells; they add up to the number of cells."""
        done = sum(1 for c, n in self.cell_trials.items() if self.ended_per_cell.get(c, 0) >= n)
        touched = {c for c in self.ended_per_cell if c in self.cell_trials} | {
            c for c in self.running.values() if c in self.cell_trials}
        active = len(touched) - sum(1 for c in touched if self.ended_per_cell.get(c, 0) >= self.cell_trials[c])
        return done, active, len(self.cell_trials) - done - active

    def table(self) -> Table:
        t = Table(title="study progress", show_header=False)
        if self.pretrain_jobs:
            pre_running = sum(1 for c in self.running.values() if c not in self.cell_trials)
            t.add_row("pre-training", f"{self.pretrain_ended}/{self.pretrain_jobs} jobs done, {pre_running} running")
        done, active, waiting = self.cell_counts()
        t.add_row("cells", f"{done} done, {active} in progress, {waiting} waiting (of {len(self.cell_trials)})")
        if self.race_ended or self.race_running:
            t.add_row("race, confirmation", f"{self.race_ended} repeats ended, {len(self.race_running)} running")
        t.add_row("trials", f"{self.ended()}/{self.total} ended: {self.counts['finished']} finished, "
                            f"{self.counts['stopped']} stopped early, {self.counts['failed']} failed; "
                            f"{len(self.running) + len(self.race_running)} running")
        t.add_row("best score", f"{self.best:.3f} ({self.best_cell})" if self.best_cell else "–")
        t.add_row("elapsed / eta", f"{duration(time.time() - self.start)} / {duration(self.eta_s())}")
        return t

    # -- Tune callbacks ---------------------------------------------------------------------------
    def setup(self, **info) -> None:
        if self.live_enabled and self._live is None:
            console = Console(file=_screen["stream"] or sys.stdout)
            self._live = Live(self.table(), console=console, refresh_per_second=2, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            _screen["console"] = console

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        from trainables.trials import parse_trial

        if parse_trial(trial.config).phase in UNPLANNED:  # a race's repeats are not known in advance
            if trial.trial_id not in self.race_running:
                self.race_running.add(trial.trial_id)
                self.total += 1
        else:
            self.running[trial.trial_id] = self._cell(trial)
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from trainables.trials import parse_trial

        stopped = not parse_trial(trial.config).ran_all_epochs(trial.last_result or {})
        self._end(trial, "stopped" if stopped else "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None
            _screen["console"] = None

    @staticmethod
    def _cell(trial) -> str:
        from trainables.trials import parse_trial

        return parse_trial(trial.config).cell.id or "?"

    def _end(self, trial, outcome: str) -> None:
        from trainables.trials import parse_trial

        cell = self._cell(trial)
        self.running.pop(trial.trial_id, None)
        self.counts[outcome] += 1
        spec = parse_trial(trial.config)
        if spec.phase in UNPLANNED:
            self.race_running.discard(trial.trial_id)
            self.race_ended += 1
        elif cell in self.cell_trials:
            self.ended_per_cell[cell] = self.ended_per_cell.get(cell, 0) + 1
        else:
            self.pretrain_ended += 1
        score = (trial.last_result or {}).get("score")
        if score is not None and score > self.best:
            self.best, self.best_cell = score, cell
        score_txt = f" score {score:.3f}" if score is not None else ""
        line = (f"[{self.ended()}/{self.total}] {spec.stage} {cell} {trial.trial_id}: "
                f"{outcome}{score_txt}; best {f'{self.best:.3f}' if self.best_cell else '–'}; "
                f"elapsed {duration(time.time() - self.start)}, eta {duration(self.eta_s())}")
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
