"""Fine-tuning strategies: one small module each, registered by name in ``STRATEGIES``.

A strategy is a typed config (a dataclass with a help string per field, validated in
``__post_init__``) and ``apply(model, cfg) -> model``: it sets ``requires_grad`` and/or inserts new
modules, in place, and returns the model to train. The task heads always train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from trainables.registry import Registry


@dataclass
class Strategy:
    """A registered fine-tuning strategy: its config class and its ``apply`` function."""

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], nn.Module]

    def make_config(self, params: dict | None = None) -> Any:
        return self.config_cls(**(params or {}))


STRATEGIES: Registry[Strategy] = Registry("fine-tuning strategy")


def register_strategy(name: str, config_cls: type) -> Callable:
    """Decorator for an ``apply(model, cfg)`` function: registers it with its config class."""

    def deco(apply: Callable) -> Callable:
        STRATEGIES.register(name)(Strategy(name, config_cls, apply))
        return apply

    return deco
