"""The label-efficiency axis: nested subsets of the labelled training subjects, every cell at each fraction,
runs tagged, and the report's curve and verdict over the fractions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.grid import select_plan
from trainables.data import DataConfig, SubjectRecord, labelled_count, labelled_subset, load_split
from trainables.errors import StudyInputError

REPO = Path(__file__).resolve().parents[1]


def _records(n: int) -> list[SubjectRecord]:
    return [SubjectRecord(f"s{i:03d}", Path(f"/x/{i}.nii.gz"), None, 0, 0, "train") for i in range(n)]


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


def test_a_study_with_two_fractions_tags_its_runs_and_draws_one_point_per_fraction(tmp_path):
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "study.launch", "--grid", "smoke", "--strategies", "full", "--label-fractions",
            "0.5,1.0", "--output", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study-smoke-study")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "finetune"]
    subjects = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        fraction = float(tags["fraction"])
        assert params["data.train_fraction"] == str(fraction) and tags["cell"].endswith("__f0.5") == (fraction == 0.5)
        subjects.setdefault(fraction, set()).add(tags["train_subjects"])
        assert int(params["labelled_subjects"]) == len(tags["train_subjects"].split(","))
    assert set(subjects) == {0.5, 1.0} and all(len(s) == 1 for s in subjects.values())  # same subjects per fraction
    half, full = (set(next(iter(subjects[f])).split(",")) for f in (0.5, 1.0))
    assert half < full and len(half) == 2 and len(full) == 4

    from study.report import compare_cells, label_efficiency, load_study
    from study.verdict import label_verdict

    study = load_study(out)
    comparison = compare_cells(study)
    curves = label_efficiency(study, comparison)
    assert set(curves) == {("full", "segresnet")}
    assert {m: [p[0] for p in pts] for m, pts in curves[("full", "segresnet")].items()} == {
        "none": [2.0, 4.0], "reconstruction": [2.0, 4.0]}
    lines = label_verdict(study.cells, comparison)
    assert lines and all(line.startswith("Label efficiency: ") for line in lines)
    report = (out / "report" / "report.md").read_text()
    assert "plots/label_efficiency.png" in report and lines[-1] in report
