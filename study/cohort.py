"""Synthetic paracingulate-sulcus (PCS) cohort built from the ICBM152 2009a template shipped with nilearn.

Each subject is the template seen through a random affine (rotation, scale, translation) and a smooth
elastic warp, with a multiplicative bias field and Rician noise. Per hemisphere a PCS is drawn with
probability ~0.6 as a thin curved ribbon of darkened grey matter above the cingulate sulcus (drawn in
MNI space, so it moves with the anatomy). Labels: 0 background, 1 left PCS (MNI x < 0), 2 right PCS.
The manifest grades each hemisphere twice: ``pcs_left``/``pcs_right`` absent (0) or present (1), the
``pcs`` task's targets; ``pcs3_left``/``pcs3_right`` absent (0), present (1) or prominent (2, a groove
longer and deeper than typical: :func:`grade`), the ``pcs3`` task's.

Usage::

    python -m study.cohort --output DIR [--subjects 24] [--seed 0] [--spacing 2] [--difficulty 1]

writes ``DIR/images/<sid>.nii.gz``, ``DIR/labels/<sid>.nii.gz``, ``DIR/manifest.csv``, ``DIR/preview.png``
and ``DIR/cohort.json`` (parameters and checksums; a matching complete cohort is reused).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from study.cli import OneLineParser, run_command
from trainables.atomic import atomic_write, atomic_write_text
from trainables.data import check_splits
from trainables.errors import StudyInputError
from trainables.registration import BOX_MIN, BOX_SIZE, box_affine

GENERATOR_VERSION = 1
MANIFEST_COLUMNS = ("subject_id", "image", "label", "pcs_left", "pcs_right", "split", "sha256", "pcs3_left",
                    "pcs3_right")
PCS_PROBABILITY = 0.6
_TEMPLATE_MARGIN = 24.0  # mm of template kept around the crop box (room for the subject transform)


@dataclass(frozen=True)
class CohortParams:
    """What determines a cohort's voxels (stored in cohort.json to decide on reuse)."""

    subjects: int
    seed: int
    spacing: float
    difficulty: float
    version: int = GENERATOR_VERSION

    def validate(self) -> None:
        """Raise StudyInputError for parameters the generator cannot honour."""
        if isinstance(self.subjects, bool) or not isinstance(self.subjects, int) or self.subjects < 8:
            raise StudyInputError(
                f"--subjects {self.subjects!r}: a cohort needs at least 8 subjects (2 per split); use --subjects 8 or more"
            )
        if self.subjects > 10000:
            raise StudyInputError(f"--subjects {self.subjects}: at most 10000 subjects; use a smaller number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise StudyInputError(f"--seed {self.seed!r}: the seed must be a non-negative integer")
        if not (math.isfinite(self.spacing) and 1.0 <= self.spacing <= 8.0):
            raise StudyInputError(f"--spacing {self.spacing!r}: voxel spacing must be between 1 and 8 mm (e.g. 2 or 4)")
        if not (math.isfinite(self.difficulty) and 0.1 <= self.difficulty <= 10.0):
            raise StudyInputError(
                f"--difficulty {self.difficulty!r}: must be between 0.1 and 10 (0.5 easy, 1 default, 2 hard)"
            )

    @property
    def grid(self) -> int:
        return int(round(BOX_SIZE / self.spacing))


def output_affine(spacing: float, n: int) -> np.ndarray:
    """RAS voxel->world affine of the crop grid: n voxels per axis centred on the MNI crop box."""
    return box_affine(spacing, (n, n, n))


def split_sizes(n: int) -> dict[str, int]:
    """Subjects per split: ~40% pretrain, 30% train, 15% val, 15% test, at least 2 each."""
    val = max(2, round(0.15 * n))
    test = max(2, round(0.15 * n))
    train = max(2, round(0.30 * n))
    return {"pretrain": n - train - val - test, "train": train, "val": val, "test": test}


def assign_splits(n: int, seed: int, sizes: dict[str, int] | None = None) -> list[str]:
    """Split name per subject index, a seeded permutation (the same seed, the same split); ``sizes`` gives
    the subjects per split (default :func:`split_sizes`)."""
    names = [name for name, size in (sizes or split_sizes(n)).items() for _ in range(size)]
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
    splits = [""] * n
    for rank, index in enumerate(order):
        splits[int(index)] = names[rank]
    return splits


def _load_icbm152():
    """(T1, GM) 1 mm ICBM152 2009a templates scaled to [0, 1], as nilearn's load_mni152_*_template.

    Reads the files shipped in nilearn's package data directly (importing ``nilearn.datasets`` costs
    seconds); falls back to nilearn's loaders if a future release moves them. Never downloads.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data" if spec else Path("/nonexistent")
    paths = [folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm")]
    if not all(p.is_file() for p in paths):
        from nilearn.datasets import load_mni152_gm_template, load_mni152_template

        return load_mni152_template(resolution=1), load_mni152_gm_template(resolution=1)
    images = []
    for path in paths:
        img = nib.load(path)
        data = np.asarray(img.get_fdata()).astype(np.float32)
        data /= data.max()
        images.append(nib.Nifti1Image(data, img.affine))
    return tuple(images)


@functools.lru_cache(maxsize=4)
def _template(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1, GM probability, world->voxel affine) of the 1 mm ICBM152 template around the crop box,
    low-pass filtered for the target spacing. Loaded offline from nilearn's package data."""
    t1_img, gm_img = _load_icbm152()
    inv = np.linalg.inv(t1_img.affine)
    lo = np.floor(inv[:3, :3] @ (BOX_MIN - _TEMPLATE_MARGIN) + inv[:3, 3]).astype(int)
    hi = np.ceil(inv[:3, :3] @ (BOX_MIN + BOX_SIZE + _TEMPLATE_MARGIN) + inv[:3, 3]).astype(int)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(t1_img.shape[:3]) - 1)
    region = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
    t1 = np.asarray(t1_img.dataobj[region], dtype=np.float32)
    gm = np.asarray(gm_img.dataobj[region], dtype=np.float32)
    sigma = 0.4 * spacing if spacing > 1.0 else 0.0
    if sigma:
        t1 = ndimage.gaussian_filter(t1, sigma)
        gm = ndimage.gaussian_filter(gm, sigma)
    shift = np.eye(4)
    shift[:3, 3] = -lo
    return t1, gm, shift @ inv


