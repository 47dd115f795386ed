"""Optuna define-by-run search spaces of the pre-training methods (same names as their registry) and of the
fine-tuning loop (``finetune.train_space``); a fine-tuning strategy's own space is registered with the
strategy (``trainables.finetune.STRATEGIES.get(name).space``).

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
from search_spaces import pretrain as _pretrain  # noqa: E402,F401  (registers the pre-training spaces)
