"""Preprocess a cohort once, before any trial: registration to the template in parallel, the quality checks,
and the report of labels that leave the study's box.

Locally the subjects are spread over a process pool (one process per core); on a Ray cluster
(``--address``) the registrations run as Ray tasks that receive the image's bytes (no shared file system
needed) and the driver stores what they return beside the manifest (``.registration/``), where every
node's copy of the cohort finds it. A progress bar counts the subjects.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainables import registration
from trainables.data import (
    DataConfig,
    SubjectRecord,
    _cache_key,
    cache_folder,
    cached_subject,
    roi_mode,
    store_registration,
    stored_registration,
)
from trainables.errors import StudyInputError
from trainables.task import default_task

# A pool process spends seconds importing torch and MONAI before its first subject (about 10 s on 2 busy
# cores): subjects go to a pool only when the ones timed in this process say the rest would take longer.
POOL_STARTUP_S = 10.0
_TIMED_SUBJECTS = 2


@dataclass
class SubjectSummary:
    """What the launcher reports of one preprocessed subject."""

    subject_id: str
    roi: str
    ncc: float
    kept: tuple[float, ...]  # per foreground class of the task


def _summarise(rec: SubjectRecord, cfg: DataConfig) -> SubjectSummary:
    out = cached_subject(rec, cfg, cache_folder(cfg))
    return SubjectSummary(rec.subject_id, roi_mode(rec, cfg), float(out.ncc), tuple(out.kept))  # type: ignore[arg-type]


def _register_bytes(data: bytes, suffix: str, where: str) -> dict:
    """A Ray task's work: register an image given as its file's bytes; returns the Registration as a dict."""
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image{suffix}"
        path.write_bytes(data)
        img = nib.load(path)
        image = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    return registration.register(image, affine, where=where).to_dict()


def _register_on_cluster(records: list[SubjectRecord], progress) -> None:
    """Registrations missing from ``.registration/`` computed as Ray tasks, stored by the driver."""
    import ray

    remote = ray.remote(num_cpus=1)(_register_bytes)
    pending = {}
    for rec in records:
        suffix = ".nii.gz" if rec.image.name.endswith(".gz") else ".nii"
        where = f"subject {rec.subject_id}: image {rec.image}"
        pending[remote.remote(rec.image.read_bytes(), suffix, where)] = rec
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        rec = pending.pop(done[0])
        try:
            store_registration(rec, registration.Registration.from_dict(ray.get(done[0])))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, StudyInputError):
                raise StudyInputError(str(cause)) from None
            raise
        progress.update(1)


def preprocess_cohort(cfg: DataConfig, records: list[SubjectRecord], workers: int | None = None,
                      cluster: bool = False) -> list[SubjectSummary]:
    """Preprocess (and cache) every subject; return one summary per subject, in ``records``' order.

    ``workers``: processes of the local pool (default: the machine's cores). The first subjects are
    preprocessed in this process and timed; the rest go to the pool only when they would take longer
    than a pool's start-up (:data:`POOL_STARTUP_S`): registering a whole-head scan takes seconds, resampling
    an embedded subject milliseconds. ``workers=1``: this process alone; ``workers`` > 1 given: the pool
    after the first subject. ``cluster``: run missing registrations as Ray tasks (Ray must be initialised).
    Raises StudyInputError at the first subject that fails (unreadable, a registration that fails its
    check), naming it.
    """
    from tqdm import tqdm

    cache = cache_folder(cfg)
    todo = [r for r in records if not (cache / f"{r.subject_id}-{_cache_key(r, cfg)}.npz").is_file()]
    bar = dict(file=sys.stdout, ascii=True, leave=True, dynamic_ncols=False, ncols=90, mininterval=1.0)
    if cluster:
        unregistered = [r for r in todo if roi_mode(r, cfg) == "register" and stored_registration(r) is None]
        if unregistered:
            with tqdm(total=len(unregistered), desc="registering (Ray tasks)", unit="subject", **bar) as progress:
                _register_on_cluster(unregistered, progress)
    chosen = workers is not None  # workers given: no timing decides
    workers = max(1, workers or os.cpu_count() or 1)
    done: dict[str, SubjectSummary] = {}  # what was just preprocessed, so that it is not read back
    if todo:
        what = "registering + resampling" if any(roi_mode(r, cfg) == "register" for r in todo) else "preprocessing"
        with tqdm(total=len(todo), desc=what, unit="subject", **bar) as progress:
            start, rest = time.perf_counter(), list(todo)
            while rest:
                n = len(todo) - len(rest)
                if workers > 1 and n >= (1 if chosen else _TIMED_SUBJECTS) and (
                        chosen or (time.perf_counter() - start) / n * len(rest) > POOL_STARTUP_S):
                    _pool(rest, cfg, min(workers, len(rest)), done, progress)
                    break
                rec = rest.pop(0)
                done[rec.subject_id] = _summarise(rec, cfg)
                progress.update(1)
    return [done.get(rec.subject_id) or _summarise(rec, cfg) for rec in records]


def _pool(records: list[SubjectRecord], cfg: DataConfig, workers: int, done: dict, progress) -> None:
    """Preprocess ``records`` in a pool of ``workers`` processes, into ``done``."""
    context = multiprocessing.get_context("spawn")  # spawn: the launcher's threads (MLflow, Ray) must not be forked
    with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [pool.submit(_summarise, rec, cfg) for rec in records]
        try:
            for job in futures.as_completed(jobs):
                summary = job.result()
                done[summary.subject_id] = summary
                progress.update(1)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise


def describe(summaries: list[SubjectSummary], classes: tuple[str, ...] | None = None) -> list[str]:
    """Lines for the launcher: the registration figures, and each label that lost more than 5% outside
    the box (subject, segmentation class of ``classes``, the task's foreground classes (default: the PCS
    task's), and share kept)."""
    classes = classes or default_task().foreground
    lines = []
    registered = [s for s in summaries if s.roi == "register"]
    if registered:
        worst = min(registered, key=lambda s: s.ncc)
        nccs = sorted(s.ncc for s in registered)
        lines.append(f"registered {len(registered)} subjects to the ICBM152 template: NCC inside the box median "
                     f"{nccs[len(nccs) // 2]:.2f}, lowest {worst.ncc:.2f} ({worst.subject_id}; refused below "
                     f"{registration.MIN_NCC})")
    for s in summaries:
        for name, kept in zip(classes, s.kept, strict=True):
            if kept < registration.MIN_KEPT:
                lines.append(f"warning: subject {s.subject_id} {name} label: {kept:.0%} of its voxels inside "
                             f"the study box ({1 - kept:.0%} lost); check its registration or use another --roi")
    return lines
