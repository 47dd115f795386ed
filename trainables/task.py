"""The task as data: segmentation classes, classification targets, augmentation and the selection score.

A task spec is a small YAML file (``task.yaml`` beside a cohort's manifest, ``--task FILE``, or a built-in
name: ``pcs``, ``pcs3``; the files are in ``trainables/tasks/``). It is the one owner of every fact about the
task: the data validation, the network heads (``out_channels`` as an argument, as MONAI's networks take it),
the loss, the metrics and the score, the per-case rows, the report and ``predict`` all read it; nothing else
names a class or a manifest column. nnU-Net's ``dataset.json`` labels and ``LabelManager`` are the model.

::

    name: pcs
    segmentation: {background: 0, left_pcs: 1, right_pcs: 2}   # class -> label value; 0 is the background
    targets:                                                   # classification targets (may be empty)
      - name: presence
        classes: [absent, present]           # 2 classes: one logit per region (sigmoid); K > 2: K logits (softmax)
        columns: [pcs_left, pcs_right]       # the manifest column of each region; values 0..K-1
        pooling: halves                      # volume: one region, the whole volume; halves: two, split along axis
        axis: 0                              # RAS voxel axis the halves split: 0 left|right, 1 back|front, 2 low|high
        regions: [left, right]
        segments: [left_pcs, right_pcs]      # optional: the segmentation class whose Dice a region's row carries
    flips: false                             # left-right flips as augmentation (never when a side is a target)
    score: {dice: 0.5, balanced_accuracy: 0.5}   # weights (sum 1) of dice and classification metrics
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trainables.classification_metrics import CLASSIFICATION_METRICS
from trainables.errors import StudyInputError

BUILTIN_FOLDER = Path(__file__).with_name("tasks")
POOLINGS = ("volume", "halves")
SCORE_METRICS = ("dice", *CLASSIFICATION_METRICS.names())  # what the statistics recompute from per-case rows
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _name(value: object, where: str) -> str:
    if isinstance(value, bool):  # YAML reads a bare yes/no/on/off as a boolean
        raise StudyInputError(f"{where}: {value!r} is a YAML boolean; write the name in quotes, e.g. \"no\"")
    if not isinstance(value, str) or not _NAME.match(value):
        raise StudyInputError(f"{where}: {value!r} is not a name (letters, digits and '_', starting with a letter)")
    return value


def _names(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise StudyInputError(f"{where}: give a non-empty list, e.g. [a, b]")
    return tuple(_name(v, where) for v in value)


@dataclass(frozen=True)
class Target:
    """One classification target: a class per region, read from one manifest column per region.

    Args:
        name: the target's name (a prefix of its metrics when a task has several targets).
        classes: class names; the manifest holds a class's index (0 .. K-1). Two classes: binary.
        columns: one manifest column per region.
        pooling: ``volume`` (one region) or ``halves`` (two regions, the halves of the volume along ``axis``).
        axis: the voxel axis the halves split (RAS: 0 runs left -> right).
        regions: region names (``halves``: the low half, then the high half).
        segments: optional, one segmentation class per region: the Dice a region's per-case row carries
            (without it a row carries the mean Dice over the foreground classes).
    """

    name: str
    classes: tuple[str, ...]
    columns: tuple[str, ...]
    pooling: str = "volume"
    axis: int = 0
    regions: tuple[str, ...] = ("volume",)
    segments: tuple[str, ...] = ()

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def logits_per_region(self) -> int:
        """1 for a binary target (a sigmoid logit), K for K classes (softmax)."""
        return 1 if self.binary else len(self.classes)

    @property
    def n_logits(self) -> int:
        return len(self.regions) * self.logits_per_region


@dataclass(frozen=True)
class TaskSpec:
    """A task: segmentation classes (name -> label value), classification targets, flips and the score."""

    name: str
    segmentation: tuple[tuple[str, int], ...]
    targets: tuple[Target, ...] = ()
    flips: bool = False
    score: tuple[tuple[str, float], ...] = (("dice", 0.5), ("balanced_accuracy", 0.5))
    description: str = ""
    source: str = field(default="", compare=False)  # the file it came from (for messages)

    # -- segmentation ---------------------------------------------------------------------------------
    @property
    def seg_channels(self) -> int:
        """Output channels of the segmentation head: every class, the background included."""
        return len(self.segmentation)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Label values in channel order (channel 0 is the background, value 0)."""
        return tuple(v for _, v in self.segmentation)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Names of the segmentation classes other than the background, in channel order."""
        return tuple(n for n, _ in self.segmentation[1:])

    def channel_of(self, segment: str) -> int:
        return [n for n, _ in self.segmentation].index(segment)

    # -- classification -------------------------------------------------------------------------------
    @property
    def n_logits(self) -> int:
        """Width of the classification output: the targets' logits side by side, in spec order."""
        return sum(t.n_logits for t in self.targets)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every target column of the manifest, in the order of the ``cls`` tensor a batch carries."""
        return tuple(c for t in self.targets for c in t.columns)

    def split_logits(self, logits):
        """The flat ``(B, n_logits)`` output -> per target ``(B, regions, logits_per_region)``."""
        out, start = {}, 0
        for t in self.targets:
            out[t.name] = logits[:, start:start + t.n_logits].reshape(logits.shape[0], len(t.regions),
                                                                       t.logits_per_region)
            start += t.n_logits
        return out

    def split_truth(self, truth):
        """The flat ``(B, columns)`` class indices -> per target ``(B, regions)``."""
        out, start = {}, 0
        for t in self.targets:
            out[t.name] = truth[:, start:start + len(t.regions)]
            start += len(t.regions)
        return out

    def score_of(self, metrics: dict[str, float]) -> float:
        """The selection score: the weighted sum of the named metrics; a missing or NaN metric counts 0."""
        total = 0.0
        for metric, weight in self.score:
            value = metrics.get(metric)
            total += weight * (0.0 if value is None or not math.isfinite(value) else float(value))
        return total

    def score_text(self) -> str:
        """The score's definition for people, e.g. ``0.5 x dice + 0.5 x balanced_accuracy``."""
        return " + ".join(f"{w:g} x {m}" for m, w in self.score)

    # -- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The YAML form (what :func:`task_from_dict` reads back)."""
        targets = []
        for t in self.targets:
            d = asdict(t)
            d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
            if not t.segments:
                d.pop("segments")
            targets.append(d)
        return {"name": self.name, "description": self.description, "segmentation": dict(self.segmentation),
                "targets": targets, "flips": self.flips, "score": dict(self.score)}


