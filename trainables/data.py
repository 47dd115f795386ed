"""A cohort on disk (NIfTI + manifest.csv) -> validated, reoriented, resampled, cached torch datasets.

The manifest has columns ``subject_id,image,label,split`` and one column per classification target and region
of the task (:mod:`trainables.task`; the PCS task: ``pcs_left,pcs_right``), optionally ``sha256`` of the image
file and ``roi`` (how this subject reaches the study's box, overriding ``DataConfig.roi``);
paths are relative to the manifest's folder (absolute paths are allowed). Splits are
``pretrain`` (unlabelled pool), ``train``, ``val`` and ``test``. Every problem with the input raises
:class:`StudyInputError` naming the manifest, the subject and the file, before any training starts.
Pure PyTorch / MONAI / nibabel: never imports Ray or MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainables import registration
from trainables.atomic import atomic_write, atomic_write_text
from trainables.errors import StudyInputError, not_a_file
from trainables.task import TaskSpec, as_task, cohort_task

SPLITS = ("pretrain", "train", "val", "test")
LABELED_SPLITS = ("train", "val", "test")
BASE_COLUMNS = ("subject_id", "image", "label", "split")  # and the task's target columns
PREPROCESS_VERSION = 2  # bump when preprocessing changes, to invalidate caches
REGISTRATION_FOLDER = ".registration"  # beside the manifest: travels with the cohort to other nodes
_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_AFFINE_TOLERANCE = 1e-3


@dataclass
class DataConfig:
    """Where the cohort is and how to preprocess it."""

    manifest: str  # path to manifest.csv
    spacing_mm: float = 2.0  # target isotropic voxel spacing in mm
    input_size: tuple[int, int, int] = (32, 32, 32)  # network input (D, H, W): the MNI box's grid
    cache_dir: str | None = None  # preprocessed-array cache; default <manifest folder>/.cache
    roi: str = "register"  # register: affine to the template, then the MNI box; template: already in MNI
    # space, take the box by world coordinates; none: already cropped, centred crop/pad in RAS
    train_fraction: float = 1.0  # share of the labelled training subjects the train split keeps (nested subsets)
    subset_seed: int = 0  # which subjects a fraction keeps: the same at the same seed, for every cell
    task: dict | None = None  # the task spec's YAML form (trainables.task); None: the PCS task

    @property
    def task_spec(self) -> TaskSpec:
        """The task (validated once, in ``__post_init__``)."""
        return self._task

    def __post_init__(self) -> None:
        if isinstance(self.manifest, os.PathLike):
            self.manifest = os.fspath(self.manifest)
        if not isinstance(self.manifest, str) or not self.manifest:
            raise StudyInputError(f"DataConfig.manifest {self.manifest!r}: give the path of a manifest.csv")
        try:
            spacing = float(self.spacing_mm)
        except (TypeError, ValueError):
            spacing = math.nan
        if not (math.isfinite(spacing) and spacing > 0):
            raise StudyInputError(f"DataConfig.spacing_mm {self.spacing_mm!r}: must be a positive number of mm, e.g. 2.0")
        self.spacing_mm = spacing
        try:
            size = tuple(operator.index(s) for s in self.input_size if not isinstance(s, bool))
        except TypeError:
            size = ()
        if len(size) != 3 or min(size) < 8:
            raise StudyInputError(
                f"DataConfig.input_size {self.input_size!r}: must be three integers >= 8, e.g. (32, 32, 32)"
            )
        self.input_size = size  # type: ignore[assignment]
        if self.cache_dir is not None:
            self.cache_dir = os.fspath(self.cache_dir)
        if isinstance(self.train_fraction, bool) or not isinstance(self.train_fraction, (int, float)) or not (
                0 < self.train_fraction <= 1):
            raise StudyInputError(f"DataConfig.train_fraction {self.train_fraction!r}: must be a number in (0, 1]")
        self._task = as_task(self.task)
        self.task = self._task.to_dict()
        if self.roi not in registration.ROI_MODES:
            raise StudyInputError(f"roi {self.roi!r}: must be one of {', '.join(registration.ROI_MODES)} "
                                  "(register: whole-head scans; template: already in MNI space; none: already cropped)")


@dataclass
class SubjectRecord:
    """One manifest row, with paths resolved against the manifest's folder."""

    subject_id: str
    image: Path
    label: Path | None
    targets: tuple[int, ...] | None  # class index per task column (None: unlabelled)
    split: str
    sha256: str | None = None  # expected checksum of the image file, when the manifest has one
    manifest: Path | None = None  # the manifest this row came from (for messages)
    roi: str | None = None  # this subject's region-of-interest mode, when the manifest's roi column gives one


