"""Fine-tuning strategies: one small module each, registered by name in ``STRATEGIES``.

A strategy is a typed config (a dataclass with a help string per field, validated in
``__post_init__``), ``apply(model, cfg) -> model`` (it sets ``requires_grad`` and/or inserts new
modules, in place, and returns the model to train; the task heads always train) and its Optuna search
space, registered together in one call (as peft's ``register_peft_method`` registers config, model and
prefix): ``@register_strategy(name, ConfigClass, space=fn)``. A space is a define-by-run function of an
``optuna.Trial`` that only calls ``trial.suggest_*`` (prefixing parameter names with the strategy's name)
and returns fields of the config; the training loop's own hyperparameters are
``search_spaces.finetune.train_space``. A new strategy is one file and one registration.

Importing this package registers every strategy: it imports each of its modules (``basic``, ``peft_methods``,
``adapter``, ``prompt``, ``sidetune``, ``ssf``, and any file added here); ``storage`` saves and reloads what one
task trained.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from trainables.backbones import BackboneConfig, MultiTaskNet, build_backbone
from trainables.errors import StudyInputError
from trainables.registry import Registry
from trainables.task import TaskSpec


@dataclass
class Strategy:
    """A registered fine-tuning strategy: its config class and its ``apply`` function."""

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], nn.Module]
    space: Callable[[Any], dict]  # optuna.Trial -> config fields
    # a staged strategy: (model after apply, config, epochs) -> trainables.engine.Schedule of its two phases
    schedule: Callable[[nn.Module, Any, int], Any] | None = None
    needs_teacher: bool = False  # learns from its teacher cell's best model (distillation)
    from_scratch: bool = False  # builds its own network: pre-training does not reach it (crossed with `none` only)
    # (backbone, width, the cell's fixed strategy params) -> why the strategy cannot run there, or None
    unfit: Callable[[str, int, dict], str | None] | None = None
    # the learning rate of every part in the cell's first search trial, measured per strategy at the laptop
    # budget (bench/starting_points.py); the searched ranges are centred on it (search_spaces.finetune)
    lr_start: float = 1e-3

    def why_unfit(self, backbone: str, width: int, params: dict | None = None) -> str | None:
        """Why this strategy cannot run on ``backbone`` at ``width`` (None: it can)."""
        return self.unfit(backbone, width, dict(params or {})) if self.unfit is not None else None

    def make_config(self, params: dict | None = None) -> Any:
        """The typed config from a plain dict; unknown keys raise :class:`StudyInputError`."""
        params = dict(params or {})
        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise StudyInputError(
                f"strategy {self.name!r} has no parameter(s) {unknown}; "
                f"its parameters: {sorted(known) or 'none'}"
            )
        return self.config_cls(**params)


STRATEGIES: Registry[Strategy] = Registry("fine-tuning strategy")


def no_own_hyperparameters(trial: Any) -> dict:
    """The space of a strategy with nothing of its own to search: only the training loop's hyperparameters."""
    return {}


def register_strategy(name: str, config_cls: type, space: Callable[[Any], dict] = no_own_hyperparameters, *,
                      schedule: Callable[[nn.Module, Any, int], Any] | None = None, needs_teacher: bool = False,
                      from_scratch: bool = False, unfit: Callable[[str, int, dict], str | None] | None = None,
                      lr_start: float = 1e-3) -> Callable:
    """Decorator for an ``apply(model, cfg)`` function: registers it with its config class and search space
    (and, for a staged strategy, its ``schedule``; for distillation, ``needs_teacher``; for a network built
    from scratch, ``from_scratch``; for one that cannot run on every backbone and width, ``unfit``; where its
    search of the learning rates starts, ``lr_start``, measured by ``bench/starting_points.py``)."""
    if not (isinstance(lr_start, float) and 0 < lr_start < 1):
        raise StudyInputError(f"strategy {name!r}: lr_start must be a float in (0, 1), got {lr_start!r}")

    def deco(apply: Callable) -> Callable:
        STRATEGIES.register(name)(Strategy(name, config_cls, apply, space, schedule, needs_teacher, from_scratch,
                                           unfit, lr_start))
        return apply

    return deco


