"""Registration to the template: seconds per subject, similarity, accuracy, and the laptop cohort's
preprocessing time.

    python -m bench.registration [--work DIR] [--subjects 40] [--skip-cohort]

Rows:
- ``colin27`` / ``colin27-0.5mm``: Debian mricron-data's Colin27 (1 mm ``ch2.nii.gz``, 0.5 mm
  ``ch2better.nii.gz``), whole head with skull, written in four scanner orientations (rotation up to
  15 degrees, translation up to 60 mm, permuted and flipped axes). Colin27 lies in MNI space, so the
  embedded PCS points (+-6, 40, 39) mm moved with the scan are where the registration should send them:
  ``pcs_error_mm`` is that distance.
- ``embedded``: the first ``--subjects`` subjects of the embedded cohort at the laptop voxel size;
  ``pcs_error_mm`` against the inverse of each subject's generating pose (``unregistered_mm``: the same
  distance with no registration).
- ``--write-whole-head-cohort DIR``: writes a ``--cohort`` of 12 Colin27 scans in scanner orientations
  and dtypes, labelled at the PCS points, for ``python -m study.launch --grid smoke --cohort
  DIR/manifest.csv`` (nothing is measured).
- ``--model PATH``: runs a fine-tuned model on Colin27 in three scanner orientations with ``--roi
  register`` and ``--roi none``: presence probabilities, voxels called PCS and their distance from the
  embedded PCS point (``bench/results/registration_model.json``).
- ``laptop cohort``: generating aside, the wall time of preprocessing every subject of the laptop
  cohort (registration + resampling, the launcher's process pool over this machine's cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, write_result

COLIN = {"colin27": Path("/usr/share/mricron/templates/ch2.nii.gz"),
         "colin27-0.5mm": Path("/usr/share/mricron/templates/ch2better.nii.gz")}
PCS = np.array([[-6.0, 40.0, 39.0, 1.0], [6.0, 40.0, 39.0, 1.0]]).T


def scanner_pose(arrays: list[np.ndarray], affine: np.ndarray, rng: np.random.Generator):
    """Images (and labels) of one head as a scanner might write them: rotated up to 15 degrees, moved up to
    60 mm, voxel axes permuted and flipped. Returns (arrays, affine, motion), ``motion`` mapping a point
    of the original world to the new one. Also used by tests/test_registration.py."""
    from scipy.spatial.transform import Rotation

    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    motion[:3, 3] = rng.uniform(-60, 60, 3)
    order = rng.permutation(3)
    arrays, affine = [np.transpose(a, order) for a in arrays], affine[:, [*order, 3]]
    for axis in range(3):
        if rng.random() < 0.5:
            arrays = [np.flip(a, axis) for a in arrays]
            flip = np.eye(4)
            flip[axis, axis], flip[axis, 3] = -1, arrays[0].shape[axis] - 1
            affine = affine @ flip
    return [np.ascontiguousarray(a) for a in arrays], motion @ affine, motion


def write_whole_head_cohort(folder: Path, subjects: int = 12) -> Path:
    """A ``--cohort`` of Colin27 written ``subjects`` times in scanner orientations and dtypes (uint8, int16
    with a scale factor, float32, float64), each with a label of two 4 mm balls at the embedded PCS
    points (1 left, 2 right; Colin27 is in MNI space), split 4/4/2/2 per 12; returns the manifest."""
    import nibabel as nib

    img = nib.load(str(COLIN["colin27"]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    ijk = np.indices(data.shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*data.shape, 3)
    label = np.zeros(data.shape, dtype=np.uint8)
    for value, point in ((1, PCS[:3, 0]), (2, PCS[:3, 1])):
        label[np.linalg.norm(world - point, axis=-1) <= 4.0] = value
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    splits = ["pretrain", "pretrain", "pretrain", "pretrain", "train", "train", "train", "train", "val", "val",
              "test", "test"]
    rows = ["subject_id,image,label,pcs_left,pcs_right,split"]
    for index in range(subjects):
        (image, lab), moved, _ = scanner_pose([data, label], affine, rng)
        kind = ("uint8", "int16", "float32", "float64")[index % 4]
        if kind == "int16":
            out = nib.Nifti1Image(np.rint(image * 100).astype(np.int16), moved)
            out.header.set_slope_inter(0.01, 0.0)
        else:
            out = nib.Nifti1Image(image.astype(kind), moved)
        sid = f"colin{index:02d}"
        nib.save(out, str(folder / f"{sid}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, moved), str(folder / f"{sid}_pcs.nii.gz"))
        rows.append(f"{sid},{sid}.nii.gz,{sid}_pcs.nii.gz,1,1,{splits[index % len(splits)]}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def model_on_colin(model: str, orientations: int = 3) -> list[dict]:
    """Run a fine-tuned model (``study.predict``'s ``--model``: a model.pt or its folder) on Colin27 (1 mm
    and 0.5 mm) in scanner orientations with ``--roi register`` and ``--roi none``; per hemisphere the
    presence probability, the voxels called PCS and their centroid's distance from the embedded PCS point."""
    import tempfile as _tempfile

    import nibabel as nib

    from study.predict import load_model, predict_image

    with _tempfile.TemporaryDirectory() as folder:
        net, info = load_model(model, None, folder)
        rows = []
        for name, path in COLIN.items():
            img = nib.load(str(path))
            data, affine = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
            rng = np.random.default_rng(5)
            for k in range(orientations):
                (image,), moved, motion = scanner_pose([data], affine, rng)
                target = Path(folder) / f"{name}-{k}.nii.gz"
                nib.save(nib.Nifti1Image(image, moved), str(target))
                for roi in ("register", "none"):
                    pred = predict_image(net, target, info["spacing_mm"], info["input_size"], roi=roi)
                    row = {"images": f"{name} #{k}", "roi": roi}
                    for value, side in ((1, "left"), (2, "right")):
                        ijk = np.argwhere(pred.segmentation == value)
                        want = (motion @ PCS[:, value - 1])[:3]
                        row[f"p_{side}"] = pred.probabilities[value - 1]
                        row[f"voxels_{side}"] = len(ijk)
                        row[f"distance_mm_{side}"] = (float(np.linalg.norm(moved[:3, :3] @ ijk.mean(axis=0)
                                                                           + moved[:3, 3] - want)) if len(ijk) else None)
                    rows.append(row)
    return rows