def _resolve(folder: Path, value: str, where: str, what: str) -> Path:
    """Absolute paths are taken as given; relative ones must stay inside the manifest folder."""
    path = Path(value)
    if path.is_absolute():
        return path
    base = os.path.abspath(folder)
    resolved = os.path.normpath(os.path.join(base, path))
    if os.path.commonpath([resolved, base]) != base:
        raise StudyInputError(
            f"{where}: {what} path {value!r} leaves the manifest folder {folder} via '..'; "
            "move the file inside that folder or write its absolute path"
        )
    return Path(resolved)


def _class_index(value: str, where: str, column: str, classes: tuple[str, ...]) -> int:
    valid = [str(i) for i in range(len(classes))]
    if value not in valid:
        named = ", ".join(f"{i} ({c})" for i, c in enumerate(classes))
        raise StudyInputError(f"{where}: {column} is {value!r}; labelled rows need one of {named}")
    return int(value)


def manifest_task(path: str | os.PathLike, task: TaskSpec | None = None) -> TaskSpec:
    """The task a manifest is read for: the one given, else the cohort's ``task.yaml``, else the PCS task."""
    return task or cohort_task(path) or as_task(None)


def required_columns(task: TaskSpec) -> tuple[str, ...]:
    return (*BASE_COLUMNS[:3], *task.columns, BASE_COLUMNS[3])


