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
