"""Strategies that are a rule for which parameters train (no new modules, except the Mlp-k head).

- ``full``: everything trains (the usual transfer-learning baseline; Tajbakhsh et al., 2016,
  "Convolutional neural networks for medical image analysis: full training or fine tuning?").
- ``decoder``: the pre-trained encoder is frozen; decoder and heads train (Tajbakhsh et al., 2016).
- ``top``: the last ``trainable_blocks`` body blocks train (Yosinski et al., 2014, "How transferable
  are features in deep neural networks?").
- ``linear``: only the heads train (linear probing; the "Linear" baseline of Jia et al., 2022, VPT).
- ``partial``: the last ``trainable_stages`` encoder stages and the heads train (VPT's Partial-k).
- ``mlp``: frozen body, the classification head becomes a k-layer MLP (VPT's Mlp-k).
- ``bitfit``: only the bias terms of the body and the heads train (Ben Zaken et al., 2022, "BitFit").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from trainables.backbones import BACKBONES, MultiTaskNet, backbone_info
from trainables.errors import StudyInputError
from trainables.finetune import check_int, freeze_all, register_strategy, set_trainable, train_heads


@dataclass
class NoConfig:
    """A strategy without hyperparameters."""


@register_strategy("full", NoConfig)
def apply_full(model: MultiTaskNet, cfg: NoConfig) -> MultiTaskNet:
    """Every parameter trains."""
    set_trainable([model])
    return model


@register_strategy("decoder", NoConfig)
def apply_decoder(model: MultiTaskNet, cfg: NoConfig) -> MultiTaskNet:
    """Frozen encoder; decoder and heads train."""
    freeze_all(model)
    set_trainable([model.decoder])
    train_heads(model)
    return model


@register_strategy("linear", NoConfig, lr_start=0.01)
def apply_linear(model: MultiTaskNet, cfg: NoConfig) -> MultiTaskNet:
    """Frozen body; only the segmentation and classification heads train."""
    freeze_all(model)
    train_heads(model)
    return model


@dataclass
class TopConfig:
    """Train the last blocks of ``model.blocks()`` (encoder stages, then decoder blocks)."""

    trainable_blocks: int = field(
        default=3,
        metadata={
            "help": "how many of the last body blocks train; the blocks before them (the frozen depth) do not"
        },
    )

    def __post_init__(self) -> None:
        check_int("top.trainable_blocks", self.trainable_blocks, 1)


def _train_last(model: MultiTaskNet, modules: list[nn.Module], k: int, field_name: str, what: str) -> MultiTaskNet:
    """Freeze the model, then let the last ``k`` of ``modules`` and the heads train; ``k`` beyond their
    number is a clear error naming ``field_name`` and ``what`` they are."""
    if k > len(modules):
        raise StudyInputError(f"{field_name}={k} but backbone {model.config.name!r} has only {len(modules)} {what}")
    freeze_all(model)
    set_trainable(modules[len(modules) - k :])
    train_heads(model)
    return model


def most_blocks_shared(attribute: str) -> int:
    """The smallest ``BackboneInfo.<attribute>`` over the registered backbones: what every backbone has."""
    return min(getattr(backbone_info(name), attribute) for name in BACKBONES.names())


def top_space(trial) -> dict:
    """Up to one block fewer than the shallowest registered backbone has (SegResNet's 7: 1-6), so no value
    is impossible on any backbone."""
    return {"trainable_blocks": trial.suggest_int("top_trainable_blocks", 1, most_blocks_shared("blocks") - 1)}


@register_strategy("top", TopConfig, space=top_space)
def apply_top(model: MultiTaskNet, cfg: TopConfig) -> MultiTaskNet:
    """Freeze the first ``len(blocks) - trainable_blocks`` blocks; the rest and the heads train."""
    return _train_last(model, [m for _, m in model.blocks()], cfg.trainable_blocks,
                       "top.trainable_blocks", "body blocks; use 'full' to train them all")


@dataclass
class PartialConfig:
    """VPT's Partial-k: the last k encoder stages train, the decoder stays frozen."""

    trainable_stages: int = field(
        default=1, metadata={"help": "how many of the deepest encoder stages train (k)"}
    )

    def __post_init__(self) -> None:
        check_int("partial.trainable_stages", self.trainable_stages, 1)


def partial_space(trial) -> dict:
    """Up to one stage fewer than the registered backbone with the fewest encoder stages (SegResNet's 4: 1-3)."""
    return {"trainable_stages": trial.suggest_int("partial_trainable_stages", 1, most_blocks_shared("encoder_stages") - 1)}


@register_strategy("partial", PartialConfig, space=partial_space, lr_start=0.003)
def apply_partial(model: MultiTaskNet, cfg: PartialConfig) -> MultiTaskNet:
    """Freeze the body except the last ``trainable_stages`` encoder stages; the heads train."""
    return _train_last(model, list(model.encoder), cfg.trainable_stages, "partial.trainable_stages",
                       "encoder stages")


@dataclass
class MlpConfig:
    """VPT's Mlp-k: a frozen body under a deeper classification head."""

    hidden_layers: int = field(
        default=2, metadata={"help": "hidden layers of the new classification MLP head (k)"}
    )
    hidden_width: int = field(default=64, metadata={"help": "units per hidden layer"})

    def __post_init__(self) -> None:
        check_int("mlp.hidden_layers", self.hidden_layers, 1, 8)
        check_int("mlp.hidden_width", self.hidden_width, 4)


def mlp_space(trial) -> dict:
    return {
        "hidden_layers": trial.suggest_int("mlp_hidden_layers", 1, 3),
        "hidden_width": trial.suggest_categorical("mlp_hidden_width", [32, 64, 128]),
    }


@register_strategy("mlp", MlpConfig, space=mlp_space, lr_start=0.01)
def apply_mlp(model: MultiTaskNet, cfg: MlpConfig) -> MultiTaskNet:
    """Replace ``cls_head`` by a ``hidden_layers``-layer MLP head; body frozen, both heads train."""
    model.rebuild_cls_head(hidden_layers=cfg.hidden_layers, hidden=cfg.hidden_width)
    freeze_all(model)
    train_heads(model)
    return model


@register_strategy("bitfit", NoConfig, lr_start=0.01)
def apply_bitfit(model: MultiTaskNet, cfg: NoConfig) -> MultiTaskNet:
    """Only parameters named ``bias`` (convolution, linear and normalisation biases) and the heads train.

    Swin's ``relative_position_bias_table`` is an attention table, not a bias term: it stays frozen.
    """
    freeze_all(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.requires_grad_(True)
    train_heads(model)
    return model