# -- helpers shared by the strategy modules --------------------------------------------------------
class TaskModule(nn.Module):
    """Base class of the modules a strategy inserts (adapters, prompts, SSF, side network, a distillation
    student).

    :func:`trainables.finetune.storage.trainable_state_dict` stores their buffers with the
    trainable parameters; :meth:`metrics` is logged with every epoch of the trial.
    """

    def metrics(self) -> dict[str, float]:
        """Numbers about the module the trial logs (none by default)."""
        return {}


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise :class:`StudyInputError` unless ``value`` is an int in ``[low, high]``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise StudyInputError(f"{name} must be an integer {bound}, got {value!r}")


def check_float(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise :class:`StudyInputError` unless ``value`` is a number in ``[low, high]`` (``[low, high)``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low <= value < high if high_open else low <= value <= high):
        closing = ")" if high_open else "]"
        raise StudyInputError(f"{name} must be a number in [{low}, {high}{closing}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`StudyInputError` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise StudyInputError(f"{name} must be one of {choices}, got {value!r}")


def set_trainable(modules: Iterable[nn.Module], flag: bool = True) -> None:
    """Set ``requires_grad`` on every parameter of ``modules``."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def freeze_all(model: nn.Module) -> None:
    """Freeze every parameter of ``model``."""
    set_trainable([model], False)


def train_heads(model: MultiTaskNet) -> None:
    """Make the task heads trainable (every strategy does this last)."""
    set_trainable([m for _, m in model.heads()])


def body_modules(
    model: MultiTaskNet, parts: tuple[str, ...] = ("encoder", "decoder")
) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, module)`` for every module inside the named body parts."""
    for part in parts:
        yield from getattr(model, part).named_modules(prefix=part)


def replace_module(model: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``dotted_name`` is."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_applicable(name: str, backbone: str, input_size: tuple[int, int, int] = (32, 32, 32),
                     task: TaskSpec | None = None) -> None:
    """Raise :class:`StudyInputError` (with the reason) if strategy ``name`` cannot fine-tune ``backbone``.

    Builds the narrowest model of the backbone, applies the strategy with its default config and runs
    one training-mode forward pass of two ``input_size`` volumes (training mode, because e.g. instance
    norm refuses a one-voxel bottleneck only then: UNet at 16^3); the study grid calls this before any
    trial runs.
    """
    strategy = STRATEGIES.get(name)
    model = build_backbone(BackboneConfig(name=backbone, width=8), task)
    in_channels = model.config.in_channels
    try:
        model = strategy.apply(model, strategy.make_config())
        if not any(p.requires_grad for p in model.parameters()):
            raise StudyInputError("it leaves no parameter trainable")
        model.train()
        x = torch.randn(2, in_channels, *input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(x)
        if not all(torch.isfinite(v).all() for v in out.values()):
            raise StudyInputError("the forward pass is not finite")
    except StudyInputError as err:
        raise StudyInputError(f"strategy {name!r} cannot fine-tune backbone {backbone!r}: {err}") from err
    except (RuntimeError, TypeError, ValueError) as err:
        raise StudyInputError(
            f"strategy {name!r} cannot fine-tune backbone {backbone!r} at input size {input_size}: {err}"
        ) from err


# Register every strategy: import every module of this package (they import its helpers above), so a new
# strategy is one new file here; ``basic`` (full, decoder, linear probe, ...) first, the others by name.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "basic", m.name)):
    importlib.import_module(f"{__name__}.{_module.name}")

from trainables.finetune.storage import (  # noqa: E402
    load_finetuned,
    save_finetuned,
    task_storage_bytes,
    trainable_state_dict,
)

__all__ = [
    "STRATEGIES",
    "Strategy",
    "TaskModule",
    "check_applicable",
    "load_finetuned",
    "register_strategy",
    "save_finetuned",
    "task_storage_bytes",
    "trainable_state_dict",
]
