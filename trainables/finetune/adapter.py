"""Convolutional bottleneck adapters after each encoder stage (Chen et al., 2022, "Conv-Adapter:
Exploring Parameter Efficient Transfer Learning for ConvNets").

Each encoder stage ``i`` becomes ``AdaptedStage(stage, Adapter(stage_channels[i]))``: the adapter is a
residual bottleneck ``x + up(act(down(x)))`` whose ``k^3`` down-projection reduces the channels by
``reduction`` and whose ``1^3`` up-projection is zero-initialised, so the adapted model starts as the
pre-trained one. Conv-Adapter places adapters in parallel to blocks; adding them sequentially after a
stage is the same residual form and needs no knowledge of the stage's insides. Body frozen; adapters
and heads train (adapters live inside ``encoder``, so they get the encoder learning rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.finetune import (
    TaskModule,
    check_choice,
    check_int,
    freeze_all,
    register_strategy,
    train_heads,
)


@dataclass
class AdapterConfig:
    """Conv-Adapter hyperparameters."""

    reduction: int = field(
        default=4, metadata={"help": "channel reduction factor of the bottleneck (hidden = C // reduction)"}
    )
    kernel_size: int = field(default=3, metadata={"help": "kernel side of the down-projection, 1 or 3"})

    def __post_init__(self) -> None:
        check_int("adapter.reduction", self.reduction, 1, 64)
        check_choice("adapter.kernel_size", self.kernel_size, (1, 3))


class Adapter(TaskModule):
    """Residual bottleneck ``x + up(GELU(down(x)))`` with a zero-initialised up-projection."""

    def __init__(self, channels: int, reduction: int, kernel_size: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv3d(channels, hidden, kernel_size, padding=kernel_size // 2)
        self.act = nn.GELU()
        self.up = nn.Conv3d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedStage(nn.Module):
    """An encoder stage followed by its adapter."""

    def __init__(self, stage: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.stage = stage
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.stage(x))


def adapter_space(trial) -> dict:
    return {
        "reduction": trial.suggest_categorical("adapter_reduction", [2, 4, 8, 16]),
        "kernel_size": trial.suggest_categorical("adapter_kernel_size", [1, 3]),
    }


@register_strategy("adapter", AdapterConfig, space=adapter_space, lr_start=0.01)
def apply_adapter(model: MultiTaskNet, cfg: AdapterConfig) -> MultiTaskNet:
    """Wrap every encoder stage with an adapter; freeze the body; adapters and heads train."""
    freeze_all(model)
    for i, channels in enumerate(model.stage_channels):
        model.encoder[i] = AdaptedStage(model.encoder[i], Adapter(channels, cfg.reduction, cfg.kernel_size))
    train_heads(model)
    return model
