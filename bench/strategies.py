"""Strategy efficiency: per strategy x backbone at one input size, time per training step, peak memory,
trainable parameters and per-task storage, each also as a ratio to ``full``. Ray-free (runs on a GPU
machine without Ray too).

    python -m bench.strategies [--backbones segresnet] [--size 32] [--width 8] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import print_table, write_result
from trainables.backbones import BACKBONES, BackboneConfig, build_backbone, count_parameters
from trainables.engine import (
    MultiTaskLoss,
    PeakMemory,
    TrainConfig,
    make_optimizer,
    resolve_device,
    step_tensor_peak_mb,
    synthetic_batch,
)
from trainables.finetune import STRATEGIES
from trainables.finetune.storage import task_storage_bytes
from trainables.task import default_task


def measure(strategy: str, backbone: str, size: int, width: int, batch: int, steps: int, warmup: int = 2,
            device: str = "auto", barrier=None) -> dict:
    """One strategy's training steps on random volumes; ``barrier`` (a multiprocessing barrier) is waited
    on after warm-up, so that processes sharing a device time their steps together."""
    device = resolve_device(device)
    torch.manual_seed(0)
    model_task = default_task()
    model = build_backbone(BackboneConfig(backbone, width=width), model_task)
    spec = STRATEGIES.get(strategy)
    model = spec.apply(model, spec.make_config({})).to(device)
    opt = make_optimizer(model, TrainConfig())
    loss_fn = MultiTaskLoss(task=model_task)
    b = synthetic_batch(model_task, batch, (size, size, size), device)
    x = b["image"]
    memory = PeakMemory(device).reset()

    def step() -> None:
        loss = loss_fn(model(x), b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # on a CPU, the first step's peak tensor memory (what the study reports there), before any timing
    _, tensor_mb = step_tensor_peak_mb(step, [model, loss_fn], [opt]) if device.type == "cpu" else (None, None)
    times = []
    for i in range(warmup + steps):
        if i == warmup and barrier is not None:
            barrier.wait()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    trainable, total = count_parameters(model)
    row = {"backbone": backbone, "strategy": strategy, "step_s": sorted(times)[len(times) // 2],
           "peak_memory_mb": memory.mb() if device.type == "cuda" else tensor_mb, "peak_rss_mb": memory.rss_mb(),
           "trainable_params": trainable, "trainable_fraction": trainable / total,
           "task_storage_bytes": task_storage_bytes(model)}
    memory.close()
    return row


def table(backbone: str, names: list[str], size: int, width: int, batch: int, steps: int,
          device: str = "auto") -> list[dict]:
    """One row per strategy on one backbone, with ratios to ``full`` when it is among them."""
    BACKBONES.get(backbone)
    width = 12 if backbone == "swinunetr" and width < 12 else width
    rows = [measure(strategy, backbone, size, width, batch, steps, device=device) for strategy in names]
    full = next((r for r in rows if r["strategy"] == "full"), None)
    for r in rows:
        if full:
            r["time_vs_full"] = r["step_s"] / full["step_s"]
            r["memory_vs_full"] = r["peak_memory_mb"] / full["peak_memory_mb"]
            r["storage_vs_full"] = r["task_storage_bytes"] / full["task_storage_bytes"]
    return rows


def print_rows(rows: list[dict]) -> None:
    print_table(rows, ["backbone", "strategy", "step_s", "time_vs_full", "peak_memory_mb", "memory_vs_full", "peak_rss_mb",
                       "trainable_fraction", "task_storage_bytes", "storage_vs_full"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="segresnet")
    p.add_argument("--strategies", default=",".join(STRATEGIES.names()))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--name", default="strategies")
    args = p.parse_args(argv)
    rows = []
    for backbone in args.backbones.split(","):
        rows += table(backbone, args.strategies.split(","), args.size, args.width, args.batch, args.steps)
    print_rows(rows)
    path = write_result(args.name, "python -m bench.strategies " + " ".join(argv or sys.argv[1:]), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
