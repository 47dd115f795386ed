"""Every registered backbone: shapes, no NaN, named parts, body checkpoint round-trip."""

from __future__ import annotations

import pytest
import torch

from trainables.backbones import BACKBONES, BackboneConfig, backbone_info, build_backbone
from trainables.errors import StudyInputError
from trainables.task import default_task

SEG_CLASSES = default_task().seg_channels


def tiny(name: str) -> tuple[BackboneConfig, int]:
    """Tiny config and input side per backbone, from its registered constraints (SwinUNETR: multiples of 32)."""
    info = backbone_info(name)
    return BackboneConfig(name=name, width=max(8, info.width_step)), max(16, info.input_multiple)


# every backbone at its tiny size and at 32^3 (SwinUNETR's tiny size is 32^3 already)
SIZES = [(name, side) for name in BACKBONES.names() for side in sorted({tiny(name)[1], 32})]


@pytest.mark.parametrize(("name", "side"), SIZES, ids=[f"{n}-{s}" for n, s in SIZES])
def test_forward_backward_shapes(name: str, side: int) -> None:
    cfg, _ = tiny(name)
    torch.manual_seed(0)
    model = build_backbone(cfg)
    x = torch.randn(2, 1, side, side, side)
    out = model(x)
    assert out["seg"].shape == (2, SEG_CLASSES, side, side, side)
    assert out["cls"].shape == (2, 2)
    loss = out["seg"].square().mean() + out["cls"].square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    # every parameter sits in a named part
    names = [n for n, _ in model.named_parameters()]
    assert all(n.split(".")[0] in {"encoder", "decoder", "seg_head", "cls_head"} for n in names)
    assert len(model.encoder) == len(model.stage_channels)
    feats = model.encode(x)
    assert [f.shape[1] for f in feats] == model.stage_channels


@pytest.mark.parametrize("name", BACKBONES.names())
def test_body_checkpoint_round_trip(name: str) -> None:
    cfg, side = tiny(name)
    torch.manual_seed(1)
    a = build_backbone(cfg)
    torch.manual_seed(2)
    b = build_backbone(cfg)
    b.load_body(a.body_state_dict())
    for k, v in a.body_state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.seg_head.weight, b.seg_head.weight)  # heads keep their own init


def test_checkpoint_from_other_backbone_is_refused() -> None:
    a = build_backbone(BackboneConfig("unet", width=8))
    b = build_backbone(BackboneConfig("segresnet", width=8))
    with pytest.raises(StudyInputError, match="does not fit backbone 'segresnet'"):
        b.load_body(a.body_state_dict())


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(StudyInputError, match="valid backbones: unet, segresnet, swinunetr"):
        BackboneConfig(name="resnet50")


def test_hemisphere_head_separates_left_from_right() -> None:
    """The head pools each half of axis 0 (left | right in RAS) on its own."""
    model = build_backbone(BackboneConfig("segresnet", width=8))
    head = model.cls_head
    feat = torch.zeros(1, model.stage_channels[-1], 4, 4, 4)
    feat[:, :, :2] = 1.0  # only the left half is active
    out = head(feat)
    bias_only = head(torch.zeros_like(feat))
    assert not torch.allclose(out[0, 0], bias_only[0, 0])
    assert torch.allclose(out[0, 1], bias_only[0, 1])