def _smooth_field(rng: np.random.Generator, coarse: int, scale: float, pts: np.ndarray, channels: int) -> np.ndarray:
    """A smooth random field at world points ``pts`` (3, ...): cubic interpolation of a coarse
    (coarse^3) grid of N(0, scale) control values spanning the crop box."""
    control = rng.normal(0.0, scale, size=(channels, coarse, coarse, coarse))
    coords = (pts - BOX_MIN.reshape(3, *([1] * (pts.ndim - 1)))) / BOX_SIZE * (coarse - 1)
    return np.stack([ndimage.map_coordinates(c, coords, order=3, mode="nearest") for c in control])


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_pcs(rng: np.random.Generator) -> dict[int, dict[str, float]]:
    """PCS shape per present hemisphere (-1 left, +1 right): an arc about (yc, zc) in MNI space."""
    grooves = {}
    for side in (-1, 1):
        params = {
            "present": float(rng.random() < PCS_PROBABILITY),
            "yc": 10.0 + rng.uniform(-2, 2),
            "zc": rng.uniform(-2, 2),
            "radius": rng.uniform(48.0, 52.0),
            "theta_top": np.deg2rad(rng.uniform(62.0, 76.0)),
            "length": rng.uniform(20.0, 40.0),  # arc length, mm
            "depth": rng.uniform(5.0, 10.0),  # mm from the medial surface (|x| = 2) laterally
            "tilt": rng.uniform(-0.3, 0.3),  # radial drift per mm of depth
            "wave_amp": rng.uniform(0.0, 1.5),
            "wave_phase": rng.uniform(0, 2 * np.pi),
        }
        if params["present"]:
            grooves[side] = params
    return grooves


def grade(groove: dict[str, float]) -> int:
    """A drawn groove's grade: 2 (prominent) when its length and depth, each scaled to its drawn range,
    add up to more than 1 (about half of the grooves), else 1 (present)."""
    return 2 if (groove["length"] - 20.0) / 20.0 + (groove["depth"] - 5.0) / 5.0 > 1.0 else 1


