"""Remapping tuning: knowledge distillation into a smaller student, and the student's label-only twin.

The Visual Tuning survey (Yu et al., 2023, arXiv 2305.06061) calls the fifth family of tuning *remapping*:
moving a pre-trained model's knowledge into a new, usually smaller, downstream model. Here:

- ``distill``: a student backbone (``student_width`` of the teacher's width, or another registered backbone)
  learns from its teacher, the best fine-tuned model of its teacher cell in the same study (by default the
  same pre-training fine-tuned with ``full``), through soft targets at a temperature (Hinton et al., 2015,
  "Distilling the Knowledge in a Neural Network"): the segmentation's per-voxel class distributions and the
  classification targets' class distributions, ``T^2 KL(teacher_T || student_T)``, weighted ``soft_weight``
  against the task's own loss on the true labels (``1 - soft_weight``). The teacher is frozen and kept out of
  the student's modules, parameters and stored task.
- ``student``: the same student trained on the labels alone, from scratch (``from_scratch``: the grid crosses
  it with ``none`` only), so that the report can show what the teacher adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from trainables.backbones import BACKBONES, BackboneConfig, MultiTaskNet, backbone_info, build_backbone
from trainables.errors import StudyInputError
from trainables.finetune import TaskModule, check_choice, check_float, register_strategy, set_trainable


@dataclass
class StudentConfig:
    """The student network: a narrower copy of the teacher's backbone, or another registered backbone."""

    student_width: float = field(default=0.5, metadata={
        "help": "the student's width as a share of the teacher's (rounded to the backbone's width step, at least 4)"})
    student_backbone: str = field(default="", metadata={
        "help": "a registered backbone for the student; empty: the teacher's"})

    def __post_init__(self) -> None:
        check_float("student_width", self.student_width, 0.1, 1.0)
        if self.student_backbone:
            check_choice("student_backbone", self.student_backbone, BACKBONES.names())