def _target(raw: object, where: str, seg_names: tuple[str, ...]) -> Target:
    if not isinstance(raw, dict):
        raise StudyInputError(f"{where}: a target is a mapping with name, classes, columns, pooling")
    known = {"name", "classes", "columns", "pooling", "axis", "regions", "segments"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyInputError(f"{where}: unknown key(s) {unknown}; a target has {sorted(known)}")
    name = _name(raw.get("name"), f"{where} name")
    where = f"{where} ({name})"
    classes = _names(raw.get("classes"), f"{where} classes")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise StudyInputError(f"{where} classes: give two or more distinct class names, e.g. [absent, present]")
    pooling = raw.get("pooling", "volume")
    if pooling not in POOLINGS:
        raise StudyInputError(f"{where} pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    axis = raw.get("axis", 0)
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise StudyInputError(f"{where} axis: {axis!r} must be 0, 1 or 2 (RAS voxel axes)")
    count = 2 if pooling == "halves" else 1
    regions = _names(raw.get("regions", ["low", "high"] if count == 2 else ["volume"]), f"{where} regions")
    columns = _names(raw.get("columns"), f"{where} columns")
    for what, values in (("regions", regions), ("columns", columns)):
        if len(values) != count or len(set(values)) != count:
            raise StudyInputError(f"{where} {what}: pooling {pooling} has {count} region(s), so give {count} "
                                  f"distinct {what}, got {list(values)}")
    segments = tuple(raw.get("segments") or ())
    if segments:
        segments = _names(list(segments), f"{where} segments")
        bad = [s for s in segments if s not in seg_names[1:]]
        if len(segments) != count or bad:
            raise StudyInputError(f"{where} segments: give one foreground segmentation class per region, from "
                                  f"{list(seg_names[1:])}, got {list(segments)}")
    return Target(name, classes, columns, pooling, int(axis), regions, segments)


def task_from_dict(raw: object, source: str = "task spec") -> TaskSpec:
    """Validate a task spec's YAML mapping; every problem is one :class:`StudyInputError` naming the file."""
    if not isinstance(raw, dict):
        raise StudyInputError(f"{source}: a task spec is a YAML mapping with name, segmentation, targets, score")
    known = {"name", "description", "segmentation", "targets", "flips", "score"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyInputError(f"{source}: unknown key(s) {unknown}; a task spec has {sorted(known)}")
    name = _name(raw.get("name"), f"{source} name")
    seg = raw.get("segmentation")
    if not isinstance(seg, dict) or len(seg) < 2:
        raise StudyInputError(f"{source} segmentation: map each class name to its label value, the background "
                              "to 0, with at least one foreground class, e.g. {background: 0, lesion: 1}")
    pairs = []
    for key, value in seg.items():
        _name(key, f"{source} segmentation")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise StudyInputError(f"{source} segmentation {key}: label value {value!r} must be an integer 0..255")
        pairs.append((key, value))
    values = [v for _, v in pairs]
    if len(set(values)) != len(values) or 0 not in values:
        raise StudyInputError(f"{source} segmentation: label values {values} must be distinct and include 0 "
                              "(the background)")
    pairs.sort(key=lambda p: p[1])  # channel order: the background first
    seg_names = tuple(n for n, _ in pairs)
    raw_targets = raw.get("targets") or []
    if not isinstance(raw_targets, list):
        raise StudyInputError(f"{source} targets: give a list of targets (or leave it out for segmentation only)")
    targets = tuple(_target(t, f"{source} targets[{i}]", seg_names) for i, t in enumerate(raw_targets))
    names = [t.name for t in targets]
    columns = [c for t in targets for c in t.columns]
    if len(set(names)) != len(names) or len(set(columns)) != len(columns):
        raise StudyInputError(f"{source} targets: target names {names} and columns {columns} must be distinct")
    flips = raw.get("flips", False)
    if not isinstance(flips, bool):
        raise StudyInputError(f"{source} flips: {flips!r} must be true or false")
    sided = [t.name for t in targets if t.pooling == "halves" and t.axis == 0]
    if flips and sided:
        raise StudyInputError(f"{source} flips: a left-right flip swaps the halves of target(s) {sided}; "
                              "set flips: false")
    score = raw.get("score", {"dice": 0.5, "balanced_accuracy": 0.5})
    if not isinstance(score, dict) or not score:
        raise StudyInputError(f"{source} score: map metrics ({', '.join(SCORE_METRICS)}) to weights summing to 1")
    weights = []
    for metric, weight in score.items():
        if metric not in SCORE_METRICS:
            raise StudyInputError(f"{source} score: {metric!r} is not one of {', '.join(SCORE_METRICS)}")
        if metric != "dice" and not targets:
            raise StudyInputError(f"{source} score: {metric} needs a classification target; the task has none")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise StudyInputError(f"{source} score {metric}: weight {weight!r} must be a positive number")
        weights.append((metric, float(weight)))
    if abs(sum(w for _, w in weights) - 1.0) > 1e-6:
        raise StudyInputError(f"{source} score: weights sum to {sum(w for _, w in weights):g}; make them sum to 1")
    description = str(raw.get("description") or "")
    return TaskSpec(name, tuple(pairs), targets, flips, tuple(weights), description, source)


def builtin_tasks() -> list[str]:
    """Names of the task specs that ship with the tool."""
    return sorted(p.stem for p in BUILTIN_FOLDER.glob("*.yaml"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A built-in task by name, or a task spec file (YAML through ``yaml.safe_load``)."""
    text = str(name_or_path)
    path = Path(text) if Path(text).suffix in (".yaml", ".yml") else BUILTIN_FOLDER / f"{text}.yaml"
    if not path.is_file():
        if path.parent == BUILTIN_FOLDER:
            raise StudyInputError(f"--task {text!r}: not a built-in task ({', '.join(builtin_tasks())}) nor a "
                                  ".yaml file; give one of those names or the path of a task spec")
        raise StudyInputError(f"--task {text}: the file does not exist; give the path of a task spec (.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise StudyInputError(f"task spec {path}: cannot be read as YAML ({' '.join(str(exc).split())[:200]})") from None
    return task_from_dict(raw, str(path))


def cohort_task(manifest: str | Path) -> TaskSpec | None:
    """The task spec a cohort carries (``task.yaml`` beside its manifest), or None."""
    path = Path(manifest).parent / "task.yaml"
    return load_task(path) if path.is_file() else None


DEFAULT_TASK = "pcs"


def default_task() -> TaskSpec:
    """The PCS task: segmentation of the left and right PCS and binary presence per hemisphere."""
    return load_task(DEFAULT_TASK)


def as_task(value: TaskSpec | dict | None) -> TaskSpec:
    """A task from what a trial config carries: a spec, its dict form, or nothing (the default task)."""
    if isinstance(value, TaskSpec):
        return value
    if value is None:
        return default_task()
    return task_from_dict(value, "trial config task")
