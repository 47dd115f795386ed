"""The fine-tuning loop's search space, shared by every strategy: ``train_space`` returns fields of
``trainables.engine.TrainConfig`` (learning rates per part and weight decay; the batch size is fixed by the
study plan so that time and memory compare across cells).

Each strategy's own space is registered with the strategy (``trainables.finetune.register_strategy(name,
Config, space=fn)``; ``STRATEGIES.get(name).space``); its Optuna parameter names are prefixed by the
strategy's name, so they never clash with another space's or with :func:`train_space`'s.
"""

from __future__ import annotations

import optuna

# The training fields of every searched cell's first trial besides its strategy's learning rate
# (``Strategy.lr_start``, measured per strategy by bench/starting_points.py; see :func:`first_trial`).
TRAIN_DEFAULTS = {"lr_encoder": 1e-3, "lr_decoder": 1e-3, "lr_heads": 1e-3, "weight_decay": 1e-5}
LR_FIELDS = ("lr_encoder", "lr_decoder", "lr_heads")
# the searched learning-rate ranges around a strategy's start (log scale): the body's from start / 100 to
# start x 10, the heads' from start / 10 to start x 30 (with the default start 1e-3: 1e-5..1e-2 and 1e-4..3e-2)
BODY_RANGE, HEADS_RANGE = (0.01, 10.0), (0.1, 30.0)


def first_trial(strategy: str) -> dict:
    """The training fields of a cell's first search trial: every learning rate at the strategy's ``lr_start``,
    the rest :data:`TRAIN_DEFAULTS`. Without it a cell's result at a few trials depends on the luck of its first
    random draw, and a strategy started at another's rate is compared at a disadvantage."""
    from trainables.finetune import STRATEGIES

    start = STRATEGIES.get(strategy).lr_start
    return {**TRAIN_DEFAULTS, **dict.fromkeys(LR_FIELDS, start)}


def lr_ranges(strategy: str | None = None) -> dict[str, tuple[float, float]]:
    """The searched (low, high) of each learning rate for ``strategy`` (None: the default start 1e-3)."""
    from trainables.finetune import STRATEGIES

    start = STRATEGIES.get(strategy).lr_start if strategy else 1e-3
    body = (start * BODY_RANGE[0], min(start * BODY_RANGE[1], 0.5))
    heads = (start * HEADS_RANGE[0], min(start * HEADS_RANGE[1], 0.5))
    return {"lr_encoder": body, "lr_decoder": body, "lr_heads": heads}


def train_space(trial: optuna.Trial, strategy: str | None = None) -> dict:
    """Per-part learning rates (log-uniform, around ``strategy``'s start: :func:`lr_ranges`) and AdamW weight
    decay: ``TrainConfig`` fields."""
    out = {name: trial.suggest_float(name, low, high, log=True) for name, (low, high) in lr_ranges(strategy).items()}
    out["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    return out
