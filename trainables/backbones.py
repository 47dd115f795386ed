"""Multi-task 3D backbones (MONAI networks) with named parts.

Every backbone is a :class:`MultiTaskNet` built for a task (:class:`trainables.task.TaskSpec`): a
segmentation output with one channel per segmentation class and a classification output with the task's
logits, computed by a head on the bottleneck features (the PCS task: background / left / right PCS, and one
presence logit per hemisphere). The parts have the same names on every architecture, so a fine-tuning
strategy can address "the decoder" or "the last k blocks" without knowing which network it is:

- ``encoder``: ``nn.ModuleList`` of stages, shallow to deep; stage ``i`` maps a channels-first 5D
  tensor to a channels-first 5D tensor with ``stage_channels[i]`` channels. The last output is the
  bottleneck.
- ``decoder``: ``nn.ModuleList`` of blocks in the order they run.
- ``seg_head``: 1x1x1 convolution to the segmentation classes.
- ``cls_head``: :class:`PooledHead` on the bottleneck (one per target when a task has several).

The *body* (encoder + decoder) is what pre-training learns and what checkpoints hold; the heads are
task-specific. Inputs are RAS-oriented, so voxel axis 0 runs from the left hemisphere to the right one.

Each backbone registers with what it needs of its input and width (:class:`BackboneInfo`, as timm's
per-model configs do); the grid, the search spaces and the tests read those constraints from the registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from trainables.errors import StudyInputError
from trainables.registry import Registry
from trainables.task import Target, TaskSpec, as_task


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone needs and has, declared where it is registered.

    Args:
        input_multiple: every input side must be a multiple of this (SwinUNETR's patch merging: 32).
        width_step: the width is rounded to a multiple of this (SwinUNETR's heads: 12); 1 = taken as given.
        encoder_stages: encoder stages (``partial`` may train up to ``encoder_stages - 1``).
        blocks: body blocks, encoder and decoder (``top`` may train up to ``blocks - 1``).
    """

    input_multiple: int = 1
    width_step: int = 1
    encoder_stages: int = 4
    blocks: int = 7

    def fits(self, size: tuple[int, ...]) -> bool:
        """Whether every side of ``size`` is a multiple of ``input_multiple``."""
        return not any(s % self.input_multiple for s in size)


BACKBONES: Registry[Callable[..., MultiTaskNet]] = Registry("backbone")
BACKBONE_INFO: dict[str, BackboneInfo] = {}


def register_backbone(name: str, info: BackboneInfo) -> Callable:
    """Class decorator: registers a :class:`MultiTaskNet` subclass under ``name`` with its constraints."""

    def deco(cls: type) -> type:
        BACKBONES.register(name)(cls)
        BACKBONE_INFO[name] = info
        return cls

    return deco


def backbone_info(name: str) -> BackboneInfo:
    BACKBONES.get(name)  # the error listing valid names
    return BACKBONE_INFO[name]


