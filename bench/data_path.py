"""Data path: the share of a fine-tuning trial's time spent waiting for data, with the preprocessing
cache on and off.

    python -m bench.data_path [--budget laptop] [--strategy full] [--repeats 3]

A trial loads its three labelled splits (``load_split``: read NIfTI, reorient, resample, crop, z-score),
then every training batch waits for the loader (in-memory tensors plus MONAI's random augmentation)
before computing. With the cache, the splits come from ``.npz`` files written by an earlier trial;
without it (a fresh, empty cache folder), from the NIfTI files (and writing the cache). Reported per trial:

- ``load_s``: loading the splits; ``epoch_s`` / ``wait_s``: the training loop's time per epoch and the
  part of it spent waiting for the next batch (the engine's ``epoch_time_s`` / ``data_wait_s``);
- ``epoch_wait_share`` = wait / epoch time; ``trial_wait_share`` = (load + all waits) / (load + all
  epochs), the share of the trial's training time spent on data. Target with the cache: under 5%.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fixed_trials, print_table, write_result


def load_time(data: dict) -> float:
    from trainables.data import load_split
    from trainables.trials import _data_config

    cfg = _data_config(data)
    start = time.perf_counter()
    for split in ("train", "val", "test"):
        load_split(cfg, split)
    return time.perf_counter() - start


def measure(config: dict, cache: bool, work: Path, repeat: int) -> dict:
    import torch

    from trainables.trials import run_trial

    torch.set_num_threads(1)
    cfg = copy.deepcopy(config)
    if not cache:
        cfg["data"]["cache_dir"] = str(work / f"empty-cache-{repeat}")  # nothing there: NIfTI path
    load = load_time(cfg["data"])
    cfg["data"]["cache_dir"] = config["data"].get("cache_dir")  # the trial itself, as measured above
    epochs: list[dict] = []
    run_trial({**cfg, "output_dir": str(work / "model")}, lambda metrics, state: epochs.append(metrics))
    epoch_s = sum(e["epoch_time_s"] for e in epochs)
    wait_s = sum(e["data_wait_s"] for e in epochs)
    return {"load_s": load, "epoch_s": epoch_s / len(epochs), "wait_s": wait_s / len(epochs),
            "epoch_wait_share": wait_s / epoch_s, "trial_wait_share": (load + wait_s) / (load + epoch_s)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="laptop")
    p.add_argument("--strategy", default="full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-"))
    _, _, (config,) = fixed_trials(work, args.budget, [("none", args.strategy)], 1, sampled=False)
    rows = []
    for cache in (True, False):
        runs = [measure(config, cache, work, i) for i in range(args.repeats)]
        row = {"cache": "on" if cache else "off", "budget": args.budget, "strategy": args.strategy}
        row.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
        rows.append(row)
    print_table(rows, list(rows[0]))
    path = write_result("data_path", "python -m bench.data_path " + " ".join(argv or sys.argv[1:]), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
