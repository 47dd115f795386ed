"""Shared fixtures: a tiny synthetic PCS cohort generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from study.cohort import generate_cohort

# 12 subjects at 4 mm -> 16^3 volumes; splits pretrain=4, train=4, val=2, test=2.
TINY_COHORT = {"subjects": 12, "seed": 0, "spacing": 4.0, "difficulty": 1.0}


@pytest.fixture(scope="session")
def tiny_cohort_params() -> dict:
    """The generate_cohort() arguments behind ``tiny_cohort`` (a copy; changing it changes nothing)."""
    return dict(TINY_COHORT)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the manifest.csv of a 12-subject, 16^3-voxel synthetic cohort, shared by the session.

    Treat it as read-only (load_split may add a ``.cache`` folder next to it); to corrupt or edit
    files use ``tiny_cohort_copy``.
    """
    return generate_cohort(tmp_path_factory.mktemp("tiny_cohort") / "cohort", **TINY_COHORT)


@pytest.fixture
def tiny_cohort_copy(tiny_cohort: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``tiny_cohort`` (without its cache); returns the copy's manifest path."""
    target = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, target, ignore=shutil.ignore_patterns(".cache"))
    return target / "manifest.csv"


def start_local_ray(**kwargs) -> None:
    """A real local Ray whose workers can import this folder's test modules (their trainables)."""
    import os

    import ray

    here = str(Path(__file__).resolve().parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])
    ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