def _row(name: str, regs: list, errors: list, extra: dict | None = None) -> dict:
    seconds = [r.seconds for r in regs]
    row = {"images": name, "n": len(regs), "seconds_median": statistics.median(seconds), "seconds_max": max(seconds),
           "ncc_median": statistics.median(r.ncc for r in regs), "ncc_min": min(r.ncc for r in regs),
           "pcs_error_mm_median": statistics.median(errors), "pcs_error_mm_max": max(errors)}
    row.update(extra or {})
    return row


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib

    from study.cohort import CohortParams, generate_cohort, synthesize_subject_with_pose
    from study.plan.grid import BUDGETS
    from study.run.prepare import preprocess_cohort
    from trainables import registration
    from trainables.data import DataConfig, read_manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    p.add_argument("--subjects", type=int, default=40, help="embedded-cohort subjects to register one by one")
    p.add_argument("--skip-cohort", action="store_true", help="skip the laptop cohort's preprocessing time")
    p.add_argument("--write-whole-head-cohort", type=Path, metavar="DIR",
                   help="only write a --cohort of 12 Colin27 scans in scanner orientations (with labels) to DIR")
    p.add_argument("--model", help="only run this fine-tuned model (model.pt or its folder) on Colin27 in "
                   "scanner orientations, with --roi register and none")
    args = p.parse_args(argv)
    if args.model:
        rows = model_on_colin(args.model)
        print_table(rows, list(rows[0]))
        path = write_result("registration_model", "python -m bench.registration " + " ".join(argv or sys.argv[1:]),
                            rows)
        print(f"wrote {path}")
        return 0
    if args.write_whole_head_cohort:
        print(write_whole_head_cohort(args.write_whole_head_cohort))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-registration-"))
    rows = []
    registration._template(3.0)  # the template's one-off load is not a subject's time
    for name, path in COLIN.items():
        if not path.is_file():
            print(f"{name}: {path} missing (apt-get install mricron-data); skipped")
            continue
        img = nib.load(str(path))
        data, affine = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        rng = np.random.default_rng(7)
        regs, errors = [], []
        for _ in range(4):
            (image,), moved, motion = scanner_pose([data.astype(np.float32)], affine, rng)
            reg = registration.register(image, moved)
            regs.append(reg)
            errors.extend(np.linalg.norm((reg.array @ PCS - motion @ PCS)[:3], axis=0).tolist())
        rows.append(_row(name, regs, errors))
    budget = BUDGETS["laptop"]
    spacing, size, splits = budget["spacing_mm"], tuple(budget.get("input_size", (16, 16, 16))), budget["splits"]
    params = CohortParams(args.subjects, 0, spacing, 1.0)
    regs, errors, unregistered = [], [], []
    for index in range(args.subjects):
        image, _, affine, pose = synthesize_subject_with_pose(params, index)
        reg = registration.register(image, affine)
        truth = np.linalg.inv(pose) @ PCS
        regs.append(reg)
        errors.append(float(np.linalg.norm((reg.array @ PCS - truth)[:3], axis=0).mean()))
        unregistered.append(float(np.linalg.norm((PCS - truth)[:3], axis=0).mean()))
    rows.append(_row(f"embedded {spacing:g} mm", regs, errors,
                     {"unregistered_mm_median": statistics.median(unregistered)}))
    if not args.skip_cohort:
        manifest = generate_cohort(work / "laptop", seed=0, spacing=spacing, splits=dict(splits))
        cfg = DataConfig(manifest=str(manifest), spacing_mm=spacing, input_size=size,
                         cache_dir=str(work / f"cache-{time.time_ns()}"))
        records = read_manifest(manifest)
        for folder in (manifest.parent / ".registration",):
            for stored in folder.glob("*.json"):
                stored.unlink()
        start = time.perf_counter()
        preprocess_cohort(cfg, records)
        wall = time.perf_counter() - start
        rows.append({"images": "laptop cohort", "n": len(records), "preprocess_wall_s": wall,
                     "workers": os.cpu_count()})
    print_table(rows, sorted({k for r in rows for k in r}, key=lambda k: (k != "images", k)))
    path = write_result("registration", "python -m bench.registration " + " ".join(argv or sys.argv[1:]), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
