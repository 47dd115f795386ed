"""Masked-volume inpainting: hide random 3D blocks, predict the hidden voxels.

Models Genesis' in-/out-painting (Zhou et al., 2019, "Models Genesis: generic autodidactic models for
3D medical image analysis") and masked autoencoding (He et al., 2022, "Masked autoencoders are
scalable vision learners"): the loss counts only the hidden voxels, as MAE's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trainables.backbones import MultiTaskNet
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, check


@dataclass
class MaskedConfig:
    mask_ratio: float = field(default=0.5, metadata={"help": "fraction of blocks hidden, in (0, 1)"})
    block_size: int = field(default=4, metadata={"help": "side of a hidden cubic block in voxels"})
    fill: str = field(
        default="zero", metadata={"help": "what replaces hidden voxels: 'zero' or 'noise' (N(0,1))"}
    )
    loss: str = field(default="l1", metadata={"help": "loss on the hidden voxels: 'l1' or 'mse'"})

    def __post_init__(self) -> None:
        check(0 < self.mask_ratio < 1, f"masked mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        check(
            isinstance(self.block_size, int) and self.block_size >= 1,
            f"masked block_size must be an integer >= 1, got {self.block_size!r}",
        )
        check(self.fill in ("zero", "noise"), f"masked fill must be 'zero' or 'noise', got {self.fill!r}")
        check(self.loss in ("l1", "mse"), f"masked loss must be 'l1' or 'mse', got {self.loss!r}")


def random_block_mask(
    shape: torch.Size | tuple[int, ...], ratio: float, block: int, device: torch.device
) -> torch.Tensor:
    """A ``(B, 1, D, H, W)`` float mask, 1 on hidden voxels: ``round(ratio * n_blocks)`` blocks per sample.

    The volume is tiled by ``block``-sided cubes (the last ones clipped at the border); each sample
    hides its own random choice of exactly that many cubes (at least one).
    """
    b, spatial = shape[0], shape[2:]
    grid = [math.ceil(s / block) for s in spatial]
    n_blocks = math.prod(grid)
    n_hidden = min(n_blocks, max(1, round(ratio * n_blocks)))
    ranks = torch.rand(b, n_blocks, device=device).argsort(dim=1).argsort(dim=1)
    coarse = (ranks < n_hidden).float().view(b, 1, *grid)
    for axis in range(3):
        coarse = coarse.repeat_interleave(block, dim=2 + axis)
    return coarse[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()


def masked_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Mean ``|pred - target|`` (``l1``) or squared error (``mse``) over the voxels where ``mask`` is 1."""
    diff = pred - target
    err = diff.abs() if kind == "l1" else diff.square()
    mask = mask.expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


@PRETRAIN_METHODS.register("masked")
class MaskedInpainting(PretrainObjective):
    """Inpaint hidden blocks: a 1x1x1 convolution on the decoder features predicts the original volume."""

    Config = MaskedConfig

    def __init__(self, backbone: MultiTaskNet, cfg: MaskedConfig) -> None:
        super().__init__(backbone, cfg)
        self.recon_head = self.voxel_head()

    def corrupt(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked images, mask): hidden voxels replaced by 0 or by N(0, 1) noise."""
        mask = random_block_mask(images.shape, self.cfg.mask_ratio, self.cfg.block_size, images.device)
        fill = torch.zeros_like(images) if self.cfg.fill == "zero" else torch.randn_like(images)
        return images * (1 - mask) + fill * mask, mask

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        corrupted, mask = self.corrupt(images)
        pred = self.through_body(self.recon_head, corrupted)
        return {"loss": masked_loss(pred, images, mask, self.cfg.loss), "mask_fraction": mask.mean()}