def read_manifest(path: str | os.PathLike, task: TaskSpec | None = None) -> list[SubjectRecord]:
    """Read and check a manifest.csv for ``task`` (:func:`manifest_task`): columns, splits, duplicates, target
    values, paths exist; no NIfTI is opened."""
    task = manifest_task(path, task)
    REQUIRED_COLUMNS = required_columns(task)  # noqa: N806
    classes = {c: t.classes for t in task.targets for c in t.columns}
    manifest = Path(path)
    if not manifest.is_file():
        what = "is a folder; pass the manifest.csv inside it" if manifest.is_dir() else "does not exist"
        raise StudyInputError(
            f"manifest {manifest} {what} (make one with columns {','.join(REQUIRED_COLUMNS)}, "
            "or generate a synthetic cohort with `python -m study.cohort --output DIR`)"
        )
    folder = manifest.parent
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StudyInputError(f"manifest {manifest}: cannot be read as UTF-8 CSV ({exc}); save it as plain CSV") from None
    if not columns:
        raise StudyInputError(f"manifest {manifest} is empty; it needs the header {','.join(REQUIRED_COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise StudyInputError(
            f"manifest {manifest} lacks column(s) {', '.join(missing)}; required for task {task.name}: "
            f"{','.join(REQUIRED_COLUMNS)}"
        )
    if not rows:
        raise StudyInputError(f"manifest {manifest} has a header but no subject rows; add one row per subject")
    records: list[SubjectRecord] = []
    seen: dict[str, tuple[int, str]] = {}
    for line, raw in rows:
        if None in raw:
            raise StudyInputError(f"manifest {manifest} line {line}: more fields than header columns; check the commas")
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        sid = row["subject_id"]
        where = f"manifest {manifest} line {line} (subject {sid!r})"
        if not _SUBJECT_ID.match(sid):
            raise StudyInputError(f"{where}: subject_id must be non-empty letters, digits, '.', '_' or '-'")
        split = row["split"]
        if split not in SPLITS:
            raise StudyInputError(f"{where}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if sid in seen:
            first_line, first_split = seen[sid]
            raise StudyInputError(
                f"{where}: subject {sid} appears twice (line {first_line} split {first_split}, line {line} "
                f"split {split}); each subject must have exactly one row in one split"
            )
        seen[sid] = (line, split)
        if not row["image"]:
            raise StudyInputError(f"{where}: the image column is empty; give the subject's NIfTI image path")
        image = _resolve(folder, row["image"], where, "image")
        label = _resolve(folder, row["label"], where, "label") if row["label"] else None
        labeled = split in LABELED_SPLITS
        if labeled and label is None:
            raise StudyInputError(
                f"{where}: split {split} needs a label map but the label column is empty; add it or use split pretrain"
            )
        for file, what in ((image, "image"), (label, "label")):
            if file is not None and not file.is_file():
                raise StudyInputError(f"{where}: {what} {file} {not_a_file(file)}; fix the path in the manifest")
        values = [row[c] for c in task.columns]
        if labeled or any(values):
            targets = tuple(_class_index(v, where, c, classes[c]) for v, c in zip(values, task.columns, strict=True))
        else:
            targets = None
        digest = row.get("sha256") or None
        roi = row.get("roi") or None
        if roi is not None and roi not in registration.ROI_MODES:
            raise StudyInputError(f"{where}: roi {roi!r} is not one of {', '.join(registration.ROI_MODES)}; "
                                  "leave it empty to use the study's --roi")
        records.append(SubjectRecord(sid, image, label, targets, split, digest, manifest, roi))
    return records


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_checked(rec: SubjectRecord, task: TaskSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Open one subject's NIfTI files and check their content (label values: the task's); return (image,
    affine, label or None)."""
    where = f"subject {rec.subject_id}"
    if rec.sha256:
        digest = hashlib.sha256(rec.image.read_bytes()).hexdigest()
        if digest != rec.sha256.lower():
            raise StudyInputError(
                f"{where}: image {rec.image} has sha256 {digest[:12]}... but the manifest says {rec.sha256[:12]}...; "
                "the file changed or is damaged: restore it or update the manifest's sha256"
            )

    def read(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as exc:  # nibabel raises many types for damaged files; report them all the same way
            raise StudyInputError(
                f"{where}: cannot read {what} {path} as NIfTI ({_one_line(exc)}); re-export it as .nii or .nii.gz"
            ) from None
        if data.ndim != 3:
            raise StudyInputError(
                f"{where}: {what} {path} is {data.ndim}D with shape {data.shape}; give one 3D volume per subject"
            )
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise StudyInputError(f"{where}: {what} {path} has an invalid affine (singular or NaN); fix its header")
        return data, affine

    image, affine = read(rec.image, "image")
    if not np.all(np.isfinite(image)):
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise StudyInputError(f"{where}: image {rec.image} has {bad} NaN/Inf voxel(s); fix or mask them before use")
    if float(image.max()) == float(image.min()):
        raise StudyInputError(f"{where}: image {rec.image} is constant ({float(image.min())}); it holds no signal")
    if rec.label is None:
        return image, affine, None
    label, label_affine = read(rec.label, "label")
    if label.shape != image.shape:
        raise StudyInputError(
            f"{where}: label {rec.label} has shape {label.shape} but image {rec.image} has {image.shape}; "
            "the label must be drawn on the image's voxel grid"
        )
    if not np.allclose(label_affine, affine, atol=_AFFINE_TOLERANCE, rtol=0):
        diff = float(np.abs(label_affine - affine).max())
        raise StudyInputError(
            f"{where}: label {rec.label} affine differs from image {rec.image} affine (max diff {diff:.3g}); "
            "resample the label onto the image grid"
        )
    task = as_task(task)
    values = np.unique(label)
    odd = [v for v in values.tolist() if v not in task.label_values]
    if odd:
        named = ", ".join(f"{v} {n}" for n, v in task.segmentation)
        raise StudyInputError(
            f"{where}: label {rec.label} has value(s) {odd[:5]} outside {{{','.join(str(v) for v in task.label_values)}}} "
            f"(task {task.name}: {named}); relabel it or fix the task spec"
        )
    return image, affine, label


def validate_cohort(records: list[SubjectRecord], task: TaskSpec | None = None) -> None:
    """Open every subject's NIfTI files and check them (readable, 3D, finite, label matches image, label
    values the task's)."""
    for rec in records:
        load_checked(rec, task)


def roi_mode(rec: SubjectRecord, cfg: DataConfig) -> str:
    """The subject's region-of-interest mode: the manifest's ``roi`` for it, else the study's."""
    return rec.roi or cfg.roi


def _registration_path(rec: SubjectRecord) -> Path:
    """Where the subject's registration is stored: keyed by the image's content, the method's version and
    the template's checksum, so a copy of the cohort on another node finds it."""
    digest = hashlib.sha256(rec.image.read_bytes()).hexdigest()[:16]
    key = f"{digest}-v{registration.REGISTRATION_VERSION}-{registration.template_id()}"
    folder = (rec.manifest.parent if rec.manifest else rec.image.parent) / REGISTRATION_FOLDER
    return folder / f"{rec.subject_id}-{key}.json"


def stored_registration(rec: SubjectRecord) -> registration.Registration | None:
    """The subject's stored registration, or None."""
    path = _registration_path(rec)
    try:
        return registration.Registration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_registration(rec: SubjectRecord, reg: registration.Registration) -> None:
    """Keep a subject's registration beside the manifest (temp file + os.replace)."""
    path = _registration_path(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(reg.to_dict(), indent=1))


def register_subject(rec: SubjectRecord, image: np.ndarray | None = None,
                     affine: np.ndarray | None = None) -> registration.Registration:
    """The subject's registration to the template: stored, or computed, checked and stored.

    Raises StudyInputError naming the subject and the figure when the registration fails its checks."""
    reg = stored_registration(rec)
    if reg is None:
        if image is None or affine is None:
            image, affine, _ = load_checked(rec)
        reg = registration.register(image, affine, where=f"subject {rec.subject_id}: image {rec.image}")
        store_registration(rec, reg)
    return registration.check(reg, f"subject {rec.subject_id}: image {rec.image}",
                              "check the image (a whole-head T1?) or give its roi as template (MNI space) or none "
                              "(already cropped)")


@dataclass
class Preprocessed:
    """One subject in the study box: image float32 (1,D,H,W) z-scored, label uint8 (1,D,H,W), the
    template->subject ``matrix`` (identity for roi none/template), NCC and the label fractions kept. The label
    holds channel indices (the task's label values in channel order: 0 .. classes - 1)."""

    image: np.ndarray
    label: np.ndarray
    matrix: np.ndarray
    ncc: float
    kept: tuple[float, ...]  # share of each foreground class's label voxels inside the box (1.0 without a label)


def to_channels(label: np.ndarray, task: TaskSpec) -> np.ndarray:
    """Label values -> channel indices (uint8), for a task whose values are not already 0 .. classes - 1."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, value in enumerate(task.label_values):
        lut[value] = channel
    return lut[np.rint(label).astype(np.int64).clip(0, 255)]


def normalise(image: np.ndarray) -> np.ndarray:
    """Z-score over the non-zero voxels (MONAI's ``NormalizeIntensity(nonzero=True)``), float32."""
    from monai.transforms import NormalizeIntensity

    return np.asarray(NormalizeIntensity(nonzero=True)(image), dtype=np.float32)


def _preprocess_box(rec: SubjectRecord, cfg: DataConfig,
                    reg: registration.Registration | None = None) -> Preprocessed:
    """Validated subject -> the study's MNI box, through its registration (``reg`` when given, else the stored
    or computed one; identity for roi template)."""
    task = cfg.task_spec
    image, affine, label = load_checked(rec, task)
    if reg is None:
        reg = register_subject(rec, image, affine) if roi_mode(rec, cfg) == "register" else registration.identity()
    matrix = reg.array
    size = tuple(cfg.input_size)
    img = registration.resample_box(image, affine, matrix, cfg.spacing_mm, size)
    if label is None:
        lab, kept = np.zeros(size, dtype=np.uint8), (1.0,) * len(task.foreground)
    else:
        lab = to_channels(registration.resample_box(label, affine, matrix, cfg.spacing_mm, size, label=True), task)
        kept = tuple(registration.fraction_kept(label, affine, matrix, cfg.spacing_mm, size, v)
                     for v in task.label_values[1:])
    if not img.any():
        raise StudyInputError(
            f"subject {rec.subject_id}: image {rec.image} does not cover the study's box (MNI x -32..32, y -4..60, "
            "z 0..64 mm); with roi template the image must be in MNI space, else use roi register"
        )
    return Preprocessed(normalise(img[None]), lab[None], matrix, reg.ncc, kept)  # type: ignore[arg-type]


def preprocess_subject(rec: SubjectRecord, cfg: DataConfig,
                       reg: registration.Registration | None = None) -> Preprocessed:
    """One subject preprocessed for its roi mode (see :class:`DataConfig`); ``reg``: its registration to use
    (roi register; ``predict`` computes one and stores nothing beside the user's image)."""
    if roi_mode(rec, cfg) != "none":
        return _preprocess_box(rec, cfg, reg)
    task = cfg.task_spec
    image, affine, label = load_checked(rec, task)  # before importing MONAI: bad input fails fast
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, ResizeWithPadOrCropd, Spacingd

    if label is None:
        label = np.zeros_like(image)
    tensor_affine = torch.as_tensor(affine, dtype=torch.float64)
    data = {
        "image": MetaTensor(torch.from_numpy(image)[None], affine=tensor_affine),
        "label": MetaTensor(torch.from_numpy(label)[None], affine=tensor_affine.clone()),
    }
    keys = ["image", "label"]
    transform = Compose([
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=(cfg.spacing_mm,) * 3, mode=("bilinear", "nearest")),
        ResizeWithPadOrCropd(keys=keys, spatial_size=cfg.input_size),
    ])
    out = transform(data)
    img = normalise(np.asarray(out["image"].numpy(), dtype=np.float32))
    lab = to_channels(np.asarray(out["label"].numpy()), task)
    return Preprocessed(img, lab, np.eye(4), float("nan"), (1.0,) * len(task.foreground))


def _cache_key(rec: SubjectRecord, cfg: DataConfig) -> str:
    """Hash of the source files' identity (path, size, mtime) and the preprocessing parameters: voxel size,
    box size, roi mode and, when registering, the registration method's version and the template's checksum."""
    roi = roi_mode(rec, cfg)
    parts: dict[str, object] = {"version": PREPROCESS_VERSION, "spacing": cfg.spacing_mm, "size": cfg.input_size,
                                "roi": roi}
    if roi == "register":
        parts["registration"] = [registration.REGISTRATION_VERSION, registration.template_id()]
    values = cfg.task_spec.label_values
    if values != tuple(range(len(values))):  # labels stored as channel indices: the mapping is part of the key
        parts["label_values"] = list(values)
    for name, path in (("image", rec.image), ("label", rec.label)):
        if path is not None:
            stat = path.stat()
            parts[name] = [str(path.absolute()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _read_cached(path: Path, cfg: DataConfig) -> Preprocessed | None:
    try:
        with np.load(path) as stored:
            out = Preprocessed(stored["image"], stored["label"], stored["matrix"], float(stored["ncc"]),
                               tuple(float(v) for v in stored["kept"]))  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError):
        return None  # unreadable or older cache entry: rebuild it
    if out.image.shape[1:] == tuple(cfg.input_size) and out.label.shape == out.image.shape:
        return out
    return None


def cached_subject(rec: SubjectRecord, cfg: DataConfig, cache: Path) -> Preprocessed:
    """The subject from the cache, or validated + preprocessed + written (temp file + os.replace). The
    arrays are stored with the template->subject matrix, the registration's NCC and the label fractions."""
    path = cache / f"{rec.subject_id}-{_cache_key(rec, cfg)}.npz"
    if path.is_file():
        found = _read_cached(path, cfg)
        if found is not None:
            return found
    out = preprocess_subject(rec, cfg)
    cache.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, image=out.image, label=out.label, matrix=out.matrix, ncc=out.ncc, kept=np.asarray(out.kept))

    atomic_write(path, write)
    return out


def _cached_arrays(rec: SubjectRecord, cfg: DataConfig, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    out = cached_subject(rec, cfg, cache)
    return out.image, out.label


def cache_folder(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.manifest).parent / ".cache"


class VolumeDataset(Dataset):
    """Preprocessed subjects held in memory.

    Items: ``image`` float32 (1,D,H,W), ``label`` int64 (1,D,H,W) (zeros if unlabelled),
    ``cls`` float32 (columns,) the class index of each task column (zeros if unlabelled), ``subject_id`` str.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor, subject_ids: list[str],
                 spacing_mm: float, labeled: bool, split: str, flips: bool = False) -> None:
        self.images, self.labels, self.cls = images, labels, cls
        self.subject_ids = list(subject_ids)
        self.spacing_mm, self.labeled, self.split = spacing_mm, labeled, split
        self.flips = flips  # the task allows left-right flips as augmentation

    def __len__(self) -> int:
        return len(self.subject_ids)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index].long(), "cls": self.cls[index],
                "subject_id": self.subject_ids[index]}


def load_split(cfg: DataConfig, split: str) -> VolumeDataset:
    """The subjects of ``split``: checked, preprocessed (RAS, spacing_mm, input_size, z-score), cached on disk;
    ``cls`` holds each subject's class index per task column."""
    if split not in SPLITS:
        raise StudyInputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    task = cfg.task_spec
    records = read_manifest(cfg.manifest, task)
    chosen = [r for r in records if r.split == split]
    if split == "train" and cfg.train_fraction < 1.0:
        chosen = labelled_subset(chosen, cfg.train_fraction, cfg.subset_seed)
    if not chosen:
        counts = ", ".join(f"{s}={sum(r.split == s for r in records)}" for s in SPLITS)
        raise StudyInputError(
            f"manifest {cfg.manifest}: split {split!r} has no subjects (rows per split: {counts}); "
            f"add rows with split={split}"
        )
    cache = cache_folder(cfg)
    images, labels = zip(*(_cached_arrays(r, cfg, cache) for r in chosen), strict=True)
    labeled = split in LABELED_SPLITS
    label_tensor = torch.from_numpy(np.stack(labels))
    if not labeled:
        label_tensor = torch.zeros_like(label_tensor)
    cls = [list(r.targets) if labeled else [0] * len(task.columns) for r in chosen]
    return VolumeDataset(torch.from_numpy(np.stack(images)), label_tensor,
                         torch.tensor(cls, dtype=torch.float32).reshape(len(chosen), len(task.columns)),
                         [r.subject_id for r in chosen], cfg.spacing_mm, labeled, split, task.flips)


def check_splits(sizes: dict) -> dict[str, int]:
    """Explicit split sizes ``{pretrain, train, val, test}`` (each an integer >= 2), validated; returns them
    in the standard order."""
    if not isinstance(sizes, dict) or set(sizes) != set(SPLITS):
        raise StudyInputError(f"splits must give the number of subjects of each of {', '.join(SPLITS)}, got "
                              f"{sizes!r}; e.g. {{pretrain: 200, train: 24, val: 80, test: 120}}")
    for name in SPLITS:
        value = sizes[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise StudyInputError(f"splits.{name} must be an integer >= 2, got {value!r}")
    if sum(sizes.values()) > 10000:
        raise StudyInputError(f"splits add up to {sum(sizes.values())} subjects; at most 10000")
    return {name: sizes[name] for name in SPLITS}


def labelled_count(total: int, fraction: float) -> int:
    """Labelled training subjects a fraction keeps: ceil(fraction x total), at least 2 (one batch)."""
    return min(total, max(2, math.ceil(round(fraction * total, 9))))


def labelled_subset(records: list[SubjectRecord], fraction: float, seed: int) -> list[SubjectRecord]:
    """The first :func:`labelled_count` of the records in a seeded order of their subject ids: a smaller
    fraction keeps a subset of a larger one, and the same subjects at the same seed."""
    ranked = sorted(records, key=lambda r: r.subject_id)
    order = np.random.default_rng([int(seed), 7919]).permutation(len(ranked))
    kept = {ranked[i].subject_id for i in order[:labelled_count(len(ranked), fraction)]}
    return [r for r in records if r.subject_id in kept]


class _Augmented(Dataset):
    """Mild random intensity scale/shift and Gaussian noise; left-right flips of image and label only when the
    task allows them (the PCS task does not: a flip would swap the hemispheres)."""

    def __init__(self, base: VolumeDataset, seed: int) -> None:
        from monai.transforms import (
            Compose,
            RandFlipd,
            RandGaussianNoised,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        self.base = base
        steps = [
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            RandGaussianNoised(keys="image", prob=0.5, std=0.05),
        ]
        if getattr(base, "flips", False):
            steps.append(RandFlipd(keys=["image", "label"], spatial_axis=0, prob=0.5))
        self.transform = Compose(steps).set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        out = self.transform({"image": item["image"], "label": item["label"]})
        for key, dtype in (("image", torch.float32), ("label", torch.long)):
            value = out[key]
            if hasattr(value, "as_tensor"):  # MetaTensor -> plain tensor, so batches collate like the base dataset
                value = value.as_tensor()
            item[key] = value.to(dtype).contiguous()
        return item


def make_loader(ds: VolumeDataset, batch_size: int, shuffle: bool, seed: int, augment: bool = False) -> DataLoader:
    """A single-process DataLoader with a seeded shuffle (and seeded augmentation when ``augment``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StudyInputError(f"batch_size {batch_size!r}: must be a positive integer")
    if augment and getattr(ds, "split", None) in ("val", "test"):
        raise StudyInputError(f"augment=True on the {ds.split} split: augment only training data")
    dataset: Dataset = _Augmented(ds, seed) if augment else ds
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)
