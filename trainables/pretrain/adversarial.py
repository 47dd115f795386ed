"""Adversarial restoration: the body reconstructs a (block-masked) volume against a PatchGAN critic.

The generator is the backbone plus a 1x1x1 reconstruction head; the discriminator is MONAI's
``PatchDiscriminator`` (Isola et al., 2017, "Image-to-image translation with conditional adversarial
networks", pix2pix: adversarial + lambda * L1). The adversarial criterion is least squares (Mao et al.,
2017, LSGAN) or BCE, via MONAI's ``PatchAdversarialLoss``. Masking the input (``mask_ratio > 0``) makes
it an adversarial inpainting task, as in context encoders (Pathak et al., 2016); ``mask_ratio = 0`` is
plain adversarial autoencoding.

``forward`` returns the generator's ``loss`` and the discriminator's ``d_loss`` (computed on
``fake.detach()``, so it never reaches the generator); ``players`` gives each its own optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, check
from trainables.pretrain.masked import random_block_mask


@dataclass
class AdversarialConfig:
    adv_weight: float = field(default=0.1, metadata={"help": "weight of the generator's adversarial loss"})
    recon_weight: float = field(
        default=1.0, metadata={"help": "lambda: weight of the L1 reconstruction loss"}
    )
    criterion: str = field(default="least_squares", metadata={"help": "'least_squares' (LSGAN) or 'bce'"})
    disc_channels: int = field(default=8, metadata={"help": "discriminator's first-layer channels"})
    disc_layers: int = field(
        default=2, metadata={"help": "discriminator's strided layers (each halves the side)"}
    )
    disc_lr_ratio: float = field(default=1.0, metadata={"help": "discriminator lr / generator lr"})
    mask_ratio: float = field(
        default=0.25, metadata={"help": "fraction of blocks hidden in the input; 0 = autoencode"}
    )
    block_size: int = field(default=4, metadata={"help": "side of a hidden cubic block in voxels"})

    def __post_init__(self) -> None:
        check(self.adv_weight >= 0, f"adversarial adv_weight must be >= 0, got {self.adv_weight!r}")
        check(self.recon_weight >= 0, f"adversarial recon_weight must be >= 0, got {self.recon_weight!r}")
        check(
            self.criterion in ("least_squares", "bce"),
            f"adversarial criterion must be 'least_squares' or 'bce', got {self.criterion!r}",
        )
        for name in ("disc_channels", "disc_layers", "block_size"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"adversarial {name} must be an integer >= 1, got {value!r}",
            )
        check(self.disc_lr_ratio > 0, f"adversarial disc_lr_ratio must be > 0, got {self.disc_lr_ratio!r}")
        check(0 <= self.mask_ratio < 1, f"adversarial mask_ratio must be in [0, 1), got {self.mask_ratio!r}")


@PRETRAIN_METHODS.register("adversarial")
class Adversarial(PretrainObjective):
    """Generator (backbone + recon head) vs. 3D PatchGAN discriminator; two players, two optimisers."""

    Config = AdversarialConfig

    def __init__(self, backbone: MultiTaskNet, cfg: AdversarialConfig) -> None:
        super().__init__(backbone, cfg)
        self.recon_head = self.voxel_head()
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        self.discriminator = PatchDiscriminator(
            spatial_dims=3,
            channels=cfg.disc_channels,
            in_channels=backbone.config.in_channels,
            num_layers_d=cfg.disc_layers,
            norm="INSTANCE",
        )
        self.adversarial_loss = PatchAdversarialLoss(criterion=cfg.criterion)
        self.l1 = nn.L1Loss()

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        """The generator's reconstruction of ``images`` from its (masked) input."""
        inputs = images
        if self.cfg.mask_ratio > 0:
            mask = random_block_mask(images.shape, self.cfg.mask_ratio, self.cfg.block_size, images.device)
            inputs = images * (1 - mask)
        return self.through_body(self.recon_head, inputs)

    def critic(self, volumes: torch.Tensor) -> torch.Tensor:
        """The discriminator's patch logits (its last output)."""
        return self.discriminator(volumes)[-1]

    def players(self) -> dict[str, list[nn.Parameter]]:
        critic_ids = {id(p) for p in self.discriminator.parameters()}
        generator = [p for p in self.trainable_parameters() if id(p) not in critic_ids]
        return {"loss": generator, "d_loss": list(self.discriminator.parameters())}

    def lr_scale(self, player: str) -> float:
        return self.cfg.disc_lr_ratio if player == "d_loss" else 1.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fake = self.generate(images)
        recon = self.l1(fake, images)
        g_adv = self.adversarial_loss(self.critic(fake), target_is_real=True, for_discriminator=False)
        d_fake = self.adversarial_loss(
            self.critic(fake.detach()), target_is_real=False, for_discriminator=True
        )
        d_real = self.adversarial_loss(self.critic(images), target_is_real=True, for_discriminator=True)
        return {
            "loss": self.cfg.recon_weight * recon + self.cfg.adv_weight * g_adv,
            "d_loss": 0.5 * (d_fake + d_real),
            "recon_loss": recon,
            "g_adv_loss": g_adv,
        }
