"""``python -m study.predict``: segment one T1 image and classify it, for the model's task (the PCS task:
the PCS per hemisphere and its presence).

Examples::

    python -m study.predict --model pcs-smoke-smoke-none__full__segresnet@best \\
        --tracking-uri sqlite:///runs/smoke/mlflow.db IMAGE.nii.gz --output pcs.nii.gz
    python -m study.predict --model runs/smoke/models/none__full__segresnet__1/model.pt IMAGE.nii.gz

The image is preprocessed exactly as in training (``trainables.data``): with the model's region of
interest ``register`` (the default since registration exists) it is registered to the ICBM152
template, resampled into the study's MNI box at the model's voxel spacing and z-scored; the
segmentation (the task's label values: PCS 0 background, 1 left PCS, 2 right PCS) goes back through the inverse transform,
nearest-neighbour, onto the input image's own voxel grid, so the output has the input's shape and
affine. ``template`` takes the box by the image's world coordinates; ``none`` (models of studies from
before registration) reorients, resamples and crops the centre. The model's spacing, input size and
roi come from ``model_info.json`` next to the model (registered models have it) or from the
``study.json`` of the study folder holding it; ``--roi`` overrides the roi.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.cli import OneLineParser, run_command
from trainables.errors import StudyInputError, not_a_file
from trainables.registration import MIN_NCC, ROI_MODES


@dataclass
class Prediction:
    """The segmentation on the input's grid (the task's label values), the input's affine, and per target
    and region the class probabilities (``classes[target][region]``, in the task's class order)."""

    segmentation: np.ndarray
    affine: np.ndarray
    classes: dict[str, dict[str, list[float]]]
    registration: object = None  # trainables.registration.Registration, with roi register

    @property
    def probabilities(self) -> tuple[float, ...]:
        """Per (target, region) in the task's order, the probability of any class but the first (the PCS
        task: P(present) [left, right])."""
        return tuple(1.0 - p[0] for regions in self.classes.values() for p in regions.values())


def _geometry_from_study(model_file: Path) -> dict:
    """Spacing and input size from the ``study.json`` of a study folder that holds ``model_file``."""
    for folder in model_file.resolve().parents:
        study = folder / "study.json"
        if study.is_file():
            saved = json.loads(study.read_text())
            plan = saved.get("plan", {})
            return {"spacing_mm": plan.get("spacing_mm"), "input_size": plan.get("input_size"),
                    "roi": saved.get("args", {}).get("roi") or "none"}
    return {}


def load_model(spec: str, tracking_uri: str | None, workdir: str | Path):
    """``(model, info)`` from a ``model.pt`` path (or its folder) or a registered ``NAME[@ALIAS]``."""
    from study.run.model_registry import download_registered, load_model_folder

    path = Path(spec)
    if path.exists():
        model, info = load_model_folder(path)
        if not info.get("spacing_mm") or not info.get("input_size") or not info.get("roi"):
            info = {**_geometry_from_study(path), **{k: v for k, v in info.items() if v}}
    elif spec.endswith((".pt", ".pth")) or os.sep in spec:
        raise StudyInputError(f"model file {spec} does not exist; give a model.pt path or a registered model name")
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise StudyInputError(f"--model {spec!r} is not a file, so it names a registered model: give "
                                  "--tracking-uri (e.g. sqlite:///runs/smoke/mlflow.db) or set MLFLOW_TRACKING_URI")
        model, info = load_model_folder(download_registered(spec, uri, workdir))
    if not info.get("spacing_mm") or not info.get("input_size"):
        raise StudyInputError(f"cannot tell the voxel spacing and input size of model {spec}: no model_info.json "
                              "next to it and no study.json above it; use a registered model or a study's model.pt")
    return model, info


def check_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Open and check one image like a training subject (readable NIfTI, 3D, finite, not constant)."""
    from trainables.data import SubjectRecord, load_checked

    if not path.is_file():
        raise StudyInputError(f"image {path} {not_a_file(path)}; give a 3D NIfTI (.nii or .nii.gz) T1 image")
    try:
        image, affine, _ = load_checked(SubjectRecord("input", path, None, None, "test"))
    except StudyInputError as exc:
        raise StudyInputError(str(exc).removeprefix("subject input: ")) from None
    if min(image.shape) < 4:
        raise StudyInputError(f"image {path} has shape {image.shape}: a 2D slice or a thin slab, not a 3D T1 "
                              "volume; give the whole 3D image")
    return image, affine


def network_affine(shape: tuple[int, ...], affine: np.ndarray, cfg) -> np.ndarray:
    """Voxel -> world affine of the network's input grid for an image of ``shape`` and ``affine``.

    The geometric steps of the training preprocessing (RAS, ``cfg.spacing_mm``, crop/pad to
    ``cfg.input_size``), run lazily by MONAI: only the metadata is computed, no voxel is resampled.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    grid = MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(affine, dtype=torch.float64))
    for step in (Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=True),
                 Spacing(pixdim=(cfg.spacing_mm,) * 3, lazy=True),
                 ResizeWithPadOrCrop(spatial_size=cfg.input_size, lazy=True)):
        grid = step(grid)
    if tuple(grid.peek_pending_shape()) != tuple(cfg.input_size):
        raise RuntimeError(f"network grid {grid.peek_pending_shape()} is not the input size {cfg.input_size}")
    return np.asarray(grid.peek_pending_affine(), dtype=np.float64)


