"""Search spaces of the fine-tuning strategies (same names as ``trainables.finetune.STRATEGIES``).

Each returns fields of the strategy's config; Optuna parameter names are prefixed by the strategy name so
they never clash with another space's or with :func:`train_space`'s. ``train_space`` returns fields of
``trainables.engine.TrainConfig`` shared by every strategy (learning rates per part and weight decay;
the batch size is fixed by the study plan so that time and memory compare across cells).
"""

from __future__ import annotations

import optuna

from search_spaces import FINETUNE_SPACES

TARGET_SETS = ["conv", "conv_linear", "encoder"]  # trainables.finetune.peft_methods.TARGET_SETS


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


def no_own_hyperparameters(trial: optuna.Trial) -> dict:
    """Strategies with nothing of their own to search (full, decoder, linear probe, BitFit, SSF): only
    the training loop's hyperparameters (:func:`train_space`)."""
    return {}


for _name in ("full", "decoder", "linear", "bitfit", "ssf"):
    FINETUNE_SPACES.register(_name)(no_own_hyperparameters)


@FINETUNE_SPACES.register("top")
def top_space(trial: optuna.Trial) -> dict:
    """Up to 6 trainable blocks: every backbone has at least 7 (SegResNet), so no value is impossible."""
    return {"trainable_blocks": trial.suggest_int("top_trainable_blocks", 1, 6)}


@FINETUNE_SPACES.register("partial")
def partial_space(trial: optuna.Trial) -> dict:
    """Up to 3 of the deepest encoder stages (every backbone has at least 4)."""
    return {"trainable_stages": trial.suggest_int("partial_trainable_stages", 1, 3)}


@FINETUNE_SPACES.register("mlp")
def mlp_space(trial: optuna.Trial) -> dict:
    return {
        "hidden_layers": trial.suggest_int("mlp_hidden_layers", 1, 3),
        "hidden_width": trial.suggest_categorical("mlp_hidden_width", [32, 64, 128]),
    }


@FINETUNE_SPACES.register("lora")
def lora_space(trial: optuna.Trial) -> dict:
    return {
        "rank": trial.suggest_categorical("lora_rank", [2, 4, 8, 16, 32]),
        "alpha": trial.suggest_categorical("lora_alpha", [4.0, 8.0, 16.0, 32.0]),
        "dropout": trial.suggest_float("lora_dropout", 0.0, 0.2),
        "targets": trial.suggest_categorical("lora_targets", TARGET_SETS),
    }


@FINETUNE_SPACES.register("ia3")
def ia3_space(trial: optuna.Trial) -> dict:
    return {"targets": trial.suggest_categorical("ia3_targets", TARGET_SETS)}


@FINETUNE_SPACES.register("adapter")
def adapter_space(trial: optuna.Trial) -> dict:
    return {
        "reduction": trial.suggest_categorical("adapter_reduction", [2, 4, 8, 16]),
        "kernel_size": trial.suggest_categorical("adapter_kernel_size", [1, 3]),
    }


@FINETUNE_SPACES.register("prompt_shallow")
def prompt_shallow_space(trial: optuna.Trial) -> dict:
    return {"prompt_size": trial.suggest_categorical("prompt_shallow_size", [2, 4, 8, 16])}


@FINETUNE_SPACES.register("prompt_deep")
def prompt_deep_space(trial: optuna.Trial) -> dict:
    return {"prompt_size": trial.suggest_categorical("prompt_deep_size", [1, 2, 4, 8])}


@FINETUNE_SPACES.register("sidetune")
def sidetune_space(trial: optuna.Trial) -> dict:
    return {
        "side_width": trial.suggest_categorical("sidetune_side_width", [8, 16, 32]),
        "side_depth": trial.suggest_int("sidetune_side_depth", 2, 4),
        "alpha_init": trial.suggest_float("sidetune_alpha_init", 0.5, 0.95),
    }