@dataclass
class DistillConfig(StudentConfig):
    """Distillation: the student above, the temperature and the weight of the teacher's soft targets."""

    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the soft targets (T)"})
    soft_weight: float = field(default=0.5, metadata={
        "help": "weight of the distillation loss; the task's loss on the labels gets 1 - soft_weight"})
    teacher: str = field(default="", metadata={
        "help": "the teacher's model.pt (set by the study: its teacher cell's best model)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("temperature", self.temperature, 0.5, 20.0)
        check_float("soft_weight", self.soft_weight, 0.0, 1.0)
        if not isinstance(self.teacher, str) or (self.teacher and not self.teacher.endswith(".pt")):
            raise StudyInputError(f"teacher must be the path of a fine-tuned model.pt (or empty), got {self.teacher!r}")


def student_width(backbone: str, teacher_width: int, fraction: float) -> int:
    """The student's width: ``fraction`` of the teacher's, rounded to the backbone's width step, and at
    least 4 (SwinUNETR: 12, its width step)."""
    step = backbone_info(backbone).width_step
    narrowest = step * math.ceil(4 / step)
    return max(narrowest, step * round(teacher_width * fraction / step))


def no_narrower_student(backbone: str, width: int, params: dict) -> str | None:
    """Why a student cannot be narrower than its ``width`` teacher on ``backbone`` (None: it can)."""
    if params.get("student_backbone"):
        return None  # another backbone: its size is the user's choice
    narrowest = student_width(backbone, width, 0.0)
    if narrowest < width:
        return None
    return (f"on {backbone} at width {width} the narrowest student (width {narrowest}) is as wide as its teacher; "
            f"use --width {2 * narrowest} or more for a student that is smaller than its teacher")


def student_backbone(teacher: MultiTaskNet, cfg: StudentConfig) -> MultiTaskNet:
    """A new, randomly initialised student for the teacher's task."""
    name = cfg.student_backbone or teacher.config.name
    width = student_width(name, teacher.config.width, cfg.student_width)
    return build_backbone(BackboneConfig(name, width=width, dropout=teacher.config.dropout), teacher.task)


def load_teacher(path: str) -> nn.Module:
    """The teacher's fine-tuned model (``model.pt``, with the pre-training body it refers to), frozen, in eval."""
    from trainables import shared_storage
    from trainables.finetune.storage import load_finetuned, pretrain_ref
    from trainables.pretrain.loop import load_checkpoint

    local = shared_storage.find(path)
    if local is None:
        raise StudyInputError(f"distillation teacher {path} does not exist; was its cell's best model deleted?")
    ref = pretrain_ref(local)
    body = None
    if ref is not None:
        source = local.parent / "body.pt" if (local.parent / "body.pt").is_file() else shared_storage.find(ref)
        if source is None:
            raise StudyInputError(f"distillation teacher {path} needs its pre-training checkpoint {ref}, which is gone")
        body = load_checkpoint(source)
    teacher = load_finetuned(local, body).eval()
    teacher.requires_grad_(False)
    return teacher


def _soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` summed over ``dim``, averaged over the rest."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=dim), F.log_softmax(teacher / t, dim=dim), log_target=True,
                  reduction="none").sum(dim)
    return kl.mean() * t * t


def distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], task,
                      temperature: float) -> torch.Tensor:
    """The soft-target loss: per voxel over the segmentation classes, plus per target and region over its
    classes (a binary target's sigmoid is the distribution [1 - p, p])."""
    loss = _soft_kl(student["seg"], teacher["seg"], temperature, dim=1)
    if task.targets:
        s, t = task.split_logits(student["cls"]), task.split_logits(teacher["cls"])
        for target in task.targets:
            a, b = s[target.name], t[target.name]
            if target.binary:  # two-class logits [0, z]: softmax of them is sigmoid(z)
                a, b = torch.cat([torch.zeros_like(a), a], -1), torch.cat([torch.zeros_like(b), b], -1)
            loss = loss + _soft_kl(a, b, temperature, dim=-1) / len(task.targets)
    return loss


class DistillStudent(TaskModule):
    """The student (``self.student``, everything trains) and, outside the module tree, its frozen teacher.

    In training with a teacher, ``forward`` returns the student's outputs with ``aux_loss`` (the weighted
    distillation loss) and ``task_weight`` (``1 - soft_weight``), which :class:`trainables.engine.MultiTaskLoss`
    adds; in evaluation, the student's outputs only (the teacher is not needed to predict)."""

    def __init__(self, student: MultiTaskNet, teacher_path: str = "", temperature: float = 1.0,
                 soft_weight: float = 0.0, teacher_total_params: int = 0) -> None:
        super().__init__()
        self.student = student
        self.teacher_path, self.temperature, self.soft_weight = teacher_path, temperature, soft_weight
        self.teacher_total_params = teacher_total_params  # the teacher network's size, for the report
        self._teacher: list[nn.Module] = []  # a list: not a submodule, so not trained, stored or counted

    @property
    def task(self):
        return self.student.task

    def teacher(self, device: torch.device) -> nn.Module:
        if not self._teacher:
            self._teacher.append(load_teacher(self.teacher_path))
        return self._teacher[0].to(device)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.student(x)
        if self.training and self.teacher_path and self.soft_weight > 0:
            with torch.no_grad():
                soft = self.teacher(x.device)(x)
            kd = distillation_loss(out, soft, self.student.task, self.temperature)
            out = {**out, "aux_loss": self.soft_weight * kd, "task_weight": 1.0 - self.soft_weight}
        return out

    def metrics(self) -> dict[str, float]:
        """What the run logs about the remapping: the student's and the teacher's network sizes."""
        out = {"student_total_params": float(sum(p.numel() for p in self.student.parameters()))}
        if self.teacher_path:  # the label-only twin has no teacher
            out["teacher_total_params"] = float(self.teacher_total_params)
        return out


def student_space(trial) -> dict:
    return {"student_width": trial.suggest_categorical("student_width", [0.25, 0.5])}


def distill_space(trial) -> dict:
    return {
        "student_width": trial.suggest_categorical("distill_student_width", [0.25, 0.5]),
        "temperature": trial.suggest_float("distill_temperature", 1.0, 8.0, log=True),
        "soft_weight": trial.suggest_float("distill_soft_weight", 0.1, 0.9),
    }


def _student(model: MultiTaskNet, cfg: StudentConfig, **kwargs) -> DistillStudent:
    wrapper = DistillStudent(student_backbone(model, cfg), teacher_total_params=sum(p.numel() for p in model.parameters()),
                             **kwargs)
    set_trainable([wrapper.student])
    return wrapper


@register_strategy("distill", DistillConfig, space=distill_space, needs_teacher=True, unfit=no_narrower_student)
def apply_distill(model: MultiTaskNet, cfg: DistillConfig) -> DistillStudent:
    """A new student that learns from the teacher's soft targets and the labels; ``model`` (the teacher's
    architecture) only gives the student its task and width."""
    return _student(model, cfg, teacher_path=cfg.teacher, temperature=cfg.temperature, soft_weight=cfg.soft_weight)


@register_strategy("student", StudentConfig, space=student_space, from_scratch=True, unfit=no_narrower_student)
def apply_student(model: MultiTaskNet, cfg: StudentConfig) -> DistillStudent:
    """The distillation student trained on the labels alone, from scratch (the twin of ``distill``)."""
    return _student(model, cfg)

