"""``python -m study.roi_preview IMAGE --output roi.png``: the study's box on a registered T1.

Registers the image to the ICBM152 template as the study does (``--roi register``), resamples it into
MNI space around the head, and draws the box the networks see (MNI x -32..32, y -4..60, z 0..64 mm) on
a sagittal, a coronal and an axial slice through the box's centre, with the registration's figures in
the title. Use it to check a cohort's registrations by eye.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from study.cli import OneLineParser, run_command

_VIEW_MIN, _VIEW_MAX, _VIEW_MM = np.array([-80.0, -115.0, -60.0]), np.array([80.0, 85.0, 95.0]), 1.5


def render(image_path: str | Path, output: str | Path) -> Path:
    """Register ``image_path`` and write the preview PNG to ``output``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from scipy import ndimage

    from study.predict import check_image
    from trainables import registration

    image, affine = check_image(Path(image_path))
    reg = registration.register(image, affine, where=f"image {image_path}")
    shape = np.ceil((_VIEW_MAX - _VIEW_MIN) / _VIEW_MM).astype(int)
    view = np.diag([_VIEW_MM] * 3 + [1.0])
    view[:3, 3] = _VIEW_MIN
    to_source = np.linalg.inv(affine) @ reg.array @ view
    mni = ndimage.affine_transform(image.astype(np.float32), to_source[:3, :3], offset=to_source[:3, 3],
                                   output_shape=tuple(shape), order=1)
    low, high = registration.BOX_MIN, registration.BOX_MIN + registration.BOX_SIZE
    centre = (low + high) / 2
    index = np.round((centre - _VIEW_MIN) / _VIEW_MM).astype(int)
    panels = [("sagittal x = 0", mni[index[0]], (1, 2)), ("coronal y = 28", mni[:, index[1]], (0, 2)),
              ("axial z = 32", mni[:, :, index[2]], (0, 1))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, (title, plane, (a, b)) in zip(axes, panels, strict=True):
        extent = (_VIEW_MIN[a], _VIEW_MIN[a] + plane.shape[0] * _VIEW_MM, _VIEW_MIN[b], _VIEW_MIN[b] + plane.shape[1] * _VIEW_MM)
        ax.imshow(plane.T, origin="lower", cmap="gray", extent=extent)
        ax.add_patch(Rectangle((low[a], low[b]), high[a] - low[a], high[b] - low[b], fill=False, edgecolor="orange",
                               linewidth=2))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RAS"[a] + " (mm)", fontsize=8)
        ax.set_ylabel("RAS"[b] + " (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
    problem = reg.problem()
    verdict = f"refused: {problem}" if problem else "accepted"
    fig.suptitle(f"{Path(image_path).name} registered to ICBM152 (MNI): NCC {reg.ncc:.2f} inside the box, scales "
                 f"{', '.join(f'{s:.2f}' for s in reg.scales)}, {reg.seconds:.1f} s; {verdict}. Orange: the study's box",
                 fontsize=9)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=80)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = OneLineParser(prog="python -m study.roi_preview", description=__doc__.split("\n")[0])
    parser.add_argument("image", help="a 3D T1 NIfTI image (.nii or .nii.gz)")
    parser.add_argument("--output", default="roi.png", help="PNG to write (default roi.png)")
    return run_command(parser, argv, lambda args: print(render(args.image, args.output)))


if __name__ == "__main__":
    sys.exit(main())
