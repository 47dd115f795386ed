"""``python -m study.predict``: geometry back onto the input grid, presence from a trained model, bad input.

A tiny SegResNet is fine-tuned here (``run_finetune``, the study's own trial path) on a synthetic cohort
in which every subject with a PCS also appears as a *twin* whose grooves were filled in: the pairs
share their anatomy, so what tells them apart is the groove itself. Trained for a few seconds the
network's presence head does not generalise reliably to unseen subjects (a 16^3, width-8 network
trained on a dozen volumes for 40 s finds some held-out grooves, not all), so the classification
test uses the training subjects and their twins: each groove must be called present and its
filled-in twin must score lower. That still checks what predict adds: the image is read, oriented,
resampled and normalised as in training, or the memorised answers would not come back. The
geometry tests need no model quality: they check shapes, affines and a label's round trip.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import ndimage

from study.cohort import CohortParams, synthesize_subject
from study.predict import main as predict_main
from study.predict import network_affine, predict_image, to_input_grid
from study.run.model_registry import load_model_folder, register_best, stage_model
from trainables.backbones import BackboneConfig
from trainables.data import DataConfig, SubjectRecord, preprocess_subject
from trainables.engine import TrainConfig
from trainables.trials import FinetuneTrial, run_finetune

SPACING, SIZE = 4.0, (16, 16, 16)
# 6 training subjects (+ twins), 50 epochs: about 40 s of one CPU core; at 40 epochs some training
# grooves are still below 0.5, at 50 every one is called present (and held-out left grooves mostly too).
SUBJECTS, EPOCHS = 10, 50
BATCH, LR, LR_HEADS, CLS_WEIGHT = 2, 3e-3, 1e-2, 3.0
MODEL_NAME = "pcs-test-groove"
TRIAL_MODEL = Path("study", "models", "none__full__segresnet__1", "model.pt")  # relative to model_dir's parent


def _remove_groove(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Fill the (dilated) groove voxels with the local mean of their surroundings."""
    mask = ndimage.binary_dilation(label > 0, iterations=1)
    keep = (~mask).astype(np.float32)
    mean = ndimage.gaussian_filter(image * keep, 1.0) / np.maximum(ndimage.gaussian_filter(keep, 1.0), 1e-6)
    out = image.copy()
    out[mask] = mean[mask]
    return out


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Subjects and groove-free twins (difficulty 0.3: a dark, clean groove); returns paths and labels."""
    folder = tmp_path_factory.mktemp("groove_cohort")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    params = CohortParams(SUBJECTS, 3, SPACING, 0.3)
    rows, subjects = [], {}
    for i in range(SUBJECTS):
        image, label, affine = synthesize_subject(params, i)
        split = "train" if i < SUBJECTS - 4 else ("val" if i < SUBJECTS - 2 else "test")
        for twin in (False, True):
            if twin and not label.any():
                continue
            img, lab = (_remove_groove(image, label), np.zeros_like(label)) if twin else (image, label)
            sid = f"s{i:02d}{'-twin' if twin else ''}"
            _save(img, affine, folder / "images" / f"{sid}.nii.gz")
            _save(lab, affine, folder / "labels" / f"{sid}.nii.gz")
            present = (int((lab == 1).any()), int((lab == 2).any()))
            rows.append([sid, f"images/{sid}.nii.gz", f"labels/{sid}.nii.gz", *present, split])
            subjects[sid] = {"image": folder / "images" / f"{sid}.nii.gz", "label": lab, "affine": affine,
                             "present": present, "split": split}
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "image", "label", "pcs_left", "pcs_right", "split"])
        writer.writerows(rows)
    return {"manifest": folder / "manifest.csv", "subjects": subjects, "folder": folder}


@pytest.fixture(scope="module")
def model_dir(cohort, tmp_path_factory) -> Path:
    """Fine-tune segresnet width 8 on the twin cohort; export it as a self-contained model folder.

    The trial writes its ``model.pt`` where the launcher's trials do, ``<study>/models/<cell>__<seed>/``,
    under a ``study.json`` holding the plan's geometry (see ``trial_model``).
    """
    out = tmp_path_factory.mktemp("groove_model")
    trial = out / TRIAL_MODEL.parent
    spec = FinetuneTrial(
        backbone=BackboneConfig("segresnet", 8), strategy="full", strategy_params={},
        train=TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr_encoder=LR, lr_decoder=LR, lr_heads=LR_HEADS,
                          cls_weight=CLS_WEIGHT, seed=0, device="cpu", num_threads=1),
        data=DataConfig(manifest=str(cohort["manifest"]), spacing_mm=SPACING, input_size=SIZE, roi="none"),
        output_dir=str(trial),
    )
    threads = torch.get_num_threads()
    try:
        run_finetune(spec, lambda metrics, state: None)
    finally:
        torch.set_num_threads(threads)
    plan = {"name": "groove", "spacing_mm": SPACING, "input_size": list(SIZE),
            "cells": [{"pretrain": "none", "strategy": "full", "backbone": "segresnet"}]}
    (out / "study" / "study.json").write_text(json.dumps({"args": {}, "parent_run_id": "", "plan": plan}))
    info = {"cell": "none__full__segresnet", "spacing_mm": SPACING, "input_size": list(SIZE)}
    return stage_model(trial / "model.pt", info, out / "exported")


@pytest.fixture(scope="module")
def trial_model(model_dir) -> Path:
    """The trial's own ``model.pt`` in its study folder: no ``model_info.json`` beside it, so the
    spacing and input size must come from the ``study.json`` above it."""
    path = model_dir.parent / TRIAL_MODEL
    assert path.is_file() and not (path.parent / "model_info.json").exists()
    return path


@pytest.fixture(scope="module")
def registry(model_dir, tmp_path_factory) -> str:
    """A real MLflow SQLite registry holding the model as ``pcs-test-groove@best``; returns its URI."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("predict-test", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    info = {"cell": "none__full__segresnet", "spacing_mm": SPACING, "input_size": list(SIZE)}
    assert register_best(client, MODEL_NAME, run_id, model_dir / "model.pt", info) == 1
    assert register_best(client, MODEL_NAME, run_id, model_dir / "model.pt", info) == 1  # idempotent
    return uri


