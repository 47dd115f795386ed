"""Affine registration of a T1 image to the ICBM152 template, and the study's region of interest (ROI) box.

A whole-head scan in scanner space (any orientation, origin, voxel size, skull on) is registered to the
ICBM152 2009a T1 that ships with nilearn (skull-stripped; the metric is computed inside its brain mask,
so the scan's skull and neck do not pull the fit). The registration uses SimpleITK (ITK's
``ImageRegistrationMethod``: Mattes mutual information, a 12-parameter affine, a regular-step gradient
descent over two resolutions, 6 and 3 mm), chosen over antspyx because it runs a single registration
in about a second at this coarse resolution on one core, exposes the metric and every optimiser
setting, and its wheel is a sixth of antspyx's.

All geometry here is in RAS world millimetres (the NIfTI convention). SimpleITK only ever sees
axis-aligned images resampled by this module, so scanner affines with any axis order, flips or shear
are handled by one code path. The result is the 4x4 ``matrix`` that maps a template (MNI) point to
the subject's world point; resampling the subject into the box samples it at ``matrix @ p`` for each
box point ``p``, and a prediction goes back through the inverse.

Quality checks (the thresholds are the constants below): normalised cross-correlation with the template
inside the box and the template's brain, at least :data:`MIN_NCC`; the affine's scales (singular
values) within :data:`SCALE_RANGE`, and a positive determinant (a negative one is a left-right flip,
which would swap the hemispheres). Pure NumPy/SciPy/SimpleITK: never imports Ray or MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from trainables.errors import StudyInputError

REGISTRATION_VERSION = 1  # bump when the method or its settings change, to invalidate stored registrations
BOX_MIN = np.array([-32.0, -4.0, 0.0])  # the study's MNI box (mm): x in [-32,32), y in [-4,60), z in [0,64)
BOX_SIZE = 64.0
ROI_MODES = ("register", "template", "none")
MIN_NCC = 0.2  # normalised cross-correlation with the template inside the box, after registration
SCALE_RANGE = (0.67, 1.5)  # subject mm per template mm along the affine's principal axes
MIN_KEPT = 0.95  # a label losing more than 5% of its voxels outside the box is reported
PARTIAL_FOV_MM = 120.0  # a field of view narrower than this along any axis is taken as already cropped
_LEVELS_MM = (6.0, 3.0)  # registration resolutions, coarse to fine
_MARGIN_MM = 6.0  # template points this far inside a crop's edges are compared with it
_SEED = 20261130  # metric sampling seed: the same image gives the same registration


@dataclass
class Registration:
    """One subject's affine registration to the template and its quality figures.

    ``matrix``: 4x4 RAS mm, template (MNI) point -> subject world point. ``ncc``: normalised
    cross-correlation with the template inside the box and brain. ``scales``: singular values of the
    linear part. ``determinant``: of the linear part. ``init``: how the search started (``moments``:
    centres of mass aligned; ``header``: the image's own world coordinates). ``seconds``: wall time.
    """

    matrix: list
    ncc: float
    scales: list
    determinant: float
    init: str
    seconds: float
    version: int = REGISTRATION_VERSION

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Registration:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def problem(self) -> str | None:
        """Why this registration cannot be trusted (one phrase), or ``None``."""
        if not np.isfinite(self.ncc) or self.ncc < MIN_NCC:
            return f"similarity to the template NCC {self.ncc:.2f} < {MIN_NCC}"
        if self.determinant <= 0:
            return "the affine flips left and right (determinant < 0); check the image header's orientation"
        low, high = SCALE_RANGE
        if min(self.scales) < low or max(self.scales) > high:
            return f"affine scales {', '.join(f'{s:.2f}' for s in self.scales)} outside [{low}, {high}]"
        return None


def check(reg: Registration, where: str, advice: str) -> Registration:
    """``reg``, or :class:`StudyInputError` in one line: ``<where>: registration to the template failed its
    check: <problem>; <advice>``."""
    problem = reg.problem()
    if problem:
        raise StudyInputError(f"{where}: registration to the template failed its check: {problem}; {advice}")
    return reg


def identity() -> Registration:
    """The registration of an image already in template space (``--roi template``)."""
    return Registration(np.eye(4).tolist(), float("nan"), [1.0, 1.0, 1.0], 1.0, "template", 0.0)


def box_affine(spacing: float, size: tuple[int, int, int]) -> np.ndarray:
    """RAS voxel->world affine of a ``size`` grid at ``spacing`` mm centred on the study's MNI box."""
    centre = BOX_MIN + BOX_SIZE / 2
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - (np.asarray(size, dtype=np.float64) - 1) / 2 * spacing
    return affine


def _template_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise StudyInputError("nilearn is not installed; it ships the ICBM152 template (run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise StudyInputError(f"the ICBM152 template is missing from nilearn ({path}); reinstall nilearn")
    return path


@functools.lru_cache(maxsize=1)
def template_id() -> str:
    """Short sha256 of the template file: part of every stored registration's key."""
    return hashlib.sha256(_template_file().read_bytes()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def _template(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1, brain mask, affine) of the template on an axis-aligned grid at ``spacing`` mm."""
    import nibabel as nib

    img = nib.load(_template_file())
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    brain = ndimage.binary_fill_holes(t1 > 0.05 * t1.max())
    t1, affine = to_grid(t1, np.asarray(img.affine, dtype=np.float64), spacing)
    mask, _ = to_grid(brain.astype(np.float32), np.asarray(img.affine, dtype=np.float64), spacing)
    return t1, mask > 0.5, affine


def _block_mean(image: np.ndarray, affine: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Average blocks of voxels much finer than ``target`` mm (anti-aliasing before resampling)."""
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factors = np.maximum(1, np.floor(target / sizes / 1.5)).astype(int)
    if factors.max() == 1:
        return image, affine
    shape = np.asarray(image.shape) // factors
    trimmed = image[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = trimmed.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] * factors
    scaled[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2) + affine[:3, 3]
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32), scaled


def world_extent(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) RAS world corner of an image's field of view."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def to_grid(image: np.ndarray, affine: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image (any affine) onto the axis-aligned RAS grid at ``spacing`` mm covering its field
    of view; trilinear after block averaging. Returns (array, affine)."""
    image, affine = _block_mean(np.asarray(image, dtype=np.float32), affine, spacing)
    low, high = world_extent(image.shape, affine)
    shape = np.maximum(1, np.ceil((high - low) / spacing)).astype(int)
    grid = np.diag([spacing, spacing, spacing, 1.0])
    grid[:3, 3] = low + spacing / 2
    to_source = np.linalg.inv(affine) @ grid
    out = ndimage.affine_transform(image, to_source[:3, :3], offset=to_source[:3, 3], output_shape=tuple(shape),
                                   order=1, mode="constant", cval=0.0)
    return out.astype(np.float32), grid


def _sitk_image(array: np.ndarray, affine: np.ndarray):
    """An axis-aligned array (i, j, k along R, A, S) as a SimpleITK image in the same world mm."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(affine[i, i]) for i in range(3)])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    return image


def _box_mask(shape: tuple[int, ...], affine: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Voxels of an axis-aligned grid whose centres lie in the world box [low, high)."""
    axes = [affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape)]
    inside = [(a >= lo) & (a < hi) for a, lo, hi in zip(axes, low, high, strict=True)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


def _resolution(affine: np.ndarray) -> float:
    """Registration resolution for an image: 3 mm, or its own largest voxel size if coarser."""
    return float(max(_LEVELS_MM[-1], np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).max()))


def similarity(image: np.ndarray, affine: np.ndarray, matrix: np.ndarray) -> float:
    """Normalised cross-correlation of the subject (seen through ``matrix``) with the template, over the
    template's brain voxels inside the study box, at 3 mm (or the image's resolution, if coarser)."""
    level = _resolution(affine)
    t1, brain, grid = _template(level)
    region = brain & _box_mask(t1.shape, grid, BOX_MIN, BOX_MIN + BOX_SIZE)
    ijk = np.argwhere(region).T
    world = grid[:3, :3] @ ijk + grid[:3, 3:4]
    source, source_affine = _block_mean(np.asarray(image, dtype=np.float32), affine, level)
    voxel = np.linalg.inv(source_affine) @ matrix
    coords = voxel[:3, :3] @ world + voxel[:3, 3:4]
    inside = np.all((coords > -0.5) & (coords < np.asarray(source.shape)[:, None] - 0.5), axis=0)
    if inside.mean() < 0.5:
        return 0.0
    moving = ndimage.map_coordinates(source, coords[:, inside], order=1)
    fixed = t1[tuple(ijk[:, inside])]
    if moving.std() == 0:
        return 0.0
    return float(np.corrcoef(fixed, moving)[0, 1])


def register(image: np.ndarray, affine: np.ndarray, where: str = "image") -> Registration:
    """Affine registration of ``image`` (RAS world ``affine``) to the template; see the module docstring.

    Raises StudyInputError when the image cannot be registered at all (a slab thinner than 2 cm, or the
    optimiser fails); a registration that runs but fits badly comes back with its figures, for
    :meth:`Registration.problem` to judge.
    """
    import SimpleITK as sitk

    start = time.perf_counter()
    low, high = world_extent(image.shape, affine)
    extent = high - low
    if extent.min() < 20.0:
        raise StudyInputError(
            f"{where}: field of view {' x '.join(f'{e:.0f}' for e in extent)} mm is a slab, not a head; "
            "registration to the template needs a 3D T1 at least 2 cm thick along every axis"
        )
    partial = bool(extent.min() < PARTIAL_FOV_MM)
    level = _resolution(affine)
    fixed_t1, fixed_brain, fixed_affine = _template(level)
    if partial:  # already cropped near template space: only the template well inside the field of view counts
        fixed_brain = fixed_brain & _box_mask(fixed_t1.shape, fixed_affine, low + _MARGIN_MM, high - _MARGIN_MM)
    moving, moving_affine = to_grid(image, affine, level)
    fixed_img, moving_img = _sitk_image(fixed_t1, fixed_affine), _sitk_image(moving, moving_affine)
    mask = _sitk_image(fixed_brain.astype(np.float32), fixed_affine)
    transform = sitk.AffineTransform(3)
    if partial:
        transform.SetCenter([float(v) for v in (low + high) / 2])
        init = "header"
    else:
        transform = sitk.CenteredTransformInitializer(
            fixed_img, moving_img, transform, sitk.CenteredTransformInitializerFilter.MOMENTS)
        init = "moments"
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if partial:  # a crop has few template voxels: use them all
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.25, seed=_SEED)
    method.SetMetricFixedMask(sitk.Cast(mask, sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(  # a crop's metric is noisier: smaller, slower-shrinking steps
        learningRate=2.0 if partial else 4.0, minStep=0.01, numberOfIterations=300,
        relaxationFactor=0.8 if partial else 0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    if partial:  # a crop is too small for the coarse level
        method.SetShrinkFactorsPerLevel([1])
        method.SetSmoothingSigmasPerLevel([0.0])
    else:
        method.SetShrinkFactorsPerLevel([max(1, int(_LEVELS_MM[0] / level)), 1])
        method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(transform, inPlace=True)
    try:
        method.Execute(fixed_img, moving_img)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        reason = "the image and the template stopped overlapping" if "overlap" in text else text[-160:]
        raise StudyInputError(
            f"{where}: registration to the template failed ({reason}); check that it is a T1 image of a head, "
            "or use --roi template (already in MNI space) or --roi none (already cropped)"
        ) from None
    linear = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + translation - linear @ centre
    scales = np.linalg.svd(linear, compute_uv=False)
    ncc = similarity(image, affine, matrix)
    return Registration(matrix.tolist(), ncc, sorted(float(s) for s in scales), float(np.linalg.det(linear)), init,
                        time.perf_counter() - start)


def resample_box(array: np.ndarray, affine: np.ndarray, matrix: np.ndarray, spacing: float,
                 size: tuple[int, int, int], label: bool = False) -> np.ndarray:
    """The subject's ``array`` sampled on the study box (``size`` voxels at ``spacing`` mm) through the
    template->subject ``matrix``: trilinear after anti-aliasing for an image, nearest for a label."""
    box = box_affine(spacing, size)
    to_source = np.linalg.inv(affine) @ matrix @ box  # box voxel -> subject voxel
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij")).reshape(3, -1)
    reach = to_source[:3, :3] @ corners + to_source[:3, 3:4]
    lo = np.maximum(np.floor(reach.min(axis=1)).astype(int) - 3, 0)
    hi = np.minimum(np.ceil(reach.max(axis=1)).astype(int) + 4, np.asarray(array.shape))
    if np.any(hi <= lo):
        return np.zeros(size, dtype=np.uint8 if label else np.float32)
    region = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], dtype=np.float32)
    shift = np.eye(4)
    shift[:3, 3] = -lo
    to_region = shift @ to_source
    if label:
        out = ndimage.affine_transform(region, to_region[:3, :3], offset=to_region[:3, 3], output_shape=tuple(size),
                                       order=0, mode="constant", cval=0.0)
        return np.rint(out).astype(np.uint8)
    step = np.sqrt((to_source[:3, :3] ** 2).sum(axis=1))  # subject voxels per box voxel, per subject axis
    sigma = np.where(step > 1.2, 0.4 * step, 0.0)
    if sigma.any():
        region = ndimage.gaussian_filter(region, sigma)
    out = ndimage.affine_transform(region, to_region[:3, :3], offset=to_region[:3, 3], output_shape=tuple(size),
                                   order=3, mode="constant", cval=0.0)
    return out.astype(np.float32)


def fraction_kept(label: np.ndarray, affine: np.ndarray, matrix: np.ndarray, spacing: float,
                  size: tuple[int, int, int], value: int) -> float:
    """Share of a label's voxels (``label == value``) whose centres fall inside the study box."""
    ijk = np.argwhere(np.asarray(label) == value).T
    if ijk.size == 0:
        return 1.0
    box = box_affine(spacing, size)
    to_box = np.linalg.inv(matrix @ box) @ affine  # subject voxel -> box voxel
    coords = to_box[:3, :3] @ ijk + to_box[:3, 3:4]
    inside = np.all((coords >= -0.5) & (coords < np.asarray(size)[:, None] - 0.5), axis=0)
    return float(inside.mean())


def to_subject_grid(labels: np.ndarray, matrix: np.ndarray, spacing: float, shape: tuple[int, ...],
                    affine: np.ndarray) -> np.ndarray:
    """Labels on the study box -> the subject's own voxel grid (nearest neighbour; 0 outside the box)."""
    box = box_affine(spacing, labels.shape)
    to_box = np.linalg.inv(matrix @ box) @ affine  # subject voxel -> box voxel
    return ndimage.affine_transform(np.asarray(labels, dtype=np.uint8), to_box[:3, :3], offset=to_box[:3, 3],
                                    output_shape=tuple(shape), order=0, mode="constant", cval=0)
