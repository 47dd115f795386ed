"""Pre-training objectives: one small module each, registered by name in ``PRETRAIN_METHODS``.

An objective is a :class:`PretrainObjective`: an ``nn.Module`` that owns the backbone plus the
method's own heads (reconstruction head, projection head, discriminator, time embedding...). Its
``forward(images)`` returns a dict of losses with at least ``loss``; ``players()`` says which
parameters each loss's optimiser steps (one optimiser per loss key, e.g. generator ``loss`` and
discriminator ``d_loss`` for the adversarial method), so one loop (:mod:`trainables.pretrain.loop`)
serves every method. What pre-training leaves behind is the backbone's body (encoder + decoder).

Importing this package registers every method.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.errors import StudyInputError
from trainables.registry import Registry


class PretrainObjective(nn.Module):
    """Base class: a backbone plus the method's own heads, returning a dict of losses.

    Subclasses set ``Config`` (a ``@dataclass`` with a help string per field and validation in
    ``__post_init__``), build their heads in ``__init__`` and implement ``forward``.
    """

    Config: ClassVar[type]
    trains: ClassVar[bool] = True  # False for the random-initialisation baseline: the loop skips epochs

    def __init__(self, backbone: MultiTaskNet, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for a batch of images ``(B, C, D, H, W)``; must contain ``loss``."""
        raise NotImplementedError

    def voxel_head(self) -> nn.Conv3d:
        """A new 1x1x1 convolution from the decoder's features to one value per input channel and voxel
        (a reconstruction, or a noise estimate)."""
        return nn.Conv3d(self.backbone.decoder_channels, self.backbone.config.in_channels, kernel_size=1)

    def through_body(self, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``head`` on the decoder's features of ``images``: encode, decode (with skips), head."""
        return head(self.backbone.decode(images, self.backbone.encode(images)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the backbone's task heads (which pre-training never uses)."""
        return [
            p
            for name, p in self.named_parameters()
            if not name.startswith(("backbone.seg_head", "backbone.cls_head"))
        ]

    def players(self) -> dict[str, list[nn.Parameter]]:
        """Loss name -> the parameters its optimiser steps, in the order the loop steps them."""
        return {"loss": self.trainable_parameters()}

    def lr_scale(self, player: str) -> float:
        """Multiplier on the base learning rate for ``player``'s optimiser."""
        return 1.0


PRETRAIN_METHODS: Registry[type[PretrainObjective]] = Registry("pre-training method")


def method_config(method: str, params: dict | None = None) -> Any:
    """The typed config of ``method`` from a plain dict; unknown fields raise :class:`StudyInputError`."""
    config_cls = PRETRAIN_METHODS.get(method).Config
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(params or {}) - names)
    if unknown:
        raise StudyInputError(
            f"unknown parameter(s) {unknown} for pre-training method {method!r}; valid: {sorted(names)}"
        )
    return config_cls(**(params or {}))


def build_objective(
    method: str, backbone: MultiTaskNet, params: dict | Any | None = None
) -> PretrainObjective:
    """Construct the registered objective ``method`` around ``backbone``.

    Args:
        method: registered method name.
        backbone: the network whose body pre-training learns.
        params: the method's config, as a dict of its fields or as the typed config itself.
    """
    cls = PRETRAIN_METHODS.get(method)
    cfg = params if isinstance(params, cls.Config) else method_config(method, params)
    return cls(backbone, cfg)


def pixel_loss(kind: str) -> nn.Module:
    """``l1`` or ``mse`` as an ``nn.Module`` (mean reduction)."""
    return nn.L1Loss() if kind == "l1" else nn.MSELoss()


def check(condition: bool, message: str) -> None:
    """Raise :class:`StudyInputError` with ``message`` unless ``condition``."""
    if not condition:
        raise StudyInputError(message)


# Register every method (these modules import the names above).
from trainables.pretrain import (  # noqa: E402
    adversarial,  # noqa: F401
    contrastive,  # noqa: F401
    diffusion,  # noqa: F401
    masked,  # noqa: F401
    random_init,  # noqa: F401
    reconstruction,  # noqa: F401
)
