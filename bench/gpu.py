"""GPU benchmarks, Ray-free (the GPU machine has torch; add monai, nibabel and nilearn):

1. ``strategies``: the strategy table (``bench.strategies``) at the paper budget's input size and width,
   every backbone;
2. ``sharing``: throughput of k trials sharing one GPU, k = 1, 2, 4, 8: the core's training step
   (full fine-tuning) in k processes at once, timed together after a barrier. Ray's fractional GPUs
   only divide the device among trial processes, so this measures the same sharing.

    python -m bench.gpu [--part all|strategies|sharing] [--ks 1,2,4,8] [--size 64] [--width 24]

Writes ``gpu_strategies.json`` and ``gpu_sharing.json`` to ``bench/results/`` (or ``--results``).
``--device cpu`` with tiny sizes checks the script on a machine without a GPU (``tests/test_bench.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

from bench import strategies
from bench.common import print_table, write_result

PAPER_SIZE, PAPER_WIDTH = 64, 24  # study.plan.grid.BUDGETS["paper"]: input_size 64^3, width 24


def _worker(args: tuple, barrier, queue) -> None:
    try:
        queue.put(strategies.measure(*args, barrier=barrier))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def sharing(backbone: str, ks: list[int], size: int, width: int, batch: int, steps: int, device: str) -> list[dict]:
    """One row per k: per-process step time, aggregate volumes/s, speed-up over k = 1, peak memory."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    rows: list[dict] = []
    for k in ks:
        barrier, queue = ctx.Barrier(k), ctx.Queue()
        args = ("full", backbone, size, width, batch, steps, 2, device)
        procs = [ctx.Process(target=_worker, args=(args, barrier, queue)) for _ in range(k)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join()
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            rows.append({"backbone": backbone, "k": k, "error": errors[0]})
            continue
        step = statistics.median(r["step_s"] for r in results)
        rows.append({"backbone": backbone, "k": k, "step_s": step,
                     "volumes_per_s": sum(batch / r["step_s"] for r in results),
                     "peak_memory_mb_per_process": max(r["peak_memory_mb"] for r in results)})
    base = next((r for r in rows if r["k"] == 1 and "volumes_per_s" in r), None)
    for r in rows:
        if base and "volumes_per_s" in r:
            r["throughput_vs_k1"] = r["volumes_per_s"] / base["volumes_per_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "strategies", "sharing"], default="all")
    p.add_argument("--backbones", default="segresnet,unet,swinunetr")
    p.add_argument("--sharing-backbone", default="segresnet")
    p.add_argument("--strategies", default=None, help="comma list (default: all registered)")
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--size", type=int, default=PAPER_SIZE)
    p.add_argument("--width", type=int, default=PAPER_WIDTH)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", type=Path, default=None, help="folder for the JSON (default bench/results)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run this on a GPU machine, or pass --device cpu to check the script",
                  file=sys.stderr)
            return 2
    command = "python -m bench.gpu " + " ".join(argv or sys.argv[1:])
    if args.part in ("all", "strategies"):
        rows = []
        for backbone in args.backbones.split(","):
            names = args.strategies.split(",") if args.strategies else strategies.STRATEGIES.names()
            rows += strategies.table(backbone, names, args.size, args.width, args.batch, args.steps, args.device)
        strategies.print_rows(rows)
        print(f"wrote {write_result('gpu_strategies', command, rows, folder=args.results)}")
    if args.part in ("all", "sharing"):
        ks = [int(k) for k in args.ks.split(",")]
        rows = sharing(args.sharing_backbone, ks, args.size, args.width, args.batch, args.steps, args.device)
        print_table(rows, ["backbone", "k", "step_s", "volumes_per_s", "throughput_vs_k1",
                           "peak_memory_mb_per_process", "error"])
        print(f"wrote {write_result('gpu_sharing', command, rows, folder=args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
