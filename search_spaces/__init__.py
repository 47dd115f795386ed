"""Optuna define-by-run search spaces, one per registered method and strategy (same names).

A space takes an ``optuna.Trial``, calls ``trial.suggest_*`` (branching for conditional parameters)
and returns a dict of constants; it builds and computes nothing. The dict's keys are the fields of the
method's or strategy's typed config.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from trainables.registry import Registry

SpaceFn = Callable[[optuna.Trial], dict]

PRETRAIN_SPACES: Registry[SpaceFn] = Registry("pre-training search space")
FINETUNE_SPACES: Registry[SpaceFn] = Registry("fine-tuning search space")

from search_spaces import finetune as _finetune  # noqa: E402,F401  (registers the fine-tuning spaces)
from search_spaces import pretrain as _pretrain  # noqa: E402,F401  (registers the pre-training spaces)
