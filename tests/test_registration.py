"""Real scans reach the study's MNI box: affine registration to the ICBM152 template (SimpleITK), the
quality checks, labels kept inside the box, and predictions mapped back onto the input's grid.

The whole-head images are built here from the template: a padded field of view, a scalp and a skull
around the brain, a random rotation (up to 15 degrees) and translation, permuted and flipped voxel axes,
the origin moved, and the dtypes scanners write (uint8, int16 with a scale factor, float64). Two labels
are drawn in MNI space where the embedded cohort's PCS lies, (-6, 40, 39) and (6, 40, 39) mm.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from bench.registration import scanner_pose
from study.cohort import CohortParams, synthesize_subject_with_pose
from study.predict import predict_image
from study.run.prepare import describe, preprocess_cohort
from trainables import registration
from trainables.data import DataConfig, SubjectRecord, preprocess_subject, read_manifest
from trainables.errors import StudyInputError

PCS = {1: np.array([-6.0, 40.0, 39.0]), 2: np.array([6.0, 40.0, 39.0])}  # left, right (MNI mm)
SPACING, SIZE = 2.0, (32, 32, 32)


def _template_head(voxel: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of a whole head in MNI space: the template brain, a dark skull and a bright
    scalp around it, neck-deep padding, and two 4 mm balls labelled 1 and 2 at the PCS points."""
    t1, brain, affine = registration._template(voxel)
    pad = int(round(24 / voxel))
    t1, brain = np.pad(t1, pad), np.pad(brain, pad)
    affine = affine.copy()
    affine[:3, 3] -= pad * voxel
    skull = ndimage.binary_dilation(brain, iterations=int(round(6 / voxel))) & ~brain
    scalp = ndimage.binary_dilation(brain, iterations=int(round(12 / voxel))) & ~brain & ~skull
    image = t1 / t1.max()
    image[skull] = 0.05
    image[scalp] = 0.9
    ijk = np.indices(image.shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*image.shape, 3)
    label = np.zeros(image.shape, dtype=np.uint8)
    for value, point in PCS.items():
        label[np.linalg.norm(world - point, axis=-1) <= 4.0] = value
    return image.astype(np.float32), label, affine


def _scanner(image: np.ndarray, label: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    """The head as a scanner might write it (``bench.registration.scanner_pose``): (image, label, affine,
    motion), ``motion`` mapping an MNI point to the new world point."""
    (image, label), affine, motion = scanner_pose([image, label], affine, rng)
    return image, label, affine, motion


def _write(image: np.ndarray, affine: np.ndarray, path: Path, dtype: str) -> Path:
    """Save as a scanner would: uint8, int16 with scl_slope, or float64."""
    if dtype == "uint8":
        img = nib.Nifti1Image(np.rint(image / image.max() * 255).astype(np.uint8), affine)
    elif dtype == "int16-scaled":
        img = nib.Nifti1Image(np.rint(image / image.max() * 30000).astype(np.int16), affine)
        img.header.set_slope_inter(0.01, 5.0)
    else:
        img = nib.Nifti1Image(image.astype(np.float64), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def head():
    return _template_head()


@pytest.fixture(scope="module")
def scans(head, tmp_path_factory) -> list[dict]:
    """Four whole-head scans in four orientations and dtypes, with their labels, in a manifest."""
    folder = tmp_path_factory.mktemp("whole_heads")
    rng = np.random.default_rng(17)
    out, rows = [], []
    for index, dtype in enumerate(("uint8", "int16-scaled", "float64", "uint8")):
        image, label, affine, motion = _scanner(*head, rng)
        sid = f"head{index}"
        _write(image, affine, folder / f"{sid}.nii.gz", dtype)
        lab = nib.Nifti1Image(label, affine)
        nib.save(lab, str(folder / f"{sid}_label.nii.gz"))
        rows.append([sid, f"{sid}.nii.gz", f"{sid}_label.nii.gz", 1, 1, "train"])
        out.append({"sid": sid, "image": folder / f"{sid}.nii.gz", "label": label, "affine": affine,
                    "motion": motion, "folder": folder})
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "image", "label", "pcs_left", "pcs_right", "split"])
        writer.writerows(rows)
    return out


