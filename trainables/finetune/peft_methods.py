"""Low-rank and rescaling adapters from HF peft, injected in place into the body.

- ``lora``: LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the
  body's ``Conv3d`` (and ``Linear``) layers; peft's Conv3d LoRA is a ``k^3`` conv to ``rank`` channels
  followed by a zero-initialised ``1^3`` conv back, so the start equals the pre-trained model.
- ``ia3``: (IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
  than In-Context Learning"): learned vectors, initialised to one, rescale activations.

``peft.inject_adapter_in_model`` replaces the targeted layers in place, so the model stays a
``MultiTaskNet`` with the same ``forward`` and named parts. Targets are given as one anchored regular
expression of exact module names (peft ``fullmatch``-es a string target), which keeps the heads out.
``ConvTranspose3d`` layers (UNet / SwinUNETR up-sampling) are not targeted: peft's LoRA and IA3 do not
support them. peft (and the transformers library it imports) is imported when a strategy is applied,
not when the registry is, because it takes seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from trainables.backbones import MultiTaskNet
from trainables.errors import StudyInputError
from trainables.finetune import (
    body_modules,
    check_choice,
    check_float,
    freeze_all,
    register_strategy,
    train_heads,
)

TARGET_SETS = ("conv", "conv_linear", "encoder")
LORA_RANKS = (2, 4, 8, 16, 32)
_FEEDFORWARD_LINEAR = ("linear2", "fc2")  # second layer of a transformer MLP: (IA)^3's l_ff


def target_names(model: MultiTaskNet, targets: str) -> list[str]:
    """Dotted names of the body layers a target set selects.

    ``conv``: every ``Conv3d`` of encoder and decoder; ``conv_linear``: plus every ``Linear``
    (SwinUNETR's attention, MLP and patch-merging layers); ``encoder``: ``Conv3d`` and ``Linear`` of the
    encoder only (the decoder stays frozen).
    """
    kinds: tuple[type, ...] = (nn.Conv3d,) if targets == "conv" else (nn.Conv3d, nn.Linear)
    parts = ("encoder",) if targets == "encoder" else ("encoder", "decoder")
    names = [n for n, m in body_modules(model, parts) if type(m) in kinds]
    if not names:
        raise StudyInputError(f"target set {targets!r} selects no layer of backbone {model.config.name!r}")
    return names


def _pattern(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


@dataclass
class LoraStrategyConfig:
    """LoRA hyperparameters (peft ``LoraConfig``)."""

    rank: int = field(default=4, metadata={"help": f"rank r of the low-rank update, one of {LORA_RANKS}"})
    alpha: float = field(default=8.0, metadata={"help": "lora_alpha: the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input, in [0, 1)"})
    targets: str = field(
        default="conv_linear", metadata={"help": f"which body layers get LoRA: {TARGET_SETS}"}
    )

    def __post_init__(self) -> None:
        check_choice("lora.rank", self.rank, LORA_RANKS)
        check_float("lora.alpha", self.alpha, 0.0, 1024.0)
        if self.alpha <= 0:
            raise StudyInputError(f"lora.alpha must be > 0, got {self.alpha!r}")
        check_float("lora.dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_choice("lora.targets", self.targets, TARGET_SETS)


def lora_space(trial) -> dict:
    return {
        "rank": trial.suggest_categorical("lora_rank", [2, 4, 8, 16, 32]),
        "alpha": trial.suggest_categorical("lora_alpha", [4.0, 8.0, 16.0, 32.0]),
        "dropout": trial.suggest_float("lora_dropout", 0.0, 0.2),
        "targets": trial.suggest_categorical("lora_targets", list(TARGET_SETS)),
    }


@register_strategy("lora", LoraStrategyConfig, space=lora_space)
def apply_lora(model: MultiTaskNet, cfg: LoraStrategyConfig) -> MultiTaskNet:
    """Inject LoRA into the selected body layers; only LoRA matrices and the heads train."""
    from peft import LoraConfig

    names = target_names(model, cfg.targets)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_pattern(names),
        bias="none",
    )
    return _inject_and_train(model, config, ".lora_")


def _inject_and_train(model: MultiTaskNet, config, marker: str) -> MultiTaskNet:
    """Inject a peft adapter in place; only its parameters (names containing ``marker``) and the heads train."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)
    freeze_all(model)
    for name, p in model.named_parameters():
        if marker in name:
            p.requires_grad_(True)
    train_heads(model)
    return model


@dataclass
class IA3StrategyConfig:
    """(IA)^3 hyperparameters (peft ``IA3Config``)."""

    targets: str = field(
        default="conv_linear", metadata={"help": f"which body layers get (IA)^3 vectors: {TARGET_SETS}"}
    )

    def __post_init__(self) -> None:
        check_choice("ia3.targets", self.targets, TARGET_SETS)


def feedforward_names(model: MultiTaskNet, names: list[str]) -> list[str]:
    """The targets whose *input* is rescaled (peft ``feedforward_modules``), the others' output is.

    Every ``Conv3d`` is feed-forward: its output usually enters a normalisation layer, which would cancel
    a per-channel output scale (exactly so for instance norm), so the vector rescales the activations
    coming in, like (IA)^3's ``l_ff`` on the FFN's hidden activations. For ``Linear`` layers the paper's
    rule holds: the second MLP layer is feed-forward, the attention / merging projections are rescaled
    at their output (``l_k``, ``l_v``; Swin fuses q, k and v into one ``qkv`` layer).
    """
    modules = dict(model.named_modules())
    return [
        n for n in names if isinstance(modules[n], nn.Conv3d) or n.rsplit(".", 1)[-1] in _FEEDFORWARD_LINEAR
    ]


def ia3_space(trial) -> dict:
    return {"targets": trial.suggest_categorical("ia3_targets", list(TARGET_SETS))}


@register_strategy("ia3", IA3StrategyConfig, space=ia3_space, lr_start=0.01)
def apply_ia3(model: MultiTaskNet, cfg: IA3StrategyConfig) -> MultiTaskNet:
    """Inject (IA)^3 vectors into the selected body layers; only they and the heads train."""
    from peft import IA3Config

    names = target_names(model, cfg.targets)
    ff = feedforward_names(model, names)
    config = IA3Config(target_modules=_pattern(names), feedforward_modules=_pattern(ff) if ff else [])
    return _inject_and_train(model, config, ".ia3_l.")
