"""Measure what one training step of a (strategy, backbone) needs, before the study packs trials.

Ray-free: the launcher runs :func:`probe_step_memory` as a one-GPU Ray task on the cluster and turns
the peak into a fractional GPU share per cell (``study/run/resources.py``).
"""

from __future__ import annotations

from trainables.backbones import BackboneConfig, build_backbone
from trainables.engine import (
    MultiTaskLoss,
    PeakMemory,
    TrainConfig,
    make_optimizer,
    resolve_device,
    synthetic_batch,
)
from trainables.finetune import STRATEGIES
from trainables.task import as_task


def probe_step_memory(strategy: str, backbone: dict, input_size: tuple[int, int, int], batch_size: int,
                      device: str = "auto", steps: int = 2, task: dict | None = None) -> float:
    """Peak memory (MB) of ``steps`` optimiser steps of ``strategy`` on ``backbone`` with random data of
    ``task`` (its dict form; default the PCS task)."""
    dev = resolve_device(device)
    spec_task = as_task(task)
    model = build_backbone(BackboneConfig(**backbone), spec_task)
    spec = STRATEGIES.get(strategy)
    model = spec.apply(model, spec.make_config({})).to(dev)
    opt = make_optimizer(model, TrainConfig())
    loss_fn = MultiTaskLoss(task=spec_task)
    batch = synthetic_batch(spec_task, batch_size, input_size, dev)
    memory = PeakMemory(dev).reset()
    try:
        for _ in range(steps):
            loss = loss_fn(model(batch["image"]), batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return memory.mb()
    finally:
        memory.close()
