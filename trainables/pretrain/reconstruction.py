"""Autoencoder pre-training: reconstruct the input volume from the body's decoder features.

A plain autoencoder (Hinton & Salakhutdinov, 2006, "Reducing the dimensionality of data with neural
networks"), with an SSIM term (Wang et al., 2004, "Image quality assessment: from error visibility
to structural similarity") as in Models Genesis-style restoration objectives (Zhou et al., 2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, check, pixel_loss


@dataclass
class ReconstructionConfig:
    loss: str = field(default="l1", metadata={"help": "voxel-wise loss: 'l1' or 'mse'"})
    ssim_weight: float = field(
        default=0.5, metadata={"help": "weight of the (1 - SSIM) term; 0 turns it off"}
    )
    ssim_window: int = field(
        default=7, metadata={"help": "SSIM Gaussian window side (odd, <= the volume side)"}
    )
    ssim_data_range: float = field(
        default=4.0,
        metadata={"help": "intensity range SSIM's stability constants assume (z-scored volumes: ~4)"},
    )

    def __post_init__(self) -> None:
        check(self.loss in ("l1", "mse"), f"reconstruction loss must be 'l1' or 'mse', got {self.loss!r}")
        check(self.ssim_weight >= 0, f"reconstruction ssim_weight must be >= 0, got {self.ssim_weight!r}")
        check(
            isinstance(self.ssim_window, int) and self.ssim_window >= 3 and self.ssim_window % 2 == 1,
            f"reconstruction ssim_window must be an odd integer >= 3, got {self.ssim_window!r}",
        )
        check(
            self.ssim_data_range > 0,
            f"reconstruction ssim_data_range must be > 0, got {self.ssim_data_range!r}",
        )


class ReconstructionLoss(nn.Module):
    """``pixel(pred, target) + ssim_weight * (1 - SSIM(pred, target))`` (MONAI ``SSIMLoss``, 3D)."""

    def __init__(self, cfg: ReconstructionConfig) -> None:
        super().__init__()
        self.pixel = pixel_loss(cfg.loss)
        self.ssim_weight = cfg.ssim_weight
        from monai.losses import SSIMLoss

        self.ssim = SSIMLoss(spatial_dims=3, data_range=cfg.ssim_data_range, win_size=cfg.ssim_window)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel = self.pixel(pred, target)
        out = {"pixel_loss": pixel}
        if self.ssim_weight > 0:
            ssim = self.ssim(pred, target)
            out["ssim_loss"] = ssim
            out["loss"] = pixel + self.ssim_weight * ssim
        else:
            out["loss"] = pixel
        return out


@PRETRAIN_METHODS.register("reconstruction")
class Reconstruction(PretrainObjective):
    """Autoencoder: a 1x1x1 convolution on the decoder features reconstructs the input."""

    Config = ReconstructionConfig

    def __init__(self, backbone: MultiTaskNet, cfg: ReconstructionConfig) -> None:
        super().__init__(backbone, cfg)
        self.recon_head = self.voxel_head()
        self.criterion = ReconstructionLoss(cfg)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.through_body(self.recon_head, images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.criterion(self.reconstruct(images), images)
