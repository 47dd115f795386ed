"""Visual prompt tuning adapted to a 3D CNN (Jia et al., 2022, "Visual Prompt Tuning").

VPT prepends learnable tokens to a ViT's sequence; a CNN has no tokens, so the prompts here are
*additive* (as in Bahng et al., 2022, "Exploring Visual Prompts for Adapting Large-Scale Models"):

- ``prompt_shallow``: one learnable pattern of ``prompt_size^3`` voxels per input channel, trilinearly
  up-sampled to the input's size and added to the image before the first encoder stage (VPT-shallow).
  A low-resolution pattern, rather than a full-resolution border, keeps the prompt independent of the
  input size and smooth. (SwinUNETR's last decoder block also reads the raw image; it sees it unprompted.)
- ``prompt_deep``: one such pattern (``stage_channels[i]`` channels) added to every encoder stage's
  output (VPT-deep: new prompts at every layer).

Prompts are zero-initialised, so the start equals the pre-trained model. Body frozen; prompts (inside
``encoder``, so at the encoder learning rate) and heads train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.finetune import TaskModule, check_int, freeze_all, register_strategy, train_heads


@dataclass
class PromptConfig:
    """Prompt size."""

    prompt_size: int = field(
        default=4, metadata={"help": "side, in voxels, of each learnable prompt pattern before up-sampling"}
    )

    def __post_init__(self) -> None:
        check_int("prompt.prompt_size", self.prompt_size, 1, 64)


class AdditivePrompt(TaskModule):
    """``x + upsample(pattern)``: a zero-initialised learnable low-resolution pattern."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.pattern = nn.Parameter(torch.zeros(1, channels, size, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt = F.interpolate(self.pattern, size=x.shape[2:], mode="trilinear", align_corners=False)
        return x + prompt.to(x.dtype)


class PromptedStage(nn.Module):
    """An encoder stage with a prompt added to its input (``before``) or to its output."""

    def __init__(self, stage: nn.Module, prompt: AdditivePrompt, before: bool) -> None:
        super().__init__()
        self.stage = stage
        self.prompt = prompt
        self.before = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.prompt(x)) if self.before else self.prompt(self.stage(x))


def prompt_shallow_space(trial) -> dict:
    return {"prompt_size": trial.suggest_categorical("prompt_shallow_size", [2, 4, 8, 16])}


def prompt_deep_space(trial) -> dict:
    return {"prompt_size": trial.suggest_categorical("prompt_deep_size", [1, 2, 4, 8])}


@register_strategy("prompt_shallow", PromptConfig, space=prompt_shallow_space, lr_start=0.01)
def apply_prompt_shallow(model: MultiTaskNet, cfg: PromptConfig) -> MultiTaskNet:
    """Add a learnable prompt to the input image; body frozen; prompt and heads train."""
    freeze_all(model)
    prompt = AdditivePrompt(model.config.in_channels, cfg.prompt_size)
    model.encoder[0] = PromptedStage(model.encoder[0], prompt, before=True)
    train_heads(model)
    return model


@register_strategy("prompt_deep", PromptConfig, space=prompt_deep_space, lr_start=0.01)
def apply_prompt_deep(model: MultiTaskNet, cfg: PromptConfig) -> MultiTaskNet:
    """Add a learnable prompt to every encoder stage's output; body frozen; prompts and heads train."""
    freeze_all(model)
    for i, channels in enumerate(model.stage_channels):
        model.encoder[i] = PromptedStage(
            model.encoder[i], AdditivePrompt(channels, cfg.prompt_size), before=False
        )
    train_heads(model)
    return model
