"""Denoising-diffusion pre-training: the body learns to predict the noise added to a volume.

DDPM (Ho et al., 2020, "Denoising diffusion probabilistic models"), the simple loss
``|| eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2`` with ``t`` uniform, using
MONAI's ``DDPMScheduler`` for the noise schedule and the forward process (``add_noise``).

How the timestep reaches the network: the backbones have no timestep input, so ``t`` is encoded as a
sinusoidal embedding (Vaswani et al., 2017, as in DDPM) passed through a two-layer MLP to
``stage_channels[-1]`` channels and *added to the bottleneck*:
``feats = encode(x_t); feats[-1] += emb(t)[:, :, None, None, None]; eps_hat = head(decode(x_t, feats))``.
The embedding MLP and the 1x1x1 noise head belong to the objective, not the checkpointed body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.pretrain import PRETRAIN_METHODS, PretrainObjective, check

if TYPE_CHECKING:  # MONAI is imported where it is used: importing this module stays cheap
    from monai.networks.schedulers import DDPMScheduler

SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = field(default=1000, metadata={"help": "T, the number of diffusion steps"})
    schedule: str = field(
        default="linear_beta", metadata={"help": f"beta schedule, one of {', '.join(SCHEDULES)}"}
    )
    beta_start: float = field(default=1e-4, metadata={"help": "first beta (linear/scaled/sigmoid schedules)"})
    beta_end: float = field(default=2e-2, metadata={"help": "last beta (linear/scaled/sigmoid schedules)"})
    embedding_dim: int = field(
        default=64, metadata={"help": "size of the sinusoidal timestep embedding (even)"}
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2,
            f"diffusion num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}",
        )
        check(
            self.schedule in SCHEDULES,
            f"diffusion schedule must be one of {SCHEDULES}, got {self.schedule!r}",
        )
        check(
            0 < self.beta_start < self.beta_end < 1,
            f"diffusion betas need 0 < beta_start < beta_end < 1, got {self.beta_start!r}, {self.beta_end!r}",
        )
        check(
            isinstance(self.embedding_dim, int) and self.embedding_dim >= 2 and self.embedding_dim % 2 == 0,
            f"diffusion embedding_dim must be an even integer >= 2, got {self.embedding_dim!r}",
        )

    def scheduler(self) -> DDPMScheduler:
        """MONAI's DDPM scheduler for this schedule."""
        from monai.networks.schedulers import DDPMScheduler

        extra = (
            {} if self.schedule == "cosine" else {"beta_start": self.beta_start, "beta_end": self.beta_end}
        )
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, schedule=self.schedule, **extra)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B,)`` integer timesteps -> ``(B, dim)``: ``[sin(t w_k), cos(t w_k)]``, ``w_k = 10000^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half
    )
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


@PRETRAIN_METHODS.register("diffusion")
class Diffusion(PretrainObjective):
    """DDPM noise prediction with the timestep embedding added at the bottleneck."""

    Config = DiffusionConfig

    def __init__(self, backbone: MultiTaskNet, cfg: DiffusionConfig) -> None:
        super().__init__(backbone, cfg)
        self.scheduler = cfg.scheduler()
        channels = backbone.stage_channels[-1]
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.embedding_dim, channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        self.noise_head = self.voxel_head()

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t)."""
        feats = self.backbone.encode(noisy)
        emb = self.time_mlp(sinusoidal_embedding(timesteps, self.cfg.embedding_dim)).to(feats[-1].dtype)
        feats[-1] = feats[-1] + emb[:, :, None, None, None]
        return self.noise_head(self.backbone.decode(noisy, feats))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        timesteps = torch.randint(0, self.cfg.num_train_timesteps, (b,), device=images.device)
        noise = torch.randn_like(images)
        noisy = self.scheduler.add_noise(images, noise, timesteps)
        return {"loss": F.mse_loss(self.predict_noise(noisy, timesteps), noise)}