@dataclass
class BackboneConfig:
    """Which network and how wide.

    Args:
        name: registered backbone name (``unet``, ``segresnet``, ``swinunetr``).
        width: base number of feature channels (the first stage's width; rounded to the backbone's
            ``width_step``: SwinUNETR's 12).
        in_channels: image channels (1 for T1).
        dropout: dropout before the classification head.
        cls_reads_seg: the classification head also reads the model's own segmentation: a binary target whose
            regions name their segments adds, per region, a learned multiple of the log-odds of that segment's
            most confident voxel in the region (:meth:`PooledHead.seg_evidence`; the segmentation detached, so
            the classification loss does not train it). Off by default: ``bench/recipe.py`` (lever ``seghead``) measured
            it raising every cell's mean and widening the between-run spread of the cells at the edge of learning.
        cls_trains_body: the classification loss trains the body through the head's pooled features; false: the
            head reads the body's features as they are (detached), and only the segmentation loss trains the body.
    """

    name: str = "segresnet"
    width: int = 16
    in_channels: int = 1
    dropout: float = 0.0
    cls_reads_seg: bool = False
    cls_trains_body: bool = True

    def __post_init__(self) -> None:
        BACKBONES.get(self.name)  # clear error listing valid names
        if not isinstance(self.width, int) or self.width < 4:
            raise StudyInputError(f"backbone width must be an integer >= 4, got {self.width!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise StudyInputError(f"backbone dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("cls_reads_seg", "cls_trains_body"):
            if not isinstance(getattr(self, name), bool):
                raise StudyInputError(f"backbone {name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# BackboneConfig fields that shape only the task heads: a pre-training checkpoint (the body) does not depend on them
HEAD_ONLY_FIELDS = ("dropout", "cls_reads_seg", "cls_trains_body")


class PooledHead(nn.Module):
    """One classification target's logits from bottleneck features (and, optionally, the segmentation).

    The bottleneck is average-pooled over the whole volume (one region) or over each half along the
    target's axis (two regions: the PCS hemispheres along RAS axis 0), and one shared MLP (``hidden_layers``,
    0 = linear) maps each region's pooled features to the target's logits (1 for a binary target, K for K
    classes). Sharing the weights between regions doubles the examples the head sees. With ``seg_channels``
    (a binary target, one segmentation channel per region) the head adds ``seg_weight`` (learned, from 1) times
    :meth:`seg_evidence`: the presence of a structure read from its own segmentation. Output
    ``(B, regions x logits)``, region-major.
    """

    def __init__(self, channels: int, target: Target, hidden_layers: int = 0, hidden: int = 64,
                 dropout: float = 0.0, seg_channels: tuple[int, ...] | None = None, trains_body: bool = True) -> None:
        super().__init__()
        self.trains_body = trains_body
        self.halves = target.pooling == "halves"
        self.axis = target.axis
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        width = channels
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, target.logits_per_region))
        self.mlp = nn.Sequential(*layers)
        self.seg_channels = tuple(seg_channels) if seg_channels else None
        if self.seg_channels is not None:
            if target.logits_per_region != 1 or len(self.seg_channels) != len(target.regions):
                raise StudyInputError(f"target {target.name!r}: reading the segmentation needs a binary target with "
                                      "one segment per region")
            self.seg_weight = nn.Parameter(torch.ones(1))

    def regions(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """``volume`` ``(B, C, D, H, W)`` cut into the target's regions: the low and high half along the axis
        (two regions), or the whole volume."""
        if not self.halves:
            return [volume]
        d = volume.shape[2 + self.axis]
        half = max(d // 2, 1)
        return [volume.narrow(2 + self.axis, 0, half), volume.narrow(2 + self.axis, d - half, half)]

    def seg_evidence(self, seg: torch.Tensor) -> torch.Tensor:
        """``(B, regions)``: the log-odds of the most confident voxel of each region's segment in that region
        (a voxel is labelled where its class is the most probable, so the structure is there when this is
        high; near 0 for an untrained segmentation)."""
        prob = torch.softmax(seg.detach().float(), dim=1)
        parts = self.regions(prob)
        peaks = [part[:, channel].flatten(1).amax(1) for part, channel in zip(parts, self.seg_channels, strict=True)]
        return torch.logit(torch.stack(peaks, dim=1), eps=1e-4)

    def forward(self, bottleneck: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        if not self.trains_body:
            bottleneck = bottleneck.detach()
        pooled = torch.stack([part.mean(dim=(2, 3, 4)) for part in self.regions(bottleneck)], dim=1)  # (B, R, C)
        logits = self.mlp(pooled)
        if self.seg_channels is not None and seg is not None:
            logits = logits + self.seg_weight * self.seg_evidence(seg).to(logits.dtype)[..., None]
        return logits.flatten(1)


class TargetHeads(nn.Module):
    """The heads of a task with several targets (or none), their logits side by side in the spec's order."""

    def __init__(self, heads: dict[str, PooledHead]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(self, bottleneck: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        if not self.heads:  # a segmentation-only task
            return bottleneck.new_zeros(bottleneck.shape[0], 0)
        return torch.cat([h(bottleneck, seg) for h in self.heads.values()], dim=1)


def classification_head(channels: int, task: TaskSpec, hidden_layers: int = 0, hidden: int = 64,
                        dropout: float = 0.0, reads_seg: bool = False, trains_body: bool = True) -> nn.Module:
    """The task's classification head: a :class:`PooledHead` for one target, else :class:`TargetHeads`.
    ``reads_seg``: a binary target whose regions name their segments also reads the segmentation;
    ``trains_body``: the classification loss reaches the body through the pooled features."""

    def seg_channels(t: Target) -> tuple[int, ...] | None:
        if not (reads_seg and t.binary and t.segments):
            return None
        return tuple(task.channel_of(s) for s in t.segments)

    heads = {t.name: PooledHead(channels, t, hidden_layers, hidden, dropout, seg_channels(t), trains_body)
             for t in task.targets}
    if len(heads) == 1:
        return next(iter(heads.values()))
    return TargetHeads(heads)


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

    def __init__(self, cfg: BackboneConfig, task: TaskSpec | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.task = as_task(task)

    def _map_native(self, net: nn.Module) -> None:
        """Remember the MONAI network's own name of every body tensor (``native_keys``: our key -> MONAI's),
        found by tensor identity, so checkpoints written from MONAI's class load by their own names."""
        names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
        self.native_keys = {k: names[id(t)] for k, t in self.state_dict(keep_vars=True).items() if id(t) in names}

    def _init_heads(self) -> None:
        self.seg_head = nn.Conv3d(self.decoder_channels, self.task.seg_channels, kernel_size=1)
        self.rebuild_cls_head()

    def rebuild_cls_head(self, hidden_layers: int = 0, hidden: int = 64) -> None:
        """A new classification head for the task on the bottleneck (``hidden_layers`` > 0: an MLP)."""
        self.cls_head = classification_head(self.stage_channels[self.cls_stage], self.task, hidden_layers, hidden,
                                            self.config.dropout, self.config.cls_reads_seg,
                                            self.config.cls_trains_body)

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
        seg = self.seg_head(dec)
        return {"seg": seg, "cls": self.cls_head(feats[self.cls_stage], seg)}

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
@register_backbone("unet", BackboneInfo(encoder_stages=5, blocks=9))
class UNetMultiTask(MultiTaskNet):
    """MONAI ``BasicUNet`` (Ronneberger et al., 2015; Falk et al., 2019): 5 stages, 4 up-blocks, group norm."""

    def __init__(self, cfg: BackboneConfig, task: TaskSpec | None = None) -> None:
        super().__init__(cfg, task)
        w = cfg.width
        feats = (w, w, 2 * w, 4 * w, 8 * w, w)
        # group norm (not BasicUNet's default instance norm) so that a one-voxel bottleneck (16^3 inputs) trains
        from monai.networks.nets import BasicUNet

        net = BasicUNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=self.task.seg_channels, features=feats,
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


@register_backbone("segresnet", BackboneInfo(encoder_stages=4, blocks=7))
class SegResNetMultiTask(MultiTaskNet):
    """MONAI ``SegResNet`` (Myronenko, 2018, "3D MRI brain tumor segmentation using autoencoder regularization")."""

    def __init__(self, cfg: BackboneConfig, task: TaskSpec | None = None) -> None:
        super().__init__(cfg, task)
        w = cfg.width
        from monai.networks.nets import SegResNet

        net = SegResNet(
            spatial_dims=3,
            init_filters=w,
            in_channels=cfg.in_channels,
            out_channels=self.task.seg_channels,
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


@register_backbone("swinunetr", BackboneInfo(input_multiple=32, width_step=12, encoder_stages=5, blocks=11))
class SwinUNETRMultiTask(MultiTaskNet):
    """MONAI ``SwinUNETR`` (Hatamizadeh et al., 2022, "Swin UNETR"), the source study's transformer-CNN.

    Input sides must be multiples of 32. At 32^3 the last Swin stage is a single voxel, which cannot
    tell left from right, so the classification head reads the stage before it (``cls_stage = -2``,
    2^3 at 32^3). Group normalisation replaces instance normalisation in the CNN blocks so that
    batch-of-one single-voxel features normalise.
    """

    cls_stage = -2

    def __init__(self, cfg: BackboneConfig, task: TaskSpec | None = None) -> None:
        super().__init__(cfg, task)
        step = BACKBONE_INFO["swinunetr"].width_step
        fs = step * max(1, round(cfg.width / step))
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(
            in_channels=cfg.in_channels,
            out_channels=self.task.seg_channels,
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
        multiple = BACKBONE_INFO["swinunetr"].input_multiple
        if not BACKBONE_INFO["swinunetr"].fits(tuple(x.shape[2:])):
            raise StudyInputError(f"swinunetr needs input sides that are multiples of {multiple}, got "
                                  f"{tuple(x.shape[2:])}")
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
        seg = self.seg_head(dec)
        return {"seg": seg, "cls": self.cls_head(_layer_norm_channels(feats[self.cls_stage]), seg)}


def build_backbone(cfg: BackboneConfig, task: TaskSpec | None = None) -> MultiTaskNet:
    """Construct the registered backbone ``cfg.name`` for ``task`` (default: the PCS task)."""
    return BACKBONES.get(cfg.name)(cfg, task)


def task_of(model: nn.Module) -> TaskSpec:
    """The task of the :class:`MultiTaskNet` inside ``model`` (a strategy may have wrapped it); the PCS task for
    a model that names none."""
    for module in model.modules():
        if isinstance(getattr(module, "task", None), TaskSpec):
            return module.task
    return as_task(None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
