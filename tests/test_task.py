"""The task as data: spec validation, every task x strategy x backbone from the registries, a K-class task's
metrics and statistics against an independent computation, a user's task spec on a cohort (label values that
are not 0..K-1, a volume-pooled target, flips), and the second built-in task (pcs3) end to end."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from study.evidence.stats import Cases, accuracy_of, auc_of, balanced_accuracy_of, dice_of, score_of
from trainables.backbones import BACKBONES, BackboneConfig, backbone_info, build_backbone
from trainables.data import DataConfig, load_split, make_loader, read_manifest
from trainables.engine import MultiTaskLoss, synthetic_batch
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES
from trainables.metrics import per_case_rows, task_metrics
from trainables.task import builtin_tasks, load_task, task_from_dict

ROOT = Path(__file__).resolve().parents[1]

# A task unlike PCS: label values 0/10/20, a three-class target over the whole volume and a binary one per
# half along the superior axis, segmentation Dice in the score with accuracy and AUC.
CUSTOM = {
    "name": "lesions",
    "segmentation": {"background": 0, "core": 10, "edge": 20},
    "targets": [
        {"name": "grade", "classes": ["low", "mid", "high"], "columns": ["grade"], "pooling": "volume"},
        {"name": "upper", "classes": ["no", "yes"], "columns": ["lower_side", "upper_side"], "pooling": "halves",
         "axis": 2, "regions": ["lower", "upper"]},
    ],
    "flips": True,
    "score": {"dice": 0.4, "accuracy": 0.3, "auc": 0.3},
}


def tasks():
    """Every built-in task (the YAML files in trainables/tasks) and the custom one above."""
    return {**{name: load_task(name) for name in builtin_tasks()}, "lesions": task_from_dict(CUSTOM, "custom")}


def test_builtin_tasks_are_pcs_and_pcs3_and_round_trip() -> None:
    assert {"pcs", "pcs3"} <= set(builtin_tasks())
    for name, task in tasks().items():
        assert task_from_dict(task.to_dict(), name) == task
    pcs = load_task("pcs")
    assert pcs.seg_channels == 3 and pcs.n_logits == 2 and pcs.columns == ("pcs_left", "pcs_right")
    assert load_task("pcs3").n_logits == 6  # two hemispheres x three classes


def _spec(**changes):
    raw = copy.deepcopy(CUSTOM)
    for key, value in changes.items():
        if key.startswith("target0_"):
            raw["targets"][0][key.removeprefix("target0_")] = value
        else:
            raw[key] = value
    return raw


BAD_SPECS = {
    "unknown key": (_spec(colour="red"), "unknown key(s) ['colour']"),
    "no background": (_spec(segmentation={"core": 1, "edge": 2}), "include 0"),
    "repeated value": (_spec(segmentation={"background": 0, "core": 1, "edge": 1}), "distinct"),
    "one class": (_spec(target0_classes=["only"]), "two or more distinct class names"),
    "halves with one column": (_spec(target0_pooling="halves"), "pooling halves has 2 region(s)"),
    "bad pooling": (_spec(target0_pooling="quarters"), "'quarters' is not one of volume, halves"),
    "segment not a class": (_spec(target0_segments=["tumour"]), "segments: give one foreground"),
    "score metric": (_spec(score={"dice": 0.5, "iou": 0.5}), "'iou' is not one of"),
    "score sum": (_spec(score={"dice": 0.5, "auc": 0.3}), "weights sum to 0.8"),
    "flips on a side target": (_spec(targets=[{"name": "side", "classes": ["a", "b"], "columns": ["l", "r"],
                                               "pooling": "halves", "axis": 0}]), "flip swaps the halves"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_task_spec_is_one_line_naming_the_file(case: str, tmp_path: Path) -> None:
    raw, problem = BAD_SPECS[case]
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyInputError) as info:
        load_task(path)
    message = str(info.value)
    assert str(path) in message and problem in message and "\n" not in message, message


def test_an_unknown_task_name_lists_the_builtin_ones() -> None:
    with pytest.raises(StudyInputError, match="not a built-in task \\(pcs, pcs3\\)"):
        load_task("pcs4")


COMBINATIONS = [(t, s, b) for t in sorted(tasks()) for s in STRATEGIES.names() for b in BACKBONES.names()]


@pytest.mark.parametrize(("task_name", "strategy", "backbone"), COMBINATIONS,
                         ids=["-".join(c) for c in COMBINATIONS])
def test_every_task_strategy_and_backbone_builds_and_gives_a_finite_loss(task_name, strategy, backbone) -> None:
    """The heads have the task's widths on every backbone under every strategy; the task's loss is finite."""
    task = tasks()[task_name]
    info = backbone_info(backbone)
    side = max(16, info.input_multiple)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(backbone, width=max(8, info.width_step)), task)
    spec = STRATEGIES.get(strategy)
    model = spec.apply(model, spec.make_config())
    batch = synthetic_batch(task, 2, (side,) * 3, "cpu")
    with torch.no_grad():
        out = model(batch["image"])
        loss = MultiTaskLoss(task=task)(out, batch)
    assert out["seg"].shape == (2, task.seg_channels, side, side, side)
    assert out["cls"].shape == (2, task.n_logits)
    assert torch.isfinite(loss["loss"])


def _k_class_outputs(seed: int = 0, subjects: int = 40):
    """Random outputs of the pcs3 task: segmentation logits, labels, classification logits and truths."""
    task = load_task("pcs3")
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 3, (subjects, 2), generator=g).float()
    logits = torch.randn(subjects, 6, generator=g)
    logits = logits + 2.0 * torch.nn.functional.one_hot(truth.long(), 3).reshape(subjects, 6)  # informative
    labels = torch.randint(0, 3, (subjects, 1, 8, 8, 8), generator=g)
    seg = torch.randn(subjects, 3, 8, 8, 8, generator=g) + 3.0 * torch.nn.functional.one_hot(
        labels[:, 0], 3).permute(0, 4, 1, 2, 3)
    return task, seg, labels, logits, truth


def test_k_class_metrics_rows_and_statistics_agree_with_sklearn() -> None:
    task, seg, labels, logits, truth = _k_class_outputs()
    metrics = task_metrics(seg, labels, logits, truth, 2.0, task)
    rows = per_case_rows([f"s{i:02d}" for i in range(len(truth))], seg, labels, logits, truth, 2.0, task)
    assert len(rows) == 2 * len(truth) and all(len(r["probabilities"]) == 3 for r in rows)
    y = truth.reshape(-1).numpy().astype(int)
    prob = torch.softmax(logits.reshape(-1, 3), dim=1).numpy()
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, prob.argmax(1)))
    assert metrics["accuracy"] == pytest.approx(float((prob.argmax(1) == y).mean()))
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"), abs=1e-6)
    assert metrics["score"] == pytest.approx((metrics["dice"] + metrics["balanced_accuracy"]) / 2)
    cases = Cases.from_rows(json.loads(json.dumps(rows)), task)  # what the report reads back from MLflow
    full = np.arange(len(cases.subjects))[None]
    for statistic, key in ((score_of, "score"), (dice_of, "dice"), (auc_of, "auc"),
                           (balanced_accuracy_of, "balanced_accuracy"), (accuracy_of, "accuracy")):
        assert statistic(cases, full)[0] == pytest.approx(metrics[key], abs=1e-6), key


def test_a_binary_task_keeps_the_pcs_score_and_rows() -> None:
    """The PCS task: one logit per hemisphere, rows with ``probability``, score (dice + (sens + spec) / 2) / 2."""
    task = load_task("pcs")
    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 2, (30, 2), generator=g).float()
    logits = torch.randn(30, 2, generator=g) + 1.5 * (2 * truth - 1)
    labels = torch.randint(0, 3, (30, 1, 8, 8, 8), generator=g)
    seg = torch.randn(30, 3, 8, 8, 8, generator=g)
    metrics = task_metrics(seg, labels, logits, truth, 2.0, task)
    assert metrics["balanced_accuracy"] == pytest.approx((metrics["sensitivity"] + metrics["specificity"]) / 2)
    rows = per_case_rows([f"s{i}" for i in range(30)], seg, labels, logits, truth, 2.0, task)
    assert {r["region"] for r in rows} == {"left", "right"} and all("probability" in r for r in rows)
    cases = Cases.from_rows(rows, task)
    assert score_of(cases, np.arange(30)[None])[0] == pytest.approx(metrics["score"], abs=1e-6)


def _custom_cohort(tiny_cohort: Path, folder: Path) -> Path:
    """The tiny cohort relabelled for the custom task: labels 1/2 -> 10/20, a grade and upper/lower columns,
    and the task spec beside the manifest."""
    import nibabel as nib

    shutil.copytree(tiny_cohort.parent, folder, ignore=shutil.ignore_patterns(".cache"))
    for path in (folder / "labels").glob("*.nii.gz"):
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.uint8) * 10
        nib.save(nib.Nifti1Image(data, img.affine), path)
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    for i, row in enumerate(rows):
        row.pop("sha256")
        labelled = row["split"] != "pretrain"
        row.update(grade=str(i % 3) if labelled else "", lower_side=str(i % 2) if labelled else "",
                   upper_side=str((i + 1) % 2) if labelled else "")
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "task.yaml").write_text(yaml.safe_dump(CUSTOM))
    return folder / "manifest.csv"


def test_a_cohort_with_its_own_task_spec(tiny_cohort: Path, tmp_path: Path) -> None:
    """Label values 10/20 become channels 1/2; the target columns become ``cls``; flips move image and label."""
    manifest = _custom_cohort(tiny_cohort, tmp_path / "cohort")
    task = load_task(manifest.parent / "task.yaml")
    records = read_manifest(manifest)  # the task.yaml beside the manifest is the default
    assert [r.targets for r in records if r.split == "train"][0] is not None
    cfg = DataConfig(manifest=str(manifest), spacing_mm=4.0, input_size=(16, 16, 16), roi="template",
                     task=task.to_dict())
    train = load_split(cfg, "train")
    assert set(torch.unique(train.labels).tolist()) <= {0, 1, 2} and train.labels.max() > 0
    assert train.cls.shape == (len(train), 3)
    expected = [[int(r.targets[k]) for k in range(3)] for r in records if r.split == "train"]
    assert train.cls.long().tolist() == expected
    assert train.flips
    loader = make_loader(train, batch_size=len(train), shuffle=False, seed=3, augment=True)
    flipped = next(iter(loader))
    for i in range(len(train)):  # every label follows its image: unflipped or flipped along axis 0
        same = torch.equal(flipped["label"][i], train.labels[i].long())
        mirrored = torch.equal(flipped["label"][i], train.labels[i].long().flip(1))
        assert same or mirrored
    pcs = DataConfig(manifest=str(manifest), spacing_mm=4.0, input_size=(16, 16, 16), roi="template")
    with pytest.raises(StudyInputError, match="outside \\{0,1,2\\} \\(task pcs"):
        load_split(pcs, "train")  # the PCS task refuses label values 10 and 20


def test_a_manifest_without_the_task_columns_names_them(tiny_cohort: Path) -> None:
    with pytest.raises(StudyInputError, match="lacks column\\(s\\) grade, lower_side, upper_side; required for "
                                              "task lesions"):
        read_manifest(tiny_cohort, task_from_dict(CUSTOM, "custom"))


def test_pcs3_columns_grade_the_embedded_grooves(tiny_cohort: Path) -> None:
    """pcs3 is absent exactly where pcs is, and present or prominent where pcs is present."""
    rows = [r for r in csv.DictReader(tiny_cohort.open()) if r["split"] != "pretrain"]
    for r in rows:
        for side in ("left", "right"):
            assert (r[f"pcs3_{side}"] == "0") == (r[f"pcs_{side}"] == "0"), r


@pytest.mark.slow
def test_the_pcs3_task_runs_end_to_end(tmp_path: Path) -> None:
    """``--task pcs3``: a study on the embedded cohort with three-class presence, its report's statistics equal
    the trial's test metrics, and ``predict`` names a class per hemisphere."""
    out = tmp_path / "pcs3"
    cmd = [sys.executable, "-m", "study.launch", "--grid", "smoke", "--task", "pcs3", "--methods", "none",
           "--strategies", "full", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "study.json").read_text())
    assert saved["task"]["name"] == "pcs3"
    report = json.loads((out / "report" / "report.json").read_text())
    (cell,) = report["cells"]
    estimate = cell["statistics"]["estimate"]
    assert math.isclose(estimate["score"], cell["best"]["test_score"], abs_tol=1e-6)
    if estimate["auc"] is not None:  # undefined (null) when a class is missing from a tiny test split
        assert math.isclose(estimate["auc"], cell["best"]["test_auc"], abs_tol=1e-6)
    model = next((out / "models").glob("*/model.pt"))
    image = next((out / "cohort" / "images").glob("*.nii.gz"))
    pred = subprocess.run([sys.executable, "-m", "study.predict", str(image), "--model", str(model),
                           "--output", str(tmp_path / "seg.nii.gz")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    lines = [line for line in pred.stdout.splitlines() if line.startswith("PCS3 presence")]
    assert len(lines) == 2 and all(any(c in line for c in ("absent (", "present (", "prominent (")) for line in lines)


def test_the_race_reads_a_k_class_tasks_rows() -> None:
    """The race after the search reads per-case rows through the study's task (three classes here)."""
    from study.evidence.racing import Race

    task, seg, labels, logits, truth = _k_class_outputs()
    ids = [f"s{i:02d}" for i in range(len(truth))]
    good = per_case_rows(ids, seg, labels, logits, truth, 2.0, task)
    poor = per_case_rows(ids, seg, labels, torch.zeros_like(logits), truth, 2.0, task)
    race = Race(max_trials=4, seed=0, task=task.to_dict())
    race.start({"a": good, "b": poor})
    assert race.status in ("racing", "resolved") and race.best == "a"
    assert "task" not in race.to_dict()  # the record stays small: the study keeps its task in study.json
