"""SimCLR contrastive pre-training of the encoder.

Chen et al., 2020, "A simple framework for contrastive learning of visual representations": two
random augmentations of each volume (3D random crop resized back, flips, intensity scale and shift,
Gaussian noise; MONAI transforms), an MLP projection head on the globally pooled bottleneck, and
the NT-Xent loss pulling the two views of a volume together against every other view in the batch.

Only the encoder (and the projection head) get gradients: this objective never runs the decoder, so
the decoder's weights in the checkpoint stay at their (seeded) initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, check

if TYPE_CHECKING:  # MONAI is imported where it is used: importing this module stays cheap
    from monai.transforms import Compose


@dataclass
class ContrastiveConfig:
    temperature: float = field(default=0.1, metadata={"help": "NT-Xent temperature tau (> 0)"})
    projection_dim: int = field(default=64, metadata={"help": "output size of the projection head"})
    hidden_dim: int = field(default=128, metadata={"help": "hidden size of the two-layer projection MLP"})
    min_crop: float = field(
        default=0.6, metadata={"help": "smallest crop side, as a fraction of the volume side"}
    )
    flip_prob: float = field(
        default=0.5,
        metadata={"help": "probability of flipping each axis (an axis-0 flip swaps the hemispheres)"},
    )
    intensity_scale: float = field(default=0.1, metadata={"help": "intensity scaled by 1 + U(-s, s)"})
    intensity_shift: float = field(default=0.1, metadata={"help": "intensity shifted by U(-s, s)"})
    noise_std: float = field(default=0.05, metadata={"help": "std of added Gaussian noise"})

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"contrastive temperature must be > 0, got {self.temperature!r}")
        for name in ("projection_dim", "hidden_dim"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"contrastive {name} must be an integer >= 1, got {value!r}",
            )
        check(0 < self.min_crop <= 1, f"contrastive min_crop must be in (0, 1], got {self.min_crop!r}")
        check(0 <= self.flip_prob <= 1, f"contrastive flip_prob must be in [0, 1], got {self.flip_prob!r}")
        for name in ("intensity_scale", "intensity_shift", "noise_std"):
            check(getattr(self, name) >= 0, f"contrastive {name} must be >= 0, got {getattr(self, name)!r}")


def augmentation(cfg: ContrastiveConfig, spatial_size: Sequence[int]) -> Compose:
    """SimCLR's view transform for one channel-first volume ``(C, D, H, W)``, as MONAI transforms.

    A random crop whose side per axis is ``U(min_crop, 1)`` of the volume side, at a random position,
    resized back to ``spatial_size`` (trilinear); a flip of each axis with probability ``flip_prob``;
    intensity scaled by ``1 + U(-s, s)`` and shifted by ``U(-s, s)``; Gaussian noise of std ``noise_std``.
    """
    from monai.transforms import (
        Compose,
        RandFlip,
        RandGaussianNoise,
        RandScaleCrop,
        RandScaleIntensity,
        RandShiftIntensity,
        Resize,
    )

    return Compose(
        [
            RandScaleCrop(roi_scale=cfg.min_crop, max_roi_scale=1.0, random_size=True),
            Resize(spatial_size=tuple(spatial_size), mode="trilinear"),
            *(RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in range(len(spatial_size))),
            RandScaleIntensity(factors=cfg.intensity_scale, prob=1.0),
            RandShiftIntensity(offsets=cfg.intensity_shift, prob=1.0),
            RandGaussianNoise(prob=1.0, std=cfg.noise_std, sample_std=False),
        ]
    )


def augment_pair(
    images: torch.Tensor, cfg: ContrastiveConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random views of each volume of the batch ``(B, C, D, H, W)``, same shape, dtype and device.

    The MONAI transforms run per sample; their random state is seeded from ``generator`` (a CPU
    generator; torch's global one if ``None``, which the pre-training seed seeds), so a seeded run draws
    the same views.
    """
    from monai.utils import convert_to_tensor

    transform = augmentation(cfg, images.shape[2:])
    transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))

    def view() -> torch.Tensor:
        volumes = [convert_to_tensor(transform(volume), track_meta=False) for volume in images]
        return torch.stack(volumes).to(device=images.device, dtype=images.dtype)

    with torch.no_grad():
        return view(), view()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``2N`` views: ``z1[i]`` and ``z2[i]`` are the positive pair; cosine similarity / tau.

    ``l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)``, averaged over all ``2N`` anchors.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


@PRETRAIN_METHODS.register("contrastive")
class Contrastive(PretrainObjective):
    """SimCLR on the encoder: NT-Xent between projections of two augmented views of each volume."""

    Config = ContrastiveConfig

    def __init__(self, backbone: MultiTaskNet, cfg: ContrastiveConfig) -> None:
        super().__init__(backbone, cfg)
        channels = backbone.stage_channels[-1]
        # Linear-BN-ReLU-Linear as in SimCLR's projection head: the batch norm removes the feature mean
        # shared by every view, which otherwise dominates the cosine similarities of a fresh 3D encoder.
        self.projection = nn.Sequential(
            nn.Linear(channels, cfg.hidden_dim),
            nn.BatchNorm1d(cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.projection_dim),
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projection of the globally average-pooled bottleneck."""
        return self.projection(self.backbone.encode(images)[-1].mean(dim=(2, 3, 4)))

    def players(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": [*self.backbone.encoder.parameters(), *self.projection.parameters()]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # A batch of one volume has no negatives: its loss is exactly 0 (no gradient), which is harmless.
        z = self.embed(torch.cat(augment_pair(images, self.cfg)))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent(z1, z2, self.cfg.temperature)}
