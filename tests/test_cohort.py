"""The synthetic PCS cohort: determinism, label geometry, groove contrast, reuse, and the CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from study.cohort import generate_cohort, split_sizes
from trainables.errors import StudyInputError

REPO = Path(__file__).resolve().parents[1]


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _labelled(manifest: Path):
    """(row, image array, label array, affine) per labelled subject."""
    for row in _rows(manifest):
        if row["label"]:
            img = nib.load(manifest.parent / row["image"])
            label = np.asarray(nib.load(manifest.parent / row["label"]).dataobj)
            yield row, np.asarray(img.dataobj), label, img.affine


def test_manifest_columns_and_splits(tiny_cohort: Path, tiny_cohort_params: dict) -> None:
    rows = _rows(tiny_cohort)
    with tiny_cohort.open() as handle:
        header = handle.readline().strip().split(",")
    assert header[:6] == ["subject_id", "image", "label", "pcs_left", "pcs_right", "split"]
    assert len(rows) == tiny_cohort_params["subjects"]
    counts = {s: sum(r["split"] == s for r in rows) for s in ("pretrain", "train", "val", "test")}
    assert counts == split_sizes(tiny_cohort_params["subjects"])
    for row in rows:
        assert (tiny_cohort.parent / row["image"]).is_file()
        if row["split"] == "pretrain":
            assert row["label"] == row["pcs_left"] == row["pcs_right"] == ""
        else:
            assert row["pcs_left"] in ("0", "1") and row["pcs_right"] in ("0", "1")
            assert nib.load(tiny_cohort.parent / row["label"]).get_data_dtype() == np.uint8
    assert (tiny_cohort.parent / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n", [8, 9, 12, 24, 100])
def test_split_sizes_at_least_two_each(n: int) -> None:
    sizes = split_sizes(n)
    assert sum(sizes.values()) == n and min(sizes.values()) >= 2


def test_explicit_splits_resplit_reusing_the_voxels(tiny_cohort: Path, tiny_cohort_params: dict, tmp_path: Path) -> None:
    """``splits`` sets each split's size; re-splitting the same cohort rewrites the manifest (and writes the
    labels a subject now needs) but keeps every image's voxels, which depend on the subject's index only."""
    import shutil

    copy = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, copy, ignore=shutil.ignore_patterns(".cache"))
    before = {r["subject_id"]: r for r in _rows(copy / "manifest.csv")}
    sizes = {"pretrain": 2, "train": 2, "val": 3, "test": 5}
    manifest = generate_cohort(copy, seed=tiny_cohort_params["seed"], spacing=tiny_cohort_params["spacing"],
                               difficulty=tiny_cohort_params["difficulty"], splits=sizes)
    rows = _rows(manifest)
    assert {s: sum(r["split"] == s for r in rows) for s in sizes} == sizes
    for row in rows:
        assert row["sha256"] == before[row["subject_id"]]["sha256"]  # the same image
        if row["split"] != "pretrain":
            assert (copy / row["label"]).is_file()
    with pytest.raises(StudyInputError, match="splits.val must be an integer >= 2"):
        generate_cohort(copy, splits={"pretrain": 2, "train": 2, "val": 1, "test": 5})
    with pytest.raises(StudyInputError, match="splits must give the number of subjects of each of"):
        generate_cohort(copy, splits={"train": 2})


def test_same_seed_same_voxels_other_seed_differs(tiny_cohort: Path, tiny_cohort_params: dict, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", **tiny_cohort_params)
    assert again.read_text() == tiny_cohort.read_text()
    for row in _rows(tiny_cohort):
        for column in ("image", "label"):
            if row[column]:
                a = np.asarray(nib.load(tiny_cohort.parent / row[column]).dataobj)
                b = np.asarray(nib.load(again.parent / row[column]).dataobj)
                assert np.array_equal(a, b), row[column]
    other = generate_cohort(tmp_path / "other", **{**tiny_cohort_params, "seed": 1})
    first = _rows(tiny_cohort)[0]["image"]
    a = np.asarray(nib.load(tiny_cohort.parent / first).dataobj)
    b = np.asarray(nib.load(other.parent / first).dataobj)
    assert not np.array_equal(a, b)


def test_labels_lie_in_medial_frontal_region_on_the_right_side(tiny_cohort: Path) -> None:
    seen = {1: 0, 2: 0}
    for row, _, label, affine in _labelled(tiny_cohort):
        for value, column in ((1, "pcs_left"), (2, "pcs_right")):
            ijk = np.argwhere(label == value)
            assert int(row[column]) == int(len(ijk) > 0), (row["subject_id"], column)
            if not len(ijk):
                continue
            seen[value] += 1
            xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
            assert np.all(np.abs(xyz[:, 0]) <= 16), row["subject_id"]
            assert np.all((xyz[:, 1] >= 0) & (xyz[:, 1] <= 60)), row["subject_id"]
            assert np.all((xyz[:, 2] >= 5) & (xyz[:, 2] <= 60)), row["subject_id"]
            if value == 1:
                assert np.all(xyz[:, 0] < 0), f"{row['subject_id']}: left PCS voxel at x >= 0"
            else:
                assert np.all(xyz[:, 0] > 0), f"{row['subject_id']}: right PCS voxel at x <= 0"
    assert seen[1] and seen[2], "the tiny cohort should contain left and right PCS"


def test_affine_is_ras_and_shared_by_image_and_label(tiny_cohort: Path) -> None:
    for row, image, label, affine in _labelled(tiny_cohort):
        assert image.shape == label.shape == (16, 16, 16)
        assert np.allclose(nib.load(tiny_cohort.parent / row["label"]).affine, affine)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert set(np.unique(label).tolist()) <= {0, 1, 2}


def test_groove_is_darker_than_its_surroundings(tiny_cohort: Path) -> None:
    checked = 0
    for row, image, label, _ in _labelled(tiny_cohort):
        groove = label > 0
        if not groove.any():
            continue
        shell = ndimage.binary_dilation(groove, iterations=2) & ~groove
        assert image[groove].mean() < 0.9 * image[shell].mean(), row["subject_id"]
        checked += 1
    assert checked >= 2


def test_reuse_skips_work_and_regenerates_a_damaged_file(tiny_cohort_copy: Path, tiny_cohort_params: dict) -> None:
    folder = tiny_cohort_copy.parent
    image = folder / "images" / "sub-000.nii.gz"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}
    assert generate_cohort(folder, **tiny_cohort_params) == tiny_cohort_copy
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")} == before
    original = image.read_bytes()
    image.write_bytes(original[:100])
    generate_cohort(folder, **tiny_cohort_params)
    assert image.read_bytes() == original


def test_new_parameters_replace_the_old_cohort(tiny_cohort_copy: Path, tiny_cohort_params: dict) -> None:
    folder = tiny_cohort_copy.parent
    generate_cohort(folder, **{**tiny_cohort_params, "subjects": 8, "seed": 3})
    rows = _rows(tiny_cohort_copy)
    assert len(rows) == 8
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"sub-{i:03d}.nii.gz" for i in range(8)]


def test_refuses_a_folder_with_a_foreign_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("subject_id,image\n")
    with pytest.raises(StudyInputError, match="manifest.csv"):
        generate_cohort(tmp_path, subjects=8)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"subjects": 3}, "--subjects"), ({"seed": -1}, "--seed"), ({"spacing": 0.0}, "--spacing"),
     ({"spacing": float("nan")}, "--spacing"), ({"difficulty": -1.0}, "--difficulty")],
)
def test_bad_parameters_raise(kwargs: dict, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(StudyInputError, match=fragment):
        generate_cohort(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "study.cohort", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_manifest_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = _cli("--output", str(out), "--subjects", "8", "--seed", "1", "--spacing", "4")
    assert result.returncode == 0, result.stderr
    assert len(_rows(out / "manifest.csv")) == 8
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--subjects", "3"], ["--subjects", "many"], ["--spacing", "-2"]])
def test_cli_bad_argument_exits_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    result = _cli("--output", str(tmp_path / "cli"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


def test_difficulty_weakens_the_groove_and_adds_noise() -> None:
    """--difficulty: the same subject (same pose, same groove) with a fainter groove and more noise."""
    from study.cohort import CohortParams, synthesize_subject

    def subject(difficulty: float, index: int):
        return synthesize_subject(CohortParams(subjects=8, seed=0, spacing=4.0, difficulty=difficulty), index)

    index = next(i for i in range(20) if subject(1.0, i)[1].any())
    (easy, easy_label, _), (hard, hard_label, _) = subject(0.5, index), subject(2.0, index)
    assert np.array_equal(easy_label, hard_label)
    groove = easy_label > 0
    around = ndimage.binary_dilation(groove, iterations=2) & ~groove  # the grey matter beside the groove

    def contrast(image):
        return 1 - image[groove].mean() / image[around].mean()

    assert contrast(easy) > contrast(hard) + 0.1
    outside = ndimage.binary_erosion(easy < 0.05 * easy.max(), iterations=1)  # air: only noise there
    assert outside.sum() > 20 and hard[outside].mean() > 2 * easy[outside].mean()
