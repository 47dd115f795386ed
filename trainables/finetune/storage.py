"""Per-task storage: save only what a fine-tuning run trained, and rebuild the model from it.

A fine-tuned model is ``build_backbone(cfg) -> load_body(pre-trained body) -> strategy.apply -> trained
parameters``. The file therefore holds the backbone config, the strategy name and config, the
pre-training reference, and the trainable parameters (plus the persistent buffers of the heads and of
the modules the strategy inserted); the frozen body is the pre-training checkpoint's and is not
copied into every task's file.

Without pre-training (``pretrain_ref is None``) the frozen body is a random initialisation that no
checkpoint holds, so the file also stores the full model state (all parameters and buffers) and
:func:`load_finetuned` needs no body; ``task_storage_bytes`` still counts only the trained part, the
cost a task adds on top of a shared backbone.
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainables.atomic import atomic_write
from trainables.backbones import BackboneConfig, MultiTaskNet, build_backbone, task_of
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES, TaskModule
from trainables.task import as_task

FORMAT_VERSION = 1


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameters with ``requires_grad`` and the persistent buffers of the heads and strategy modules."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    persistent = model.state_dict(keep_vars=True)
    heads = {name for name, _ in model.heads()} if isinstance(model, MultiTaskNet) else set()
    for mod_name, module in model.named_modules():
        if isinstance(module, TaskModule) or mod_name in heads:
            for name, buf in module.named_buffers(prefix=mod_name, recurse=mod_name in heads):
                if name in persistent:
                    state[name] = buf.detach().clone()
    return state


def task_storage_bytes(model: nn.Module) -> int:
    """Bytes one task adds to a shared pre-trained backbone: the size of :func:`trainable_state_dict`."""
    return sum(t.numel() * t.element_size() for t in trainable_state_dict(model).values())


def save_finetuned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    backbone_cfg: dict,
    strategy: str,
    strategy_cfg: dict,
    pretrain_ref: str | None,
    task: dict | None = None,
) -> None:
    """Write the trained part of ``model`` and what is needed to rebuild it, atomically (temp file + rename).

    Args:
        model: the fine-tuned model (after ``strategy.apply`` and training).
        path: destination file (parent folders are created).
        backbone_cfg: ``BackboneConfig.to_dict()`` of the model.
        strategy: registered strategy name.
        strategy_cfg: the strategy config as a dict (``dataclasses.asdict``).
        pretrain_ref: the pre-training checkpoint the body came from; ``None`` stores the full state.
        task: the task spec's dict form (``TaskSpec.to_dict()``); default: the model's own task.
    """
    if is_dataclass(strategy_cfg):
        strategy_cfg = asdict(strategy_cfg)
    BackboneConfig(**backbone_cfg)  # validate before writing anything
    STRATEGIES.get(strategy).make_config(strategy_cfg)
    payload = {
        "format": FORMAT_VERSION,
        "backbone": dict(backbone_cfg),
        "strategy": strategy,
        "strategy_cfg": dict(strategy_cfg),
        "pretrain_ref": pretrain_ref,
        "task": task if task is not None else task_of(model).to_dict(),
        "trained": trainable_state_dict(model),
        "full_state": None
        if pretrain_ref is not None
        else {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def pretrain_ref(model_path: str | os.PathLike) -> str | None:
    """The pre-training checkpoint a fine-tuned ``model.pt`` was saved against (``None``: full state)."""
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    return payload.get("pretrain_ref") if isinstance(payload, dict) else None


def load_finetuned(path: str | os.PathLike, body_state: dict[str, Tensor] | None) -> nn.Module:
    """Rebuild a model saved by :func:`save_finetuned`; its outputs equal the saved model's.

    Args:
        path: the file.
        body_state: the pre-training checkpoint's body (``MultiTaskNet.body_state_dict()``), required when
            the file was saved with a ``pretrain_ref``; ignored for files that store the full state.

    Returns:
        The model with the strategy applied and the trained parameters loaded (in training mode).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise StudyInputError(f"cannot read fine-tuned model {str(path)!r}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise StudyInputError(f"{str(path)!r} is not a fine-tuned model file (format {FORMAT_VERSION})")
    model = build_backbone(BackboneConfig(**payload["backbone"]), as_task(payload.get("task")))  # no task: PCS
    full_state = payload["full_state"]
    if full_state is None:
        if body_state is None:
            raise StudyInputError(
                f"{str(path)!r} was fine-tuned from pre-training {payload['pretrain_ref']!r}: "
                "pass that checkpoint's body state to load it"
            )
        model.load_body(body_state)
    strategy = STRATEGIES.get(payload["strategy"])
    model = strategy.apply(model, strategy.make_config(payload["strategy_cfg"]))
    if full_state is not None:
        model.load_state_dict(full_state, strict=True)
        return model
    trained = payload["trained"]
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(trained)), sorted(set(trained) - set(model.state_dict()))
    if missing or unexpected:
        raise StudyInputError(
            f"{str(path)!r} does not fit strategy {payload['strategy']!r} on backbone "
            f"{payload['backbone'].get('name')!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(trained, strict=False)
    return model
