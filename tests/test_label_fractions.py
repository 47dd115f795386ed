"""The label-efficiency axis: nested subsets of the labelled training subjects and every cell at each fraction.
A study over two fractions (with an external checkpoint) runs in tests/test_pretrained.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from study.plan.grid import select_plan
from trainables.data import DataConfig, SubjectRecord, labelled_count, labelled_subset, load_split
from trainables.errors import StudyInputError


def _records(n: int) -> list[SubjectRecord]:
    return [SubjectRecord(f"s{i:03d}", Path(f"/x/{i}.nii.gz"), None, (0, 0), "train") for i in range(n)]


def test_subsets_are_nested_the_same_at_a_seed_and_sized_by_the_fraction():
    records = _records(64)
    fractions = (0.1, 0.25, 0.5, 1.0)
    subsets = [{r.subject_id for r in labelled_subset(records, f, seed=3)} for f in fractions]
    assert [len(s) for s in subsets] == [7, 16, 32, 64] == [labelled_count(64, f) for f in fractions]
    assert all(a < b for a, b in zip(subsets, subsets[1:], strict=False))  # nested, strictly
    assert subsets[1] == {r.subject_id for r in labelled_subset(list(reversed(records)), 0.25, seed=3)}
    assert subsets[1] != {r.subject_id for r in labelled_subset(records, 0.25, seed=4)}
    assert labelled_count(4, 0.1) == 2  # at least one batch


def test_the_train_split_keeps_its_fraction_and_the_others_do_not(tiny_cohort):
    full = load_split(DataConfig(manifest=str(tiny_cohort), spacing_mm=4.0, input_size=(16, 16, 16), roi="template"),
                      "train")
    half_cfg = DataConfig(manifest=str(tiny_cohort), spacing_mm=4.0, input_size=(16, 16, 16), roi="template",
                          train_fraction=0.5, subset_seed=0)
    half = load_split(half_cfg, "train")
    assert set(half.subject_ids) < set(full.subject_ids) and len(half) == labelled_count(len(full), 0.5)
    assert load_split(half_cfg, "test").subject_ids == load_split(
        DataConfig(manifest=str(tiny_cohort), spacing_mm=4.0, input_size=(16, 16, 16), roi="template"), "test").subject_ids


def test_the_plan_runs_every_cell_at_each_fraction():
    plan = select_plan("smoke", strategies=["full"], label_fractions=[1.0, 0.25])
    assert plan.label_fractions == [0.25, 1.0]
    assert [c.id for c in plan.cells] == ["none__full__segresnet__f0.25", "reconstruction__full__segresnet__f0.25",
                                          "none__full__segresnet", "reconstruction__full__segresnet"]
    assert plan.pretrain_jobs() == [("reconstruction", "segresnet")]  # one pre-training serves every fraction
    with pytest.raises(StudyInputError, match=r"label fraction 1.5 must be a number in \(0, 1\]"):
        select_plan("smoke", label_fractions=[0.5, 1.5])
