"""trainables.data: manifest checks, NIfTI content checks, preprocessing, caching, loaders."""

from __future__ import annotations

import csv
import gzip
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from trainables.data import (
    SPLITS,
    DataConfig,
    VolumeDataset,
    load_split,
    make_loader,
    read_manifest,
    validate_cohort,
)
from trainables.errors import StudyInputError

SUBJECT_SPACING = 4.0
SIZE = (16, 16, 16)


def _cfg(manifest: Path, **kwargs) -> DataConfig:
    return DataConfig(str(manifest), spacing_mm=kwargs.pop("spacing_mm", SUBJECT_SPACING),
                      input_size=kwargs.pop("input_size", SIZE), **kwargs)


def _read(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write(manifest: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _first(manifest: Path, split: str = "train") -> dict[str, str]:
    return next(r for r in _read(manifest)[1] if r["split"] == split)


def _edit_row(manifest: Path, sid: str, **changes: str) -> None:
    columns, rows = _read(manifest)
    for row in rows:
        if row["subject_id"] == sid:
            row.update(changes)
    _write(manifest, columns, rows)


def _save(manifest: Path, rel: str, data: np.ndarray, affine: np.ndarray) -> None:
    """Overwrite a cohort file and keep the manifest's image checksum in step (so content checks run)."""
    path = manifest.parent / rel
    nib.save(nib.Nifti1Image(data, affine), path)
    columns, rows = _read(manifest)
    for row in rows:
        if row["image"] == rel:
            row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write(manifest, columns, rows)


def _nifti(manifest: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(manifest.parent / rel)
    return np.asarray(img.dataobj), img.affine


# Each case corrupts a fresh copy of the tiny cohort and returns (split to load, text the error must name).
def _manifest_missing(m: Path):
    m.unlink()
    return "train", str(m)


def _missing_columns(m: Path):
    columns, rows = _read(m)
    _write(m, [c for c in columns if c not in ("pcs_right", "split")], rows)
    return "train", "pcs_right, split"


def _header_only(m: Path):
    _write(m, _read(m)[0], [])
    return "train", str(m)


def _zero_bytes(m: Path):
    m.write_bytes(b"")
    return "train", str(m)


def _unknown_split(m: Path):
    sid = _first(m)["subject_id"]
    _edit_row(m, sid, split="training")
    return "train", sid


def _duplicate_subject(m: Path):
    columns, rows = _read(m)
    twin = dict(next(r for r in rows if r["split"] == "train"), split="test")
    _write(m, columns, [*rows, twin])
    return "train", twin["subject_id"]


def _empty_split(m: Path):
    columns, rows = _read(m)
    _write(m, columns, [r for r in rows if r["split"] != "val"])
    return "val", "train=4"


def _image_missing(m: Path):
    row = _first(m)
    (m.parent / row["image"]).unlink()
    return "train", row["subject_id"]


def _label_missing(m: Path):
    row = _first(m)
    (m.parent / row["label"]).unlink()
    return "train", row["subject_id"]


def _truncated_gzip(m: Path):
    row = _first(m)
    path = m.parent / row["image"]
    path.write_bytes(path.read_bytes()[:400])
    _edit_row(m, row["subject_id"], sha256="")
    return "train", row["subject_id"]


def _random_bytes(m: Path):
    row = _first(m)
    (m.parent / row["label"]).write_bytes(np.random.default_rng(0).bytes(3000))
    return "train", row["subject_id"]


def _image_4d(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["image"])
    _save(m, row["image"], np.stack([data, data], axis=-1), affine)
    return "train", row["subject_id"]


def _label_shape(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["label"])
    _save(m, row["label"], np.ascontiguousarray(data[:-1]), affine)
    return "train", row["subject_id"]


def _label_affine(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["label"])
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    _save(m, row["label"], data, shifted)
    return "train", row["subject_id"]


def _label_values(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["label"])
    data = data.copy()
    data[0, 0, 0] = 3
    _save(m, row["label"], data, affine)
    return "train", row["subject_id"]


def _nan_intensity(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["image"])
    data = data.astype(np.float32)
    data[3, 4, 5] = np.nan
    _save(m, row["image"], data, affine)
    return "train", row["subject_id"]


def _pcs_not_binary(m: Path):
    sid = _first(m)["subject_id"]
    _edit_row(m, sid, pcs_left="2")
    return "train", sid


def _pcs_empty(m: Path):
    sid = _first(m, "val")["subject_id"]
    _edit_row(m, sid, pcs_right="")
    return "val", sid


def _no_label_path(m: Path):
    sid = _first(m)["subject_id"]
    _edit_row(m, sid, label="")
    return "train", sid


def _path_escapes(m: Path):
    row = _first(m)
    _edit_row(m, row["subject_id"], image=f"images/../../{row['image']}")
    return "train", row["subject_id"]


def _checksum_mismatch(m: Path):
    row = _first(m)
    data, affine = _nifti(m, row["image"])
    nib.save(nib.Nifti1Image(data * 1.01, affine), m.parent / row["image"])
    return "train", row["subject_id"]


BAD_INPUTS: dict[str, tuple[Callable[[Path], tuple[str, str]], str]] = {
    "manifest missing": (_manifest_missing, "does not exist"),
    "missing columns": (_missing_columns, "lacks column"),
    "header only": (_header_only, "no subject rows"),
    "zero bytes": (_zero_bytes, "is empty"),
    "unknown split": (_unknown_split, "unknown split 'training'"),
    "duplicate subject": (_duplicate_subject, "appears twice"),
    "empty split": (_empty_split, "has no subjects"),
    "image missing": (_image_missing, "does not exist"),
    "label missing": (_label_missing, "does not exist"),
    "truncated gzip": (_truncated_gzip, "cannot read image"),
    "random bytes": (_random_bytes, "cannot read label"),
    "4D image": (_image_4d, "4D"),
    "label shape": (_label_shape, "shape"),
    "label affine": (_label_affine, "affine"),
    "label values": (_label_values, "outside {0,1,2}"),
    "NaN intensity": (_nan_intensity, "NaN/Inf"),
    "pcs not binary": (_pcs_not_binary, "pcs_left is '2'"),
    "pcs empty": (_pcs_empty, "pcs_right is ''"),
    "no label path": (_no_label_path, "label column is empty"),
    "path escapes": (_path_escapes, "leaves the manifest folder"),
    "checksum mismatch": (_checksum_mismatch, "sha256"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case: str, tiny_cohort_copy: Path) -> None:
    corrupt, problem = BAD_INPUTS[case]
    split, name = corrupt(tiny_cohort_copy)
    with pytest.raises(StudyInputError) as info:
        load_split(_cfg(tiny_cohort_copy), split)
    message = str(info.value)
    assert name in message and problem in message, message
    assert "\n" not in message


def test_validate_cohort_checks_unlabelled_subjects_too(tiny_cohort_copy: Path) -> None:
    row = _first(tiny_cohort_copy, "pretrain")
    data, affine = _nifti(tiny_cohort_copy, row["image"])
    data = data.astype(np.float32)
    data[0, 0, 0] = np.inf
    _save(tiny_cohort_copy, row["image"], data, affine)
    with pytest.raises(StudyInputError, match=row["subject_id"]):
        validate_cohort(read_manifest(tiny_cohort_copy))


def test_absolute_paths_are_allowed(tiny_cohort_copy: Path) -> None:
    row = _first(tiny_cohort_copy)
    absolute = str((tiny_cohort_copy.parent / row["image"]).resolve())
    _edit_row(tiny_cohort_copy, row["subject_id"], image=absolute)
    record = next(r for r in read_manifest(tiny_cohort_copy) if r.subject_id == row["subject_id"])
    assert str(record.image) == absolute


def test_gzip_truncation_fixture_is_really_broken(tiny_cohort_copy: Path) -> None:
    row = _first(tiny_cohort_copy)
    _truncated_gzip(tiny_cohort_copy)
    with pytest.raises((EOFError, OSError)):
        gzip.decompress((tiny_cohort_copy.parent / row["image"]).read_bytes())


@pytest.mark.parametrize("split", SPLITS)
def test_load_split_shapes_and_dtypes(split: str, tiny_cohort: Path) -> None:
    ds = load_split(_cfg(tiny_cohort), split)
    assert isinstance(ds, VolumeDataset) and len(ds) >= 2
    assert ds.labeled == (split != "pretrain") and ds.spacing_mm == SUBJECT_SPACING
    item = ds[0]
    assert item["image"].shape == (1, *SIZE) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, *SIZE) and item["label"].dtype == torch.int64
    assert item["cls"].shape == (2,) and item["cls"].dtype == torch.float32
    assert isinstance(item["subject_id"], str)
    assert torch.isfinite(item["image"]).all()
    if split == "pretrain":
        assert item["label"].sum() == 0 and item["cls"].sum() == 0
    else:
        for index in range(len(ds)):
            entry = ds[index]
            present = [int((entry["label"] == value).any()) for value in (1, 2)]
            assert entry["cls"].tolist() == present, entry["subject_id"]


def test_resampling_and_padding_to_another_grid(tiny_cohort: Path, tmp_path: Path) -> None:
    ds = load_split(_cfg(tiny_cohort, spacing_mm=2.0, input_size=(40, 32, 24), cache_dir=str(tmp_path)), "train")
    item = ds[0]
    assert item["image"].shape == (1, 40, 32, 24)
    assert set(item["label"].unique().tolist()) <= {0, 1, 2}


def test_reorientation_to_ras(tiny_cohort_copy: Path) -> None:
    """An LAS copy of a subject (voxel axis 0 flipped) preprocesses to the same arrays as the RAS original."""
    cfg = _cfg(tiny_cohort_copy)
    before = load_split(cfg, "train")
    row = _first(tiny_cohort_copy)
    for column in ("image", "label"):
        data, affine = _nifti(tiny_cohort_copy, row[column])
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        _save(tiny_cohort_copy, row[column], np.ascontiguousarray(data[::-1]), affine @ flip)
    assert nib.aff2axcodes(nib.load(tiny_cohort_copy.parent / row["image"]).affine)[0] == "L"
    after = load_split(cfg, "train")
    index = before.subject_ids.index(row["subject_id"])
    assert torch.equal(before[index]["label"], after[index]["label"])
    assert torch.allclose(before[index]["image"], after[index]["image"], atol=1e-5)


def test_second_load_reads_the_cache(tiny_cohort_copy: Path) -> None:
    cfg = _cfg(tiny_cohort_copy)
    start = time.perf_counter()
    first = load_split(cfg, "train")
    cold = time.perf_counter() - start
    cache = tiny_cohort_copy.parent / ".cache"
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    assert len(stamps) == len(first)
    start = time.perf_counter()
    second = load_split(cfg, "train")
    warm = time.perf_counter() - start
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == stamps
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert warm < cold
    # a changed source file is a cache miss: a new entry appears, the old one is left alone
    row = _first(tiny_cohort_copy)
    data, affine = _nifti(tiny_cohort_copy, row["image"])
    _save(tiny_cohort_copy, row["image"], (data * 2).astype(np.float32), affine)
    load_split(cfg, "train")
    assert len(list(cache.glob("*.npz"))) == len(stamps) + 1


def test_loader_is_seeded_and_augmentation_keeps_labels(tiny_cohort: Path) -> None:
    ds = load_split(_cfg(tiny_cohort), "train")
    order = [b["subject_id"] for b in make_loader(ds, 2, shuffle=True, seed=7)]
    assert order == [b["subject_id"] for b in make_loader(ds, 2, shuffle=True, seed=7)]
    one = next(iter(make_loader(ds, 4, shuffle=False, seed=3, augment=True)))
    two = next(iter(make_loader(ds, 4, shuffle=False, seed=3, augment=True)))
    plain = next(iter(make_loader(ds, 4, shuffle=False, seed=3)))
    assert one["image"].shape == (4, 1, *SIZE) and one["image"].dtype == torch.float32
    assert type(one["image"]) is torch.Tensor
    assert torch.equal(one["image"], two["image"]) and not torch.equal(one["image"], plain["image"])
    assert torch.equal(one["label"], plain["label"]) and torch.equal(one["cls"], plain["cls"])
    assert torch.corrcoef(torch.stack([one["image"].flatten(), plain["image"].flatten()]))[0, 1] > 0.9


def test_augmenting_evaluation_data_is_refused(tiny_cohort: Path) -> None:
    with pytest.raises(StudyInputError, match="val"):
        make_loader(load_split(_cfg(tiny_cohort), "val"), 2, shuffle=False, seed=0, augment=True)
    with pytest.raises(StudyInputError, match="batch_size"):
        make_loader(load_split(_cfg(tiny_cohort), "train"), 0, shuffle=False, seed=0)


def test_unknown_split_name_lists_valid_ones(tiny_cohort: Path) -> None:
    with pytest.raises(StudyInputError, match="pretrain, train, val, test"):
        load_split(_cfg(tiny_cohort), "validation")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"spacing_mm": 0}, "spacing_mm"), ({"spacing_mm": float("nan")}, "spacing_mm"),
     ({"spacing_mm": "x"}, "spacing_mm"), ({"input_size": (4, 32, 32)}, "input_size"),
     ({"input_size": (32, 32)}, "input_size"), ({"input_size": (32.5, 32, 32)}, "input_size"),
     ({"manifest": ""}, "manifest")],
)
def test_data_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(StudyInputError, match=field):
        DataConfig(**{"manifest": "m.csv", **kwargs})


def test_data_config_from_plain_dict() -> None:
    cfg = DataConfig(**{"manifest": "m.csv", "spacing_mm": 2, "input_size": [16, 24, 32]})
    assert cfg.input_size == (16, 24, 32) and cfg.spacing_mm == 2.0