def _centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_whole_head_scans_land_in_the_box_with_their_labels(scans):
    """Each scan's registration undoes its motion; both labels keep >= 95% of their voxels in the box and
    land within 2 mm of where they were drawn in MNI space."""
    records = read_manifest(scans[0]["folder"] / "manifest.csv")
    cfg = DataConfig(manifest=str(scans[0]["folder"] / "manifest.csv"), spacing_mm=SPACING, input_size=SIZE)
    summaries = preprocess_cohort(cfg, records, workers=2)  # the launcher's process pool
    assert [s.subject_id for s in summaries] == [r.subject_id for r in records]
    box = registration.box_affine(SPACING, SIZE)
    for scan, rec, summary in zip(scans, records, summaries, strict=True):
        assert min(summary.kept) >= registration.MIN_KEPT, (scan["sid"], summary.kept)
        out = preprocess_subject(rec, cfg)
        for value, point in PCS.items():
            assert np.linalg.norm(_centroid(out.label[0], box, value) - point) < 2.0, (scan["sid"], value)
        # the recovered template->subject matrix is the motion applied to the head (up to the fit's error)
        probe = np.array([[0, 20, 30, 1], [-6, 40, 39, 1], [20, 50, 10, 1]], dtype=float).T  # in the box
        error = np.linalg.norm((out.matrix @ probe - scan["motion"] @ probe)[:3], axis=0)
        assert error.max() < 2.5, (scan["sid"], error)
        assert summary.ncc > 0.7
    assert not [line for line in describe(summaries) if line.startswith("warning")]


def test_a_label_leaving_the_box_is_reported(head, tmp_path):
    """A label drawn outside the box (x = 45 mm) keeps 0% of its voxels there: reported by subject and side."""
    image, _, affine = head
    ijk = np.indices(image.shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*image.shape, 3)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[np.linalg.norm(world - [45.0, 40.0, 39.0], axis=-1) <= 4.0] = 2
    label[np.linalg.norm(world - PCS[1], axis=-1) <= 4.0] = 1
    _write(image, affine, tmp_path / "a.nii.gz", "float64")
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "a_label.nii.gz"))
    (tmp_path / "manifest.csv").write_text("subject_id,image,label,pcs_left,pcs_right,split\n"
                                           "a,a.nii.gz,a_label.nii.gz,1,1,train\n")
    cfg = DataConfig(manifest=str(tmp_path / "manifest.csv"), spacing_mm=SPACING, input_size=SIZE)
    summaries = preprocess_cohort(cfg, read_manifest(cfg.manifest), workers=1)
    assert summaries[0].kept[0] >= 0.95 and summaries[0].kept[1] == 0.0
    warnings = [line for line in describe(summaries) if line.startswith("warning")]
    assert warnings == [warnings[0]] and "subject a right_pcs label: 0% of its voxels" in warnings[0]


class _Oracle(torch.nn.Module):
    """A stand-in network whose segmentation is a fixed label map on the box (the geometry under test is
    predict's, not a model's)."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def forward(self, x: torch.Tensor) -> dict:
        assert tuple(x.shape[2:]) == tuple(self.labels.shape)
        seg = torch.nn.functional.one_hot(self.labels, 3).permute(3, 0, 1, 2)[None].float()
        return {"seg": seg, "cls": torch.zeros(1, 2)}


def test_predict_maps_the_box_back_onto_the_input_grid(scans):
    """A known label on the box comes back on each scan's own grid (same shape and affine) within one voxel
    of where that label lies in the scan."""
    box = registration.box_affine(SPACING, SIZE)
    ijk = np.indices(SIZE).reshape(3, -1)
    world = (box[:3, :3] @ ijk + box[:3, 3:4]).T.reshape(*SIZE, 3)
    known = np.zeros(SIZE, dtype=np.uint8)
    for value, point in PCS.items():
        known[np.linalg.norm(world - point, axis=-1) <= 4.0] = value
    for scan in scans[:2]:
        pred = predict_image(_Oracle(known), scan["image"], SPACING, list(SIZE), roi="register")
        assert pred.segmentation.shape == scan["label"].shape
        assert np.allclose(pred.affine, scan["affine"], atol=1e-4)
        voxel = float(np.abs(scan["affine"][:3, :3]).max())
        for value in PCS:
            shift = _centroid(pred.segmentation, scan["affine"], value) - _centroid(scan["label"], scan["affine"], value)
            assert np.linalg.norm(shift) <= voxel, (scan["sid"], value, shift)


def test_embedded_cohort_registration_undoes_the_subject_pose():
    """The embedded cohort's images are MNI crops seen through a random pose (rotation, scale, shift) and a
    smooth warp: the recovered affine is close to the pose's inverse, closer than no registration."""
    params = CohortParams(24, 0, 2.0, 1.0)
    points = np.array([[*PCS[1], 1], [*PCS[2], 1], [0, 20, 20, 1]]).T
    errors, unregistered = [], []
    for index in range(6):
        image, _, affine, pose = synthesize_subject_with_pose(params, index)
        reg = registration.register(image, affine)
        assert reg.problem() is None and reg.init == "header"
        truth = np.linalg.inv(pose) @ points
        errors.append(np.linalg.norm((reg.array @ points - truth)[:3], axis=0).mean())
        unregistered.append(np.linalg.norm((points - truth)[:3], axis=0).mean())
    assert np.median(errors) < 3.0 and np.median(errors) < np.median(unregistered), (errors, unregistered)


