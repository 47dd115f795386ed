"""Search spaces of the pre-training methods (same names as ``trainables.pretrain.PRETRAIN_METHODS``).

Each returns fields of the method's config (Optuna parameter names are prefixed by the method name, so
they never clash with another space's); ``pretrain_train_space`` returns fields of
``trainables.pretrain.loop.PretrainConfig`` (learning rate, weight decay).
"""

from __future__ import annotations

import optuna

from search_spaces import PRETRAIN_SPACES


@PRETRAIN_SPACES.register("none")
def none_space(trial: optuna.Trial) -> dict:
    """Random initialisation has nothing to tune."""
    return {}


@PRETRAIN_SPACES.register("reconstruction")
def reconstruction_space(trial: optuna.Trial) -> dict:
    return {
        "loss": trial.suggest_categorical("reconstruction_loss", ["l1", "mse"]),
        "ssim_weight": trial.suggest_float("reconstruction_ssim_weight", 0.0, 1.0),
    }


@PRETRAIN_SPACES.register("contrastive")
def contrastive_space(trial: optuna.Trial) -> dict:
    return {
        "temperature": trial.suggest_float("contrastive_temperature", 0.05, 0.5, log=True),
        "projection_dim": trial.suggest_categorical("contrastive_projection_dim", [32, 64, 128]),
        "min_crop": trial.suggest_float("contrastive_min_crop", 0.4, 0.9),
        "flip_prob": trial.suggest_categorical("contrastive_flip_prob", [0.0, 0.5]),
    }


@PRETRAIN_SPACES.register("adversarial")
def adversarial_space(trial: optuna.Trial) -> dict:
    return {
        "adv_weight": trial.suggest_float("adversarial_adv_weight", 0.01, 1.0, log=True),
        "disc_lr_ratio": trial.suggest_float("adversarial_disc_lr_ratio", 0.25, 4.0, log=True),
        "criterion": trial.suggest_categorical("adversarial_criterion", ["least_squares", "bce"]),
        "mask_ratio": trial.suggest_categorical("adversarial_mask_ratio", [0.0, 0.25, 0.5]),
    }


@PRETRAIN_SPACES.register("diffusion")
def diffusion_space(trial: optuna.Trial) -> dict:
    return {
        "num_train_timesteps": trial.suggest_categorical("diffusion_num_train_timesteps", [250, 500, 1000]),
        "schedule": trial.suggest_categorical(
            "diffusion_schedule", ["linear_beta", "scaled_linear_beta", "cosine"]
        ),
    }


@PRETRAIN_SPACES.register("masked")
def masked_space(trial: optuna.Trial) -> dict:
    return {
        "mask_ratio": trial.suggest_float("masked_mask_ratio", 0.3, 0.8),
        "block_size": trial.suggest_categorical("masked_block_size", [2, 4, 8]),
        "fill": trial.suggest_categorical("masked_fill", ["zero", "noise"]),
    }


def pretrain_train_space(trial: optuna.Trial) -> dict:
    """Optimiser hyperparameters shared by every method (``PretrainConfig`` fields)."""
    return {
        "lr": trial.suggest_float("pretrain_lr", 1e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("pretrain_weight_decay", 1e-6, 1e-3, log=True),
    }
