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
from trainables.engine import MultiTaskLoss, PeakMemory, TrainConfig, make_optimizer, resolve_device
from trainables.finetune import STRATEGIES
from trainables.finetune.storage import task_storage_bytes


def measure(strategy: str, backbone: str, size: int, width: int, batch: int, steps: int, warmup: int = 2) -> dict:
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(backbone, width=width))
    spec = STRATEGIES.get(strategy)
    model = spec.apply(model, spec.make_config({})).to(device)
    opt = make_optimizer(model, TrainConfig())
    loss_fn = MultiTaskLoss()
    x = torch.randn(batch, 1, size, size, size, device=device)
    label = torch.zeros(batch, 1, size, size, size, dtype=torch.long, device=device)
    label[:, :, : size // 2, : size // 4, : size // 4] = 1
    b = {"image": x, "label": label, "cls": torch.ones(batch, 2, device=device)}
    memory = PeakMemory(device).reset()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = loss_fn(model(x), b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    trainable, total = count_parameters(model)
    row = {"backbone": backbone, "strategy": strategy, "step_s": sorted(times)[len(times) // 2],
           "peak_memory_mb": memory.mb(), "trainable_params": trainable, "trainable_fraction": trainable / total,
           "task_storage_bytes": task_storage_bytes(model)}
    memory.close()
    return row


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
        BACKBONES.get(backbone)
        width = 12 if backbone == "swinunetr" and args.width < 12 else args.width
        for strategy in args.strategies.split(","):
            rows.append(measure(strategy, backbone, args.size, width, args.batch, args.steps))
        full = next((r for r in rows if r["backbone"] == backbone and r["strategy"] == "full"), None)
        for r in rows:
            if full and r["backbone"] == backbone:
                r["time_vs_full"] = r["step_s"] / full["step_s"]
                r["memory_vs_full"] = r["peak_memory_mb"] / full["peak_memory_mb"]
                r["storage_vs_full"] = r["task_storage_bytes"] / full["task_storage_bytes"]
    print_table(rows, ["backbone", "strategy", "step_s", "time_vs_full", "peak_memory_mb", "memory_vs_full",
                       "trainable_fraction", "task_storage_bytes", "storage_vs_full"])
    path = write_result(args.name, "python -m bench.strategies " + " ".join(argv or sys.argv[1:]), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