def test_colin27_registers_and_the_pcs_lands_near_the_template_point(colin27, tmp_path):
    """A real whole-head T1 with skull (Colin27, Debian's mricron-data), reoriented and its origin moved:
    its registration maps the embedded cohort's PCS points to where they lie in Colin27 (which is in MNI
    space itself) within 4 mm, with NCC above 0.7."""
    img = nib.load(str(colin27))
    data, affine = np.asarray(img.dataobj), img.affine
    image, _, moved, motion = _scanner(data, np.zeros(data.shape, dtype=np.uint8), affine, np.random.default_rng(3))
    path = tmp_path / "colin27_scanner.nii.gz"
    nib.save(nib.Nifti1Image(image, moved), str(path))
    reg = registration.register(image.astype(np.float32), moved)
    assert reg.problem() is None and reg.ncc > 0.7 and reg.init == "moments"
    assert reg.seconds < 20.0
    for point in PCS.values():
        found = reg.array @ np.append(point, 1.0)
        assert np.linalg.norm(found[:3] - (motion @ np.append(point, 1.0))[:3]) < 4.0


def test_images_that_cannot_be_registered_are_refused_with_one_line(tmp_path):
    """Noise and a 2D slab: preprocessing and predict refuse each with one line naming it and the figure."""
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 20, (96, 112, 96)).astype(np.float32), np.diag([2, 2, 2, 1.0])),
             str(noise))
    slab = tmp_path / "slab.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 20, (128, 128, 6)).astype(np.float32), np.diag([1.5, 1.5, 2, 1.0])),
             str(slab))
    cfg = DataConfig(manifest=str(tmp_path / "manifest.csv"), spacing_mm=SPACING, input_size=SIZE)
    for path, figure in ((noise, "NCC"), (slab, "slab")):
        rec = SubjectRecord(path.stem.split(".")[0], path, None, None, "pretrain", manifest=tmp_path / "m.csv")
        with pytest.raises(StudyInputError) as info:
            preprocess_subject(rec, cfg)
        message = str(info.value)
        assert "\n" not in message and rec.subject_id in message and figure in message, message
    with pytest.raises(StudyInputError, match=r"noise.nii.gz: registration to the template failed its check: "
                                              r"similarity to the template NCC"):
        predict_image(_Oracle(np.zeros(SIZE, dtype=np.uint8)), noise, SPACING, list(SIZE), roi="register")


def test_roi_template_takes_the_box_by_world_coordinates_and_a_manifest_column_overrides(head, tmp_path):
    """An image already in MNI space with ``roi template`` in its manifest row: no registration (identity
    matrix, nothing stored), labels where they were drawn; an unknown roi value is refused on one line."""
    image, label, affine = head
    _write(image, affine, tmp_path / "mni.nii.gz", "float64")
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "mni_label.nii.gz"))
    header = "subject_id,image,label,pcs_left,pcs_right,split,roi\n"
    (tmp_path / "manifest.csv").write_text(header + "m,mni.nii.gz,mni_label.nii.gz,1,1,train,template\n")
    cfg = DataConfig(manifest=str(tmp_path / "manifest.csv"), spacing_mm=SPACING, input_size=SIZE, roi="register")
    (rec,) = read_manifest(cfg.manifest)
    out = preprocess_subject(rec, cfg)
    assert np.array_equal(out.matrix, np.eye(4)) and not (tmp_path / ".registration").exists()
    box = registration.box_affine(SPACING, SIZE)
    for value, point in PCS.items():
        assert np.linalg.norm(_centroid(out.label[0], box, value) - point) < 1.0
    (tmp_path / "manifest.csv").write_text(header + "m,mni.nii.gz,mni_label.nii.gz,1,1,train,mni\n")
    with pytest.raises(StudyInputError, match=r"line 2 \(subject 'm'\): roi 'mni' is not one of register, "
                                              r"template, none"):
        read_manifest(cfg.manifest)
