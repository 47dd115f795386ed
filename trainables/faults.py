"""Fault injection: make chosen fine-tuning trials fail on purpose, to test that a study survives faults.

Off unless the environment variable ``STUDY_INJECT_FAULTS`` is set (the launcher's Ray workers inherit
it on a local cluster). Its value is a JSON list of faults::

    STUDY_INJECT_FAULTS='[{"cell": "none__full__segresnet", "kind": "nan", "epoch": 2, "times": 1}]'
    STUDY_FAULT_DIR=/tmp/faults   # where fired faults are counted (shared by retries and trials)

- ``kind``: ``nan`` (the model's outputs become NaN, so the training loss is NaN and the engine's own
  divergence check stops the trial), ``oom`` (a ``torch.OutOfMemoryError`` like CUDA raises),
  ``raise`` (a ``RuntimeError``), ``kill`` (the trial's process sends itself SIGKILL).
- ``cell``: a cell id, or ``*`` for every fine-tuning trial.
- ``phase``: ``search``, ``seeds`` or ``race`` (a race's repeats), or ``*`` (default) for every phase.
- ``epoch``: the training epoch (1-based) in which the fault fires, at the first training batch.
- ``times``: how many trial attempts it fires in, counted over the cell's trials and their retries
  with marker files in ``STUDY_FAULT_DIR``: ``times: 1`` with ``--max-failures 1`` makes a trial
  fail once and succeed on its retry.

Used by ``tests/test_faults.py``; it is the kind of switch chaos testing uses, never set in normal runs.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from trainables.errors import StudyInputError

ENV_FAULTS = "STUDY_INJECT_FAULTS"
ENV_DIR = "STUDY_FAULT_DIR"
KINDS = ("nan", "oom", "raise", "kill")


@dataclass(frozen=True)
class Fault:
    kind: str
    cell: str = "*"
    epoch: int = 1
    times: int = 1
    phase: str = "*"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StudyInputError(f"{ENV_FAULTS}: unknown fault kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if not isinstance(self.epoch, int) or self.epoch < 1 or not isinstance(self.times, int) or self.times < 1:
            raise StudyInputError(f"{ENV_FAULTS}: 'epoch' and 'times' must be integers >= 1 in {self}")


def faults_from_env(cell_id: str, phase: str = "") -> list[tuple[int, Fault]]:
    """The faults of ``STUDY_INJECT_FAULTS`` that apply to ``cell_id`` in ``phase``, with their index in the list."""
    text = os.environ.get(ENV_FAULTS, "").strip()
    if not text:
        return []
    try:
        items = json.loads(text)
        names = {f.name for f in fields(Fault)}
        faults = [Fault(**{k: v for k, v in item.items() if k in names}) for item in items]
    except (ValueError, TypeError, AttributeError) as exc:
        raise StudyInputError(f"{ENV_FAULTS} is not a JSON list of faults ({exc}); see trainables/faults.py") from exc
    if faults and not os.environ.get(ENV_DIR):
        raise StudyInputError(f"{ENV_FAULTS} is set but {ENV_DIR} is not: set it to a folder for the fault counters")
    return [(i, f) for i, f in enumerate(faults) if f.cell in ("*", cell_id) and f.phase in ("*", phase)]


def _claim(index: int, fault: Fault) -> bool:
    """Take one of the fault's ``times`` firings (atomic across processes); False when all are taken."""
    folder = Path(os.environ[ENV_DIR])
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(fault.times):
        try:
            os.close(os.open(folder / f"fault-{index}-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def _fire(kind: str, output):
    if kind == "nan":
        if isinstance(output, dict):
            return {k: v * float("nan") for k, v in output.items()}
        return output * float("nan")
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fault injected by "
                                     f"{ENV_FAULTS})")
    if kind == "raise":
        raise RuntimeError(f"fault injected by {ENV_FAULTS}")
    os.kill(os.getpid(), signal.SIGKILL)
    return output


class FaultInjector:
    """Forward hook on the model: fires each planned fault at the first training batch of its epoch.

    ``epoch_done(epoch)`` must be called after every epoch (the trial's ``on_epoch``); ``start_epoch`` is
    the first epoch this run trains (after a restore, the checkpoint's epoch + 1).
    """

    def __init__(self, model: torch.nn.Module, faults: list[tuple[int, Fault]], start_epoch: int = 1) -> None:
        self.faults, self.epoch = faults, start_epoch
        self._done: set[int] = set()
        self.handle = model.register_forward_hook(self._hook) if faults else None

    def epoch_done(self, epoch: int) -> None:
        self.epoch = epoch + 1

    def _hook(self, module: torch.nn.Module, args, output):
        if not module.training:
            return None
        for index, fault in self.faults:
            if fault.epoch == self.epoch and index not in self._done:
                self._done.add(index)
                if _claim(index, fault):
                    return _fire(fault.kind, output)
        return None
