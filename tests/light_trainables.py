"""Trainables for scheduling tests that import nothing heavy, so Ray workers start fast."""

from __future__ import annotations

import time

from ray import tune


def sleeper(config: dict) -> None:
    start = time.time()
    time.sleep(config["sleep"])
    tune.report({"start": start, "end": time.time()})


def curve(config: dict) -> None:
    """Score rises linearly with epochs at a slope set by the cell's quality."""
    for epoch in range(1, config["train"]["epochs"] + 1):
        tune.report({"epoch": epoch, "score": config["cell"]["quality"] * epoch / 10})


def barrier_sleeper(config: dict) -> None:
    """Waits (up to ``timeout`` s) until ``n`` trials have started, so that slow worker start-up under load
    cannot hide concurrency that Ray allowed; then records its running interval."""
    from pathlib import Path

    start = time.time()
    folder = Path(config["barrier"])
    (folder / str(config["i"])).touch()
    deadline = start + config["timeout"]
    while len(list(folder.iterdir())) < config["n"] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(config["sleep"])
    tune.report({"start": start, "end": time.time()})
