"""Multi-task 3D backbones (MONAI networks) with named parts.

Every backbone is a :class:`MultiTaskNet`: a segmentation output (background, left PCS, right PCS)
and a per-hemisphere PCS presence output (two logits, ``[left, right]``) computed by a head on the
bottleneck features. The parts have the same names on every architecture, so a fine-tuning strategy
can address "the decoder" or "the last k blocks" without knowing which network it is:

- ``encoder``: ``nn.ModuleList`` of stages, shallow to deep; stage ``i`` maps a channels-first 5D
  tensor to a channels-first 5D tensor with ``stage_channels[i]`` channels. The last output is the
  bottleneck.
- ``decoder``: ``nn.ModuleList`` of blocks in the order they run.
- ``seg_head``: 1x1x1 convolution to the segmentation classes.
- ``cls_head``: :class:`HemisphereHead` on the bottleneck.

The *body* (encoder + decoder) is what pre-training learns and what checkpoints hold; the heads are
task-specific. Inputs are RAS-oriented, so voxel axis 0 runs from the left hemisphere to the right one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR
from torch import nn

from trainables.errors import StudyInputError
from trainables.registry import Registry

BACKBONES: Registry[Callable[[BackboneConfig], MultiTaskNet]] = Registry("backbone")

SEG_CLASSES = 3  # 0 background, 1 left PCS, 2 right PCS
HEMISPHERES = 2  # presence logits [left, right]


@dataclass
class BackboneConfig:
    """Which network and how wide.

    Args:
        name: registered backbone name (``unet``, ``segresnet``, ``swinunetr``).
        width: base number of feature channels (the first stage's width; SwinUNETR rounds to a multiple of 12).
        in_channels: image channels (1 for T1).
        dropout: dropout before the classification head.
    """

    name: str = "segresnet"
    width: int = 16
    in_channels: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        BACKBONES.get(self.name)  # clear error listing valid names
        if not isinstance(self.width, int) or self.width < 4:
            raise StudyInputError(f"backbone width must be an integer >= 4, got {self.width!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise StudyInputError(f"backbone dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class HemisphereHead(nn.Module):
    """Per-hemisphere presence logits from bottleneck features.

    The bottleneck is split along voxel axis 0 (left | right in RAS), each half is average-pooled,
    and one shared MLP (``hidden`` layers, 0 = linear) maps each half's pooled features to a logit.
    Sharing the weights between hemispheres doubles the examples the head sees.
    """

    def __init__(self, channels: int, hidden_layers: int = 0, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        width = channels
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        d = bottleneck.shape[2]
        half = max(d // 2, 1)
        left = bottleneck[:, :, :half].mean(dim=(2, 3, 4))
        right = bottleneck[:, :, d - half :].mean(dim=(2, 3, 4))
        pooled = torch.stack([left, right], dim=1)  # (B, 2, C)
        return self.mlp(pooled).squeeze(-1)  # (B, 2)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values (identifies exact weights)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class MultiTaskNet(nn.Module):
    """Base class: subclasses build ``encoder``/``decoder`` (and override ``decode`` if not U-Net-like)."""

    encoder: nn.ModuleList
    decoder: nn.ModuleList
    stage_channels: list[int]
    decoder_channels: int
    cls_stage: int = -1  # which encoder output the classification head reads (the bottleneck)

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg

    def _map_native(self, net: nn.Module) -> None:
        """Remember the MONAI network's own name of every body tensor (``native_keys``: our key -> MONAI's),
        found by tensor identity, so checkpoints written from MONAI's class load by their own names."""
        names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
        self.native_keys = {k: names[id(t)] for k, t in self.state_dict(keep_vars=True).items() if id(t) in names}

    def _init_heads(self) -> None:
        self.seg_head = nn.Conv3d(self.decoder_channels, SEG_CLASSES, kernel_size=1)
        self.cls_head = HemisphereHead(self.stage_channels[self.cls_stage], dropout=self.config.dropout)

    # -- forward pieces ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder stages; returns each stage's output, the last being the bottleneck."""
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return feats

    def decode(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Full-resolution decoder features (``decoder_channels``) from the input and encoder features.

        The default is the U-Net pattern: each decoder block takes the deeper result and the next
        shallower encoder output (``block(u, skip)``); SwinUNETR overrides it.
        """
        u = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            u = block(u, skip)
        return u

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encode(x)
        dec = self.decode(x, feats)
        return {"seg": self.seg_head(dec), "cls": self.cls_head(feats[self.cls_stage])}

    # -- named parts ------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Every body block in forward order: encoder stages, then decoder blocks (for "last k blocks")."""
        enc = [(f"encoder.{i}", m) for i, m in enumerate(self.encoder)]
        dec = [(f"decoder.{i}", m) for i, m in enumerate(self.decoder)]
        return enc + dec

    def heads(self) -> list[tuple[str, nn.Module]]:
        return [("seg_head", self.seg_head), ("cls_head", self.cls_head)]

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights: what a pre-training checkpoint holds."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.split(".")[0] in ("encoder", "decoder")}

    def body_fingerprint(self) -> str:
        """sha256 of the body's weights: equal to :func:`state_fingerprint` of the checkpoint it was loaded from."""
        return state_fingerprint(self.body_state_dict())

    def load_body(self, state: dict[str, torch.Tensor]) -> None:
        """Load a pre-training checkpoint's body with strict key matching (heads keep their init)."""
        own = {k for k in self.state_dict() if k.split(".")[0] in ("encoder", "decoder")}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise StudyInputError(
                f"checkpoint does not fit backbone {self.config.name!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; was it pre-trained with another backbone or width?"
            )
        mine = self.state_dict()
        wrong = [k for k in own if tuple(state[k].shape) != tuple(mine[k].shape)]
        if wrong:
            raise StudyInputError(
                f"checkpoint does not fit backbone {self.config.name!r} of width {self.config.width}: "
                f"{len(wrong)} tensors differ in shape (e.g. {wrong[0]}); was it pre-trained at another width?"
            )
        self.load_state_dict(state, strict=False)


def _groups(width: int, most: int = 8) -> int:
    """The largest group count <= ``most`` that divides ``width`` (so every stage's channels divide too)."""
    return max(g for g in range(1, most + 1) if width % g == 0)


# -- UNet (MONAI BasicUNet) ------------------------------------------------------------------------
@BACKBONES.register("unet")
class UNetMultiTask(MultiTaskNet):
    """MONAI ``BasicUNet`` (Ronneberger et al., 2015; Falk et al., 2019): 5 stages, 4 up-blocks, group norm."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        w = cfg.width
        feats = (w, w, 2 * w, 4 * w, 8 * w, w)
        # group norm (not BasicUNet's default instance norm) so that a one-voxel bottleneck (16^3 inputs) trains
        net = BasicUNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=SEG_CLASSES, features=feats,
                        norm=("group", {"num_groups": _groups(w)}))
        self.encoder = nn.ModuleList([net.conv_0, net.down_1, net.down_2, net.down_3, net.down_4])
        self.decoder = nn.ModuleList([net.upcat_4, net.upcat_3, net.upcat_2, net.upcat_1])
        self.stage_channels = list(feats[:5])
        self.decoder_channels = feats[5]
        self._map_native(net)
        self._init_heads()


# -- SegResNet -------------------------------------------------------------------------------------
class _SegResUp(nn.Module):
    """One SegResNet decoder step: upsample, add the skip, residual blocks."""

    def __init__(self, up: nn.Module, blocks: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.blocks = blocks

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.up(x) + skip)


@BACKBONES.register("segresnet")
class SegResNetMultiTask(MultiTaskNet):
    """MONAI ``SegResNet`` (Myronenko, 2018, "3D MRI brain tumor segmentation using autoencoder regularization")."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        w = cfg.width
        net = SegResNet(
            spatial_dims=3,
            init_filters=w,
            in_channels=cfg.in_channels,
            out_channels=SEG_CLASSES,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            norm=("GROUP", {"num_groups": _groups(w)}),
            use_conv_final=False,
        )
        stem = nn.Sequential(net.convInit, net.down_layers[0])
        self.encoder = nn.ModuleList([stem, *list(net.down_layers)[1:]])
        self.decoder = nn.ModuleList(
            [_SegResUp(up, blocks) for up, blocks in zip(net.up_samples, net.up_layers, strict=True)]
        )
        self.stage_channels = [w, 2 * w, 4 * w, 8 * w]
        self.decoder_channels = w
        self._map_native(net)
        self._init_heads()


# -- SwinUNETR -------------------------------------------------------------------------------------
class _SwinStage(nn.Module):
    """A Swin stage (BasicLayer list of one) taking and returning channels-first tensors."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x.contiguous())


class _SkipUp(nn.Module):
    """SwinUNETR decoder step: a residual block on the skip feature, then an UNETR up-block."""

    def __init__(self, skip_block: nn.Module, up_block: nn.Module) -> None:
        super().__init__()
        self.skip_block = skip_block
        self.up_block = up_block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.up_block(x, self.skip_block(skip))


def _layer_norm_channels(x: torch.Tensor) -> torch.Tensor:
    """SwinTransformer.proj_out: parameter-free layer norm over the channel axis of a 5D tensor."""
    x = x.movedim(1, -1)
    x = nn.functional.layer_norm(x, [x.shape[-1]])
    return x.movedim(-1, 1)


@BACKBONES.register("swinunetr")
class SwinUNETRMultiTask(MultiTaskNet):
    """MONAI ``SwinUNETR`` (Hatamizadeh et al., 2022, "Swin UNETR"), the source study's transformer-CNN.

    Input sides must be multiples of 32. At 32^3 the last Swin stage is a single voxel, which cannot
    tell left from right, so the classification head reads the stage before it (``cls_stage = -2``,
    2^3 at 32^3). Group normalisation replaces instance normalisation in the CNN blocks so that
    batch-of-one single-voxel features normalise.
    """

    cls_stage = -2

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        fs = 12 * max(1, round(cfg.width / 12))
        net = SwinUNETR(
            in_channels=cfg.in_channels,
            out_channels=SEG_CLASSES,
            feature_size=fs,
            spatial_dims=3,
            norm_name=("group", {"num_groups": 4}),
        )
        vit = net.swinViT
        stem = nn.Sequential(vit.patch_embed, vit.pos_drop)
        self.encoder = nn.ModuleList(
            [stem, _SwinStage(vit.layers1), _SwinStage(vit.layers2), _SwinStage(vit.layers3), _SwinStage(vit.layers4)]
        )
        self.decoder = nn.ModuleList(
            [
                net.encoder10,  # bottleneck residual block
                _SkipUp(nn.Identity(), net.decoder5),
                _SkipUp(net.encoder4, net.decoder4),
                _SkipUp(net.encoder3, net.decoder3),
                _SkipUp(net.encoder2, net.decoder2),
                _SkipUp(net.encoder1, net.decoder1),
            ]
        )
        self.stage_channels = [fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.decoder_channels = fs
        self._map_native(net)
        self._init_heads()

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if any(s % 32 for s in x.shape[2:]):
            raise StudyInputError(f"swinunetr needs input sides that are multiples of 32, got {tuple(x.shape[2:])}")
        return super().encode(x)

    def decode(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        h = [_layer_norm_channels(f) for f in feats]
        u = self.decoder[0](h[4])
        u = self.decoder[1](u, h[3])
        u = self.decoder[2](u, h[2])
        u = self.decoder[3](u, h[1])
        u = self.decoder[4](u, h[0])
        return self.decoder[5](u, x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encode(x)
        dec = self.decode(x, feats)
        return {"seg": self.seg_head(dec), "cls": self.cls_head(_layer_norm_channels(feats[self.cls_stage]))}


def build_backbone(cfg: BackboneConfig) -> MultiTaskNet:
    """Construct the registered backbone ``cfg.name``."""
    return BACKBONES.get(cfg.name)(cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