def to_input_grid(labels: np.ndarray, net_affine: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Labels on the network grid -> the input image's grid (nearest neighbour; 0 outside the crop)."""
    from scipy import ndimage

    to_net = np.linalg.inv(net_affine) @ affine  # input voxel -> network voxel
    return ndimage.affine_transform(labels.astype(np.uint8), to_net[:3, :3], offset=to_net[:3, 3],
                                    output_shape=tuple(shape), order=0, mode="constant", cval=0)


def predict_image(model, image_path: str | Path, spacing_mm: float, input_size: list[int],
                  roi: str = "register") -> Prediction:
    """Run ``model`` on one NIfTI image; the segmentation comes back on the image's own grid.

    Raises StudyInputError when the registration to the template fails its quality check."""
    import torch

    from trainables import registration
    from trainables.backbones import task_of
    from trainables.data import DataConfig, SubjectRecord, preprocess_subject
    from trainables.metrics import probabilities

    path = Path(image_path)
    image, affine = check_image(path)
    task = task_of(model)
    cfg = DataConfig(manifest=str(path), spacing_mm=float(spacing_mm), input_size=tuple(input_size), roi=roi,
                     task=task.to_dict())
    reg = None
    if roi == "register":  # the training path (trainables.data) with the registration computed here, not stored
        reg = registration.check(registration.register(image, affine, where=f"image {path}"), f"image {path}",
                                 "is it a whole-head T1? (--roi template for images already in MNI space)")
    x = preprocess_subject(SubjectRecord("input", path, None, None, "test"), cfg, reg).image
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)[None].float())
    labels = np.asarray(task.label_values, dtype=np.uint8)[out["seg"][0].argmax(0).numpy()]  # channel -> value
    logits = task.split_logits(out["cls"].float())
    classes = {t.name: {region: probabilities(logits[t.name][0, j:j + 1], t)[0].tolist()
                        for j, region in enumerate(t.regions)} for t in task.targets}
    if roi == "none":
        seg = to_input_grid(labels, network_affine(image.shape, affine, cfg), affine, image.shape)
    else:
        matrix = reg.array if reg is not None else np.eye(4)
        seg = registration.to_subject_grid(labels, matrix, cfg.spacing_mm, image.shape, affine)
    return Prediction(seg, affine, classes, reg)


def write_segmentation(pred: Prediction, image_path: str | Path, output: str | Path) -> Path:
    """Save the segmentation as NIfTI with the input image's affine and header geometry."""
    import nibabel as nib

    source = nib.load(str(image_path))
    header = source.header.copy() if isinstance(source, nib.Nifti1Image) else None
    img = nib.Nifti1Image(pred.segmentation, pred.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(output))
    return output


def class_lines(pred: Prediction, task) -> list[str]:
    """What ``predict`` prints per target: a binary target's probability per region (``PCS presence
    probability: left 0.912, right 0.034``); a K-class target's called class and probabilities per region."""
    lines = []
    for t in task.targets:
        regions = pred.classes[t.name]
        if t.binary:
            lines.append(f"{task.name.upper()} {t.name} probability: "
                         + ", ".join(f"{r} {p[1]:.3f}" for r, p in regions.items()))
        else:
            for r, p in regions.items():
                called = t.classes[int(np.argmax(p))]
                lines.append(f"{task.name.upper()} {t.name} {r}: {called} ("
                             + ", ".join(f"{c} {v:.3f}" for c, v in zip(t.classes, p, strict=True)) + ")")
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = OneLineParser(prog="python -m study.predict", description=__doc__.split("\n")[0])
    parser.add_argument("image", help="a 3D T1 NIfTI image (.nii or .nii.gz)")
    parser.add_argument("--model", required=True, help="registered model NAME[@ALIAS] (default alias best) "
                        "or the path of a fine-tuned model.pt")
    parser.add_argument("--output", help="segmentation to write (default: <image>_<task>.nii.gz next to the image)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of the registry (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--roi", choices=ROI_MODES, default=None,
                        help="how the image reaches the model's box (default: as the model was trained)")
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    def predict(args) -> None:
        from trainables.backbones import task_of

        image = Path(args.image)
        check_image(image)  # fail fast, before loading a model
        with tempfile.TemporaryDirectory() as tmp:
            model, info = load_model(args.model, args.tracking_uri, tmp)
        pred = predict_image(model, image, info["spacing_mm"], info["input_size"],
                             roi=args.roi or info.get("roi") or "none")
        task = task_of(model)
        name = image.name.removesuffix(".gz").removesuffix(".nii")
        out = write_segmentation(pred, image, args.output or image.with_name(f"{name}_{task.name}.nii.gz"))
        if pred.registration is not None:
            reg = pred.registration
            print(f"registration to the ICBM152 template: NCC {reg.ncc:.2f} inside the box (refused below "
                  f"{MIN_NCC}), scales {', '.join(f'{v:.2f}' for v in reg.scales)}, {reg.seconds:.1f} s")
        for line in class_lines(pred, task):
            print(line)
        print(f"segmentation: {out}")

    return run_command(parser, argv, predict)


if __name__ == "__main__":
    sys.exit(main())
