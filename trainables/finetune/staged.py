"""Staged fine-tuning: part of the network first, then all of it, with the switch epoch searched.

- ``lp_ft``: linear probing, then full fine-tuning (Kumar et al., ICLR 2022, "Fine-Tuning can Distort
  Pretrained Features and Underperform Out-of-Distribution"): the heads first learn on the frozen body, so
  that full fine-tuning starts from a head that fits the features instead of a random one.
- ``gradual``: the decoder and the heads first with the encoder frozen, then the whole network (the
  "sawtooth" schedule of the nnssl / OpenMind 3D SSL benchmark, Wald et al., 2025).

Both are a :class:`trainables.engine.Schedule`: ``apply`` leaves the second phase's parameters trainable
(what the task stores), the training loop enters the first phase for epochs ``1..switch_epoch`` and ramps the
learning rates up over ``warmup_epochs`` after the switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainables.backbones import MultiTaskNet
from trainables.engine import Schedule
from trainables.finetune import (
    check_float,
    check_int,
    freeze_all,
    register_strategy,
    set_trainable,
    train_heads,
)


@dataclass
class StagedConfig:
    """When the second phase starts and how the learning rates resume after it."""

    switch_fraction: float = field(default=0.5, metadata={
        "help": "share of the epochs in the first phase: the switch epoch is round(fraction x epochs), at least 1 "
                "and at most epochs - 1"})
    warmup_epochs: int = field(default=1, metadata={
        "help": "epochs over which the learning rates ramp up linearly after the switch (0: none)"})

    def __post_init__(self) -> None:
        check_float("switch_fraction", self.switch_fraction, 0.05, 0.95)
        check_int("warmup_epochs", self.warmup_epochs, 0, 10)


def switch_epoch(fraction: float, epochs: int) -> int:
    """The last epoch of the first phase; 0 (no first phase) for a one-epoch budget."""
    return 0 if epochs < 2 else min(epochs - 1, max(1, round(fraction * epochs)))


def _everything(model: MultiTaskNet) -> None:
    set_trainable([model])


def _heads_only(model: MultiTaskNet) -> None:
    freeze_all(model)
    train_heads(model)


def _decoder_and_heads(model: MultiTaskNet) -> None:
    freeze_all(model)
    set_trainable([model.decoder])
    train_heads(model)


def staged_space(name: str):
    def space(trial) -> dict:
        return {"switch_fraction": trial.suggest_float(f"{name}_switch_fraction", 0.2, 0.7),
                "warmup_epochs": trial.suggest_int(f"{name}_warmup_epochs", 0, 2)}

    space.__name__ = f"{name}_space"
    return space


def lp_ft_schedule(model: MultiTaskNet, cfg: StagedConfig, epochs: int) -> Schedule:
    return Schedule(switch_epoch(cfg.switch_fraction, epochs), _heads_only, _everything, cfg.warmup_epochs)


def gradual_schedule(model: MultiTaskNet, cfg: StagedConfig, epochs: int) -> Schedule:
    return Schedule(switch_epoch(cfg.switch_fraction, epochs), _decoder_and_heads, _everything, cfg.warmup_epochs)


@register_strategy("lp_ft", StagedConfig, space=staged_space("lp_ft"), schedule=lp_ft_schedule)
def apply_lp_ft(model: MultiTaskNet, cfg: StagedConfig) -> MultiTaskNet:
    """Heads only until the switch, then everything (the stored task: every parameter)."""
    _everything(model)
    return model


@register_strategy("gradual", StagedConfig, space=staged_space("gradual"), schedule=gradual_schedule)
def apply_gradual(model: MultiTaskNet, cfg: StagedConfig) -> MultiTaskNet:
    """Decoder and heads until the switch, then everything (the stored task: every parameter)."""
    _everything(model)
    return model