def _lps_permuted(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored LPS with axes (y, z, x): flips and a permutation, no interpolation."""
    flipped = image[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = image.shape[0] - 1, image.shape[1] - 1
    permuted = np.transpose(flipped, (1, 2, 0))
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 0] = perm[2, 1] = perm[3, 3] = 1.0  # new voxel (j, k, i) -> old (i, j, k)
    return np.ascontiguousarray(permuted), affine @ flip @ perm


def _resampled(image: np.ndarray, affine: np.ndarray, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Onto an oblique-free LPS grid at 3 mm, shifted, with another shape (22, 19, 24)."""
    shape = (22, 19, 24)
    target = np.array([[-3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])
    centre = affine[:3, :3] @ ((np.array(image.shape) - 1) / 2) + affine[:3, 3]
    target[:3, 3] = centre - target[:3, :3] @ ((np.array(shape) - 1) / 2) + np.array([2.0, -1.5, 1.0])
    to_source = np.linalg.inv(affine) @ target
    out = ndimage.affine_transform(image, to_source[:3, :3], offset=to_source[:3, 3], output_shape=shape, order=order)
    return out.astype(image.dtype), target


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_label_round_trip_through_the_network_grid(cohort, tmp_path) -> None:
    """A label preprocessed like training with ``roi none`` (centred crop) and mapped back lands where it was
    (no model involved; tests/test_registration.py checks the registered path)."""
    sub = cohort["subjects"]["s00"]
    source = nib.load(str(sub["image"]))
    image, affine = _resampled(np.asarray(source.dataobj, dtype=np.float32), source.affine)
    blob = (image > np.percentile(image, 55)).astype(np.uint8)
    path_img, path_lab = _save(image, affine, tmp_path / "img.nii.gz"), _save(blob, affine, tmp_path / "lab.nii.gz")
    cfg = DataConfig(manifest=str(tmp_path / "m.csv"), spacing_mm=SPACING, input_size=SIZE, roi="none")
    label_net = preprocess_subject(SubjectRecord("x", path_img, path_lab, (0, 0), "test"), cfg).label
    back = to_input_grid(label_net[0], network_affine(image.shape, affine, cfg), affine, image.shape)
    assert back.shape == blob.shape
    assert _dice(back > 0, blob > 0) > 0.9


def test_output_has_the_input_grid(model_dir, cohort, tmp_path) -> None:
    model, info = load_model_folder(model_dir)
    sub = cohort["subjects"]["s00"]
    source = nib.load(str(sub["image"]))
    image, affine = _resampled(np.asarray(source.dataobj, dtype=np.float32), source.affine)
    pred = predict_image(model, _save(image, affine, tmp_path / "x.nii.gz"), info["spacing_mm"], info["input_size"],
                         roi="none")
    assert pred.segmentation.shape == image.shape and np.allclose(pred.affine, affine)
    assert set(np.unique(pred.segmentation)) <= {0, 1, 2}
    assert all(0.0 <= p <= 1.0 for p in pred.probabilities)


def test_lps_permuted_input_gives_the_same_prediction(model_dir, cohort, tmp_path) -> None:
    model, info = load_model_folder(model_dir)
    sub = cohort["subjects"]["s00"]
    ras = predict_image(model, sub["image"], SPACING, SIZE, roi="none")
    source = nib.load(str(sub["image"]))
    image, affine = _lps_permuted(np.asarray(source.dataobj, dtype=np.float32), source.affine)
    lps = predict_image(model, _save(image, affine, tmp_path / "lps.nii.gz"), SPACING, SIZE, roi="none")
    assert np.allclose(lps.probabilities, ras.probabilities, atol=1e-5)  # left stays left
    expected, _ = _lps_permuted(ras.segmentation, source.affine)
    assert np.array_equal(lps.segmentation, expected) and np.allclose(lps.affine, affine)


def test_groove_volume_is_called_present_and_its_filled_twin_lower(model_dir, cohort) -> None:
    model, _ = load_model_folder(model_dir)
    subs = cohort["subjects"]
    train = [sid for sid, s in subs.items() if s["split"] == "train" and not sid.endswith("-twin") and any(s["present"])]
    called = lower = total = 0
    for sid in train:
        groove = predict_image(model, subs[sid]["image"], SPACING, SIZE, roi="none").probabilities
        filled = predict_image(model, subs[f"{sid}-twin"]["image"], SPACING, SIZE, roi="none").probabilities
        for side in (0, 1):
            if subs[sid]["present"][side]:
                total += 1
                called += groove[side] > 0.5
                lower += filled[side] < groove[side]
    assert total >= 4
    assert called >= 0.8 * total, f"{called}/{total} groove hemispheres called present"
    assert lower >= 0.8 * total, f"{lower}/{total} filled-in twins scored lower"


@pytest.fixture(scope="module")
def cli_runs(registry, trial_model, cohort, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every command-line case at once (the subprocesses run side by side): one good, the rest bad input."""
    tmp = tmp_path_factory.mktemp("cli")
    good = str(cohort["subjects"]["s00"]["image"])
    source = nib.load(str(cohort["subjects"]["s01"]["image"]))
    _save(*_resampled(np.asarray(source.dataobj, dtype=np.float32), source.affine), tmp / "oblique.nii.gz")
    eye = np.eye(4)
    _save(np.random.default_rng(0).random((16, 16, 16, 2), dtype=np.float32), eye, tmp / "four_d.nii.gz")
    _save(np.random.default_rng(0).random((32, 32), dtype=np.float32), eye, tmp / "two_d.nii.gz")
    _save(np.random.default_rng(0).random((64, 64, 1), dtype=np.float32), eye, tmp / "slice.nii.gz")
    (tmp / "corrupt.nii.gz").write_bytes(Path(good).read_bytes()[:200])
    model = ("--model", f"{MODEL_NAME}@best", "--tracking-uri", registry)
    cases = {
        "registered": (*model, str(tmp / "oblique.nii.gz"), "--output", str(tmp / "seg.nii.gz")),
        "model path": ("--model", str(trial_model), str(tmp / "oblique.nii.gz"), "--output", str(tmp / "seg_path.nii.gz")),
        "4D image": (*model, str(tmp / "four_d.nii.gz")),
        "2D image": (*model, str(tmp / "two_d.nii.gz")),
        "single slice": (*model, str(tmp / "slice.nii.gz")),
        "corrupt file": (*model, str(tmp / "corrupt.nii.gz")),
        "missing file": (*model, str(tmp / "nothere.nii.gz")),
        "unknown model": ("--model", "pcs-nope", "--tracking-uri", registry, good),
        "unknown alias": ("--model", f"{MODEL_NAME}@gold", "--tracking-uri", registry, good),
        "missing model file": ("--model", str(tmp / "none" / "model.pt"), good),
        "image is a folder": (*model, str(tmp / "images.nii.gz")),
        "model is an empty folder": ("--model", str(tmp / "empty_model"), good),
    }
    (tmp / "images.nii.gz").mkdir()
    (tmp / "empty_model").mkdir()
    # The two good cases run as real commands, side by side; the bad ones call the same main() in this
    # process (each would otherwise spend seconds importing torch and MONAI only to print one line).
    good_cases = ("registered", "model path")
    procs = {k: subprocess.Popen([sys.executable, "-m", "study.predict", *cases[k]], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k in good_cases}
    out = {}
    for k, v in cases.items():
        if k not in good_cases:
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = predict_main(list(v))
            out[k] = subprocess.CompletedProcess(list(v), code, stdout.getvalue(), stderr.getvalue())
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    out["folder"] = tmp
    return out


def test_cli_with_a_registered_model(cli_runs) -> None:
    proc, tmp = cli_runs["registered"], cli_runs["folder"]
    assert proc.returncode == 0, proc.stderr
    assert "PCS presence probability: left" in proc.stdout
    source, out = nib.load(str(tmp / "oblique.nii.gz")), nib.load(str(tmp / "seg.nii.gz"))
    assert out.shape == source.shape and np.allclose(out.affine, source.affine, atol=1e-5)
    assert out.get_data_dtype() == np.uint8


def test_cli_with_a_trial_model_path(cli_runs) -> None:
    """``--model <study>/models/<trial>/model.pt``: geometry from the study.json, output on the input grid."""
    proc, tmp = cli_runs["model path"], cli_runs["folder"]
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"PCS presence probability: left ([0-9.]+), right ([0-9.]+)", proc.stdout)
    assert found, proc.stdout
    assert all(0.0 <= float(p) <= 1.0 for p in found.groups())
    source, out = nib.load(str(tmp / "oblique.nii.gz")), nib.load(str(tmp / "seg_path.nii.gz"))
    assert out.shape == source.shape and np.allclose(out.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    assert f"segmentation: {tmp / 'seg_path.nii.gz'}" in proc.stdout


@pytest.mark.parametrize("case, words", [
    ("4D image", "4D"), ("2D image", "2D"), ("single slice", "not a 3D"), ("corrupt file", "cannot read"),
    ("missing file", "does not exist"), ("unknown model", "no registered model 'pcs-nope'"),
    ("unknown alias", "no alias 'gold'"), ("missing model file", "does not exist"),
    ("image is a folder", "is a folder, not a file"), ("model is an empty folder", "is a folder without a model.pt"),
])
def test_bad_input_is_one_line_and_exit_2(cli_runs, case, words) -> None:
    proc = cli_runs[case]
    assert proc.returncode == 2, (case, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (case, proc.stderr)
    assert "Traceback" not in proc.stderr
