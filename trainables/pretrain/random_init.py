"""The baseline: no pre-training, the body keeps its random initialisation.

The initialisation is the backbone's default (MONAI's layer initialisers; e.g. He et al., 2015 for
convolutions), drawn after seeding, so the same seed gives the same network. It trains nothing
(``trains = False``), so the study runs no pre-training job and writes no checkpoint for it: each
fine-tuning trial of a ``none`` cell builds its own seeded initial network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective


@dataclass
class RandomInitConfig:
    """No parameters."""


@PRETRAIN_METHODS.register("none")
class RandomInit(PretrainObjective):
    """Random initialisation: no objective; ``forward`` returns a zero loss for completeness."""

    Config = RandomInitConfig
    trains = False

    def players(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": images.new_zeros(())}
