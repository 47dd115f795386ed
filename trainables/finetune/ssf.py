"""SSF: scale and shift deep features (Lian et al., 2022, "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning").

Every normalisation layer of the body (GroupNorm, InstanceNorm, BatchNorm, LayerNorm) is followed by a
learnable per-channel ``y * scale + shift`` (scale 1, shift 0 at the start, so the start equals the
pre-trained model). SSF also inserts them after other operations; the normalisation layers are the
places every backbone here shares. LayerNorm (Swin) works on channels-last tokens, so its scale applies
to the last axis; the others to axis 1. Body frozen; SSF parameters and heads train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.errors import StudyInputError
from trainables.finetune import (
    TaskModule,
    body_modules,
    freeze_all,
    register_strategy,
    replace_module,
    train_heads,
)

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class SSFConfig:
    """SSF has no hyperparameters beyond the training loop's."""


def _channels(norm: nn.Module) -> tuple[int, int]:
    """(number of channels, channel axis) of a normalisation layer's output."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels, 1
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[-1], -1
    return norm.num_features, 1


class ScaledNorm(TaskModule):
    """A frozen normalisation layer followed by a learnable per-channel scale and shift."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        channels, self.axis = _channels(norm)
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        shape = [1] * y.dim()
        shape[self.axis] = -1
        return y * self.scale.view(shape) + self.shift.view(shape)


@register_strategy("ssf", SSFConfig, lr_start=0.01)
def apply_ssf(model: MultiTaskNet, cfg: SSFConfig) -> MultiTaskNet:
    """Follow every body normalisation layer with SSF; only SSF parameters and the heads train."""
    freeze_all(model)
    norms = [name for name, m in body_modules(model) if isinstance(m, _NORMS)]
    if not norms:
        raise StudyInputError(f"backbone {model.config.name!r} has no normalisation layer for SSF to follow")
    for name in norms:
        replace_module(model, name, ScaledNorm(model.get_submodule(name)))
    train_heads(model)
    return model
