"""Side-tuning (Zhang et al., 2020, "Side-Tuning: A Baseline for Network Adaptation via Additive
Side Networks").

The pre-trained body stays frozen and runs unchanged; a small side network reads the same input and
its features are blended with the body's: ``alpha * base + (1 - alpha) * side``, with a learnable
``alpha = sigmoid(alpha_logit)`` per blend point.

Where: the bottleneck (the deepest encoder output) also feeds the decoder, so the blend happens at the
classification head's input (``feats[cls_stage]``) *and* at the deepest encoder output; for UNet and
SegResNet these are the same tensor, for SwinUNETR (``cls_stage = -2``) there are two blend points.
The blend is applied to the encoder's *outputs*: the frozen encoder runs exactly as pre-trained, and
the blended features reach the classification head and the decoder (through the bottleneck and, for
SwinUNETR, the stage-3 skip).

How: ``side_depth`` stride-2 ``3^3`` convolutions (GroupNorm + ReLU) from the input, then, per blend
point, adaptive average pooling to that feature's grid and a ``1^3`` projection to its channels, so the
side network fits any input size. The strategy sets the model's ``encode`` to an instance attribute,
``functools.partial(encode_with_side, model)``; the class and its named parts are unchanged. The side
network and the alphas live under ``model.side`` (heads learning rate).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.finetune import TaskModule, check_float, check_int, freeze_all, register_strategy, train_heads


@dataclass
class SideTuneConfig:
    """Side network size and initial blend."""

    side_width: int = field(default=16, metadata={"help": "channels of the side network's convolutions"})
    side_depth: int = field(default=3, metadata={"help": "stride-2 convolutions in the side network"})
    alpha_init: float = field(
        default=0.8, metadata={"help": "initial weight of the frozen body's features, in (0, 1)"}
    )

    def __post_init__(self) -> None:
        check_int("sidetune.side_width", self.side_width, 4, 512)
        check_int("sidetune.side_depth", self.side_depth, 1, 6)
        check_float("sidetune.alpha_init", self.alpha_init, 0.01, 0.99)


class SideNetwork(TaskModule):
    """Strided convolutions from the input, one projection and one blend weight per blend point."""

    def __init__(self, in_channels: int, cfg: SideTuneConfig, blend_channels: dict[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(cfg.side_depth):
            layers += [
                nn.Conv3d(width, cfg.side_width, 3, stride=2, padding=1),
                nn.GroupNorm(min(4, cfg.side_width), cfg.side_width),
                nn.ReLU(inplace=True),
            ]
            width = cfg.side_width
        self.features = nn.Sequential(*layers)
        self.points = sorted(blend_channels)
        self.proj = nn.ModuleDict({str(i): nn.Conv3d(width, c, 1) for i, c in blend_channels.items()})
        logit = math.log(cfg.alpha_init / (1 - cfg.alpha_init))
        self.alpha_logit = nn.ParameterDict(
            {str(i): nn.Parameter(torch.tensor(logit)) for i in blend_channels}
        )

    def blend(self, x: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``feats`` with the blend points mixed with the side features computed from ``x``."""
        side = self.features(x)
        out = list(feats)
        for i in self.points:
            s = self.proj[str(i)](F.adaptive_avg_pool3d(side, feats[i].shape[2:]))
            alpha = torch.sigmoid(self.alpha_logit[str(i)])
            out[i] = alpha * feats[i] + (1 - alpha) * s
        return out


def encode_with_side(self: MultiTaskNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's own ``encode``, then the side-network blend."""
    return self.side.blend(x, type(self).encode(self, x))


def sidetune_space(trial) -> dict:
    return {
        "side_width": trial.suggest_categorical("sidetune_side_width", [8, 16, 32]),
        "side_depth": trial.suggest_int("sidetune_side_depth", 2, 4),
        "alpha_init": trial.suggest_float("sidetune_alpha_init", 0.5, 0.95),
    }


@register_strategy("sidetune", SideTuneConfig, space=sidetune_space, lr_start=0.01)
def apply_sidetune(model: MultiTaskNet, cfg: SideTuneConfig) -> MultiTaskNet:
    """Freeze the body; add a side network blended at the classification input and the bottleneck."""
    freeze_all(model)
    n = len(model.encoder)
    points = {model.cls_stage % n, n - 1}
    model.side = SideNetwork(model.config.in_channels, cfg, {i: model.stage_channels[i] for i in points})
    model.encode = functools.partial(encode_with_side, model)  # picklable, unlike a bound method
    train_heads(model)
    return model