def pcs_grades(params: CohortParams, index: int, present: tuple[int, int]) -> tuple[int, int]:
    """Subject ``index``'s three-class grade per hemisphere [left, right]: 0 where its label has no PCS
    voxel (``present``), else :func:`grade` of the groove drawn for it (the same draw as the image's)."""
    grooves = _draw_pcs(np.random.default_rng([params.seed, index]))
    return tuple(grade(grooves[side]) if shown else 0 for side, shown in zip((-1, 1), present, strict=True))


def _groove_weight(q: np.ndarray, gm: np.ndarray, groove: dict[str, float], side: int, width: float) -> np.ndarray:
    """Soft membership (0..1) of MNI points ``q`` (3, ...) in one hemisphere's PCS ribbon."""
    lateral = side * q[0]
    dy, dz = q[1] - groove["yc"], q[2] - groove["zc"]
    theta = np.arctan2(dz, dy)
    theta_top = groove["theta_top"]
    theta_low = max(np.deg2rad(15.0), theta_top - groove["length"] / groove["radius"])
    along = np.clip((theta - theta_low) / (theta_top - theta_low), 0.0, 1.0)
    radius = (
        groove["radius"]
        + groove["wave_amp"] * np.sin(3.0 * theta + groove["wave_phase"])
        - groove["tilt"] * (lateral - 2.0)
    )
    depth = 1.0 + groove["depth"] * np.sqrt(np.sin(np.pi * along))  # shallower at both ends
    inside = (theta >= theta_low) & (theta <= theta_top) & (lateral >= 2.0) & (lateral <= 2.0 + depth)
    profile = np.exp(-0.5 * ((np.hypot(dy, dz) - radius) / width) ** 2)
    return profile * inside * np.clip((gm - 0.15) / 0.3, 0.0, 1.0)


