"""The fine-tuning loop's search space, shared by every strategy: ``train_space`` returns fields of
``trainables.engine.TrainConfig`` (learning rates per part and weight decay; the batch size is fixed by the
study plan so that time and memory compare across cells).

Each strategy's own space is registered with the strategy (``trainables.finetune.register_strategy(name,
Config, space=fn)``; ``STRATEGIES.get(name).space``); its Optuna parameter names are prefixed by the
strategy's name, so they never clash with another space's or with :func:`train_space`'s.
"""

from __future__ import annotations

import optuna

# The first trial of every searched cell: learning rates at which the from-scratch baseline learns at the
# laptop budget (bench/calibrate.py, bench/RESULTS.md); TPE then searches around it. Without it a cell's
# result at a few trials depends on the luck of its first random draw.
TRAIN_DEFAULTS = {"lr_encoder": 1e-3, "lr_decoder": 1e-3, "lr_heads": 1e-3, "weight_decay": 1e-5}


def train_space(trial: optuna.Trial) -> dict:
    """Per-part learning rates (log-uniform) and AdamW weight decay: ``TrainConfig`` fields."""
    return {
        "lr_encoder": trial.suggest_float("lr_encoder", 1e-5, 1e-2, log=True),
        "lr_decoder": trial.suggest_float("lr_decoder", 1e-5, 1e-2, log=True),
        "lr_heads": trial.suggest_float("lr_heads", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }
