"""Measure what one training step of a (strategy, backbone) needs, before the study packs trials.

Ray-free: the launcher runs :func:`probe_step_memory` as a one-GPU Ray task on the cluster and turns
the peak into a fractional GPU share per cell (``study/resources.py``).
"""

from __future__ import annotations

import torch

from trainables.backbones import BackboneConfig, build_backbone
from trainables.engine import MultiTaskLoss, PeakMemory, TrainConfig, make_optimizer, resolve_device
from trainables.finetune import STRATEGIES


def probe_step_memory(strategy: str, backbone: dict, input_size: tuple[int, int, int], batch_size: int,
                      device: str = "auto", steps: int = 2) -> float:
    """Peak memory (MB) of ``steps`` optimiser steps of ``strategy`` on ``backbone`` with random data."""
    dev = resolve_device(device)
    model = build_backbone(BackboneConfig(**backbone))
    spec = STRATEGIES.get(strategy)
    model = spec.apply(model, spec.make_config({})).to(dev)
    memory = PeakMemory(dev).reset()
    opt = make_optimizer(model, TrainConfig())
    loss_fn = MultiTaskLoss()
    x = torch.randn(batch_size, 1, *input_size, device=dev)
    label = torch.zeros(batch_size, 1, *input_size, dtype=torch.long, device=dev)
    label[..., : input_size[-1] // 4] = 1
    batch = {"image": x, "label": label, "cls": torch.ones(batch_size, 2, device=dev)}
    try:
        for _ in range(steps):
            loss = loss_fn(model(x), batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return memory.mb()
    finally:
        memory.close()