def synthesize_subject(params: CohortParams, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, label uint8, affine) of subject ``index``; deterministic in (seed, index)."""
    image, label, affine, _ = synthesize_subject_with_pose(params, index)
    return image, label, affine


def synthesize_subject_with_pose(params: CohortParams, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """As :func:`synthesize_subject`, plus the subject's pose: the 4x4 affine part (without the smooth
    warp) of the map from the image's world point to the template (MNI) point it shows."""
    rng = np.random.default_rng([params.seed, index])
    t1, gm_map, to_voxel = _template(params.spacing)
    n = params.grid
    affine = output_affine(params.spacing, n)
    ijk = np.indices((n, n, n), dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    centre = np.array([[0.0], [38.0], [34.0]])  # rotate about the PCS region, keeping the midline near x=0
    grooves = _draw_pcs(rng)
    width = max(1.0, 0.45 * params.spacing)

    def sample(volume: np.ndarray, q: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, to_voxel[:3, :3] @ q + to_voxel[:3, 3:4], order=1, mode="constant")

    for attempt in range(64):
        if attempt == 63:  # fallback: no pose change, so each label stays on its own side of x = 0
            q, matrix, shift = world, np.eye(3), np.zeros((3, 1))
        else:
            matrix = _rotation(rng, 8.0) @ np.diag(rng.uniform(0.95, 1.05, size=3))
            shift = rng.uniform(-3.0, 3.0, size=(3, 1))
            warp = _smooth_field(rng, 5, 1.5, world, 3)
            q = centre + matrix @ (world - centre) + shift + warp
        gm = sample(gm_map, q)
        weights = {side: _groove_weight(q, gm, g, side, width) for side, g in grooves.items()}
        # keep poses where left labels stay at world x < 0 and right labels at x > 0
        if all(np.all(side * world[0][w > 0.5] > 0) for side, w in weights.items()):
            break
    contrast = min(0.9, 0.5 / params.difficulty)
    image = sample(t1, q)
    label = np.zeros(image.shape, dtype=np.uint8)
    for side, w in weights.items():
        image *= 1.0 - contrast * w
        label[w > 0.5] = 1 if side < 0 else 2
    image *= np.exp(_smooth_field(rng, 4, 0.12, world, 1)[0])
    sigma = 0.025 * params.difficulty
    noise = rng.normal(0.0, sigma, size=(2, image.size))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    shape = (n, n, n)
    pose = np.eye(4)
    pose[:3, :3] = matrix
    pose[:3, 3] = (centre - matrix @ centre + shift)[:, 0]
    return (1000.0 * image).reshape(shape).astype(np.float32), label.reshape(shape), affine, pose


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    """Write atomically (temp name + os.replace); return the file's sha256."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    nib.save(img, tmp)
    digest = _sha256(tmp)
    os.replace(tmp, path)
    return digest


def _reusable(out: Path, meta: dict, params: CohortParams, sids: list[str], splits: list[str]) -> set[str]:
    """Subjects whose files exist with the checksums recorded in cohort.json."""
    if meta.get("params") != asdict(params):
        return set()
    good = set()
    for sid, split in zip(sids, splits, strict=True):
        entry = meta.get("subjects", {}).get(sid)
        if not entry:
            continue
        files = [(out / "images" / f"{sid}.nii.gz", entry.get("image_sha256"))]
        if split != "pretrain":
            files.append((out / "labels" / f"{sid}.nii.gz", entry.get("label_sha256")))
        if all(path.is_file() and digest and _sha256(path) == digest for path, digest in files):
            good.add(sid)
    return good


def _manifest_text(sids: list[str], splits: list[str], subjects: dict[str, dict]) -> str:
    rows = [",".join(MANIFEST_COLUMNS)]
    for sid, split in zip(sids, splits, strict=True):
        entry = subjects[sid]
        grades = ["pcs_left", "pcs_right", "pcs3_left", "pcs3_right"]
        if split == "pretrain":
            label, values = "", [""] * len(grades)
        else:
            label, values = f"labels/{sid}.nii.gz", [str(entry[k]) for k in grades]
        rows.append(",".join([sid, f"images/{sid}.nii.gz", label, *values[:2], split, entry["image_sha256"],
                              *values[2:]]))
    return "\n".join(rows) + "\n"


def write_preview(out: Path, sids: list[str], splits: list[str], subjects: dict[str, dict], count: int = 4) -> Path:
    """A montage (sagittal x = -6 mm, sagittal x = +6 mm, coronal y = 34 mm) of a few labelled subjects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    labelled = [s for s, split in zip(sids, splits, strict=True) if split != "pretrain"]
    labelled.sort(key=lambda s: -(subjects[s]["pcs_left"] + subjects[s]["pcs_right"]))
    chosen = labelled[:count]
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.5 * len(chosen)), squeeze=False)
    for row, sid in zip(axes, chosen, strict=True):
        img = nib.load(out / "images" / f"{sid}.nii.gz")
        image = np.asarray(img.dataobj, dtype=np.float32)
        label = np.asarray(nib.load(out / "labels" / f"{sid}.nii.gz").dataobj)
        inv = np.linalg.inv(img.affine)
        i_left, i_right = (int(round((inv @ [x, 0, 0, 1])[0])) for x in (-6.0, 6.0))
        j_cor = int(round((inv @ [0, 34.0, 0, 1])[1]))
        views = [(image[i_left], label[i_left], "x=-6 (L)"), (image[i_right], label[i_right], "x=+6 (R)"),
                 (image[:, j_cor], label[:, j_cor], "y=34")]
        for ax, (im, lab, title) in zip(row, views, strict=True):
            ax.imshow(im.T, origin="lower", cmap="gray")
            ax.imshow(np.ma.masked_equal(lab.T, 0), origin="lower", cmap="autumn", alpha=0.6, vmin=1, vmax=2)
            ax.set_title(f"{sid} {title} L={subjects[sid]['pcs_left']} R={subjects[sid]['pcs_right']}", fontsize=7)
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.03, hspace=0.2)
    path = atomic_write(out / "preview.png", lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    plt.close(fig)
    return path


def generate_cohort(
    output: str | Path, subjects: int = 24, seed: int = 0, spacing: float = 2.0, difficulty: float = 1.0,
    splits: dict[str, int] | None = None,
) -> Path:
    """Generate (or reuse) a synthetic PCS cohort in ``output``; return the path of its manifest.csv.

    ``splits`` gives the subjects of each split (``pretrain``, ``train``, ``val``, ``test``; then
    ``subjects`` is their sum); by default ~40/30/15/15% of ``subjects``. A subject's voxels depend on
    its index only, so a cohort resized or re-split reuses the files it already has.

    Raises StudyInputError for bad parameters or an output folder that holds someone else's manifest.
    """
    sizes = check_splits(splits) if splits else None
    if sizes:
        subjects = sum(sizes.values())
    params = CohortParams(subjects, seed, float(spacing), float(difficulty))
    params.validate()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise StudyInputError(f"--output {out}: is a file, not a folder; choose a folder for the cohort")
    meta_path, manifest = out / "cohort.json", out / "manifest.csv"
    if manifest.exists() and not meta_path.exists():
        raise StudyInputError(
            f"--output {out}: already holds a manifest.csv not written by the cohort generator (no cohort.json); "
            "choose an empty folder"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    except (OSError, ValueError):
        meta = {}
    sids = [f"sub-{i:03d}" for i in range(subjects)]
    sizes = sizes or split_sizes(subjects)
    splits = assign_splits(subjects, seed, sizes)
    good = _reusable(out, meta, params, sids, splits)
    graded = all("pcs3_left" in meta["subjects"][sid] for sid in good)  # else the manifest gains the pcs3 columns
    if len(good) == subjects and graded and manifest.exists() and (out / "preview.png").exists() \
            and meta.get("splits") == sizes:
        return manifest
    if meta.get("params") != asdict(params):  # a different cohort: drop its marker and leftover files
        meta_path.unlink(missing_ok=True)
        for old in set(meta.get("subjects", {})) - set(sids):
            for folder in ("images", "labels"):
                (out / folder / f"{old}.nii.gz").unlink(missing_ok=True)
        meta = {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    entries: dict[str, dict] = {}
    for index, (sid, split) in enumerate(zip(sids, splits, strict=True)):
        if sid in good:
            entries[sid] = entry = meta["subjects"][sid]
            if "pcs3_left" not in entry:  # a cohort written before the three-class grades: no voxel changes
                present = (entry["pcs_left"], entry["pcs_right"])
                entry["pcs3_left"], entry["pcs3_right"] = pcs_grades(params, index, present)
            continue
        image, label, affine = synthesize_subject(params, index)
        entry = {"pcs_left": int(np.any(label == 1)), "pcs_right": int(np.any(label == 2))}
        entry["pcs3_left"], entry["pcs3_right"] = pcs_grades(params, index, (entry["pcs_left"], entry["pcs_right"]))
        entry["image_sha256"] = _write_nifti(image, affine, out / "images" / f"{sid}.nii.gz")
        if split != "pretrain":
            entry["label_sha256"] = _write_nifti(label, affine, out / "labels" / f"{sid}.nii.gz")
        entries[sid] = entry
    atomic_write_text(manifest, _manifest_text(sids, splits, entries))
    write_preview(out, sids, splits, entries)
    atomic_write_text(meta_path, json.dumps({"params": asdict(params), "splits": sizes, "subjects": entries},
                                            indent=1, sort_keys=True))
    return manifest


def parse_splits(text: str) -> dict[str, int]:
    """``"pretrain=200,train=24,val=80,test=120"`` -> sizes (validated by :func:`check_splits`)."""
    sizes: dict[str, object] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise StudyInputError(f"--splits {text!r}: write NAME=COUNT pairs, e.g. "
                                  "pretrain=200,train=24,val=80,test=120") from None
    return check_splits(sizes)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = OneLineParser(prog="python -m study.cohort", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write the cohort into")
    parser.add_argument("--subjects", type=int, default=24, help="number of subjects (>= 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same voxels)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (2 -> 32^3, 4 -> 16^3)")
    parser.add_argument("--difficulty", type=float, default=1.0, help="0.5 easy, 1 default, 2 hard")
    parser.add_argument("--splits", help="subjects per split, e.g. pretrain=200,train=24,val=80,test=120 "
                        "(replaces --subjects; default ~40/30/15/15%% of --subjects)")

    def write(args) -> None:
        print(generate_cohort(args.output, args.subjects, args.seed, args.spacing, args.difficulty,
                              splits=parse_splits(args.splits) if args.splits else None))

    return run_command(parser, argv, write)


if __name__ == "__main__":
    sys.exit(main())
