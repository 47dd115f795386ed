"""A smoke study end to end with the real engines: local Ray, Optuna journal, MLflow SQLite, NIfTI cohort,
and its shared state (Tune's, the cohort, checkpoints, models) in an object store: ``--storage s3://...``
against a local S3 API server (the ``s3`` fixture). Studies with a shared folder (the default) run in
test_report, test_resume, test_faults and test_cluster."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from conftest import S3_BUCKET, s3_keys

from study.launch import build_parser, run_study
from study.run.tracking import FINAL_METRICS
from trainables import shared_storage
from trainables.backbones import BackboneConfig, build_backbone, state_fingerprint
from trainables.finetune.storage import load_finetuned
from trainables.pretrain.loop import load_checkpoint

pytestmark = pytest.mark.slow


STORAGE = f"s3://{S3_BUCKET}/smoke"


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, s3):
    out = tmp_path_factory.mktemp("study") / "smoke"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # after s3: workers inherit AWS_*
    try:
        args = build_parser().parse_args(["--grid", "smoke", "--output", str(out), "--storage", STORAGE])
        outcome = run_study(args)
    finally:
        ray.shutdown()
    return outcome


def test_one_child_run_per_trial_with_named_metrics(smoke_study) -> None:
    trials = list(smoke_study.results)
    plan = smoke_study.plan
    assert len(plan.pretrain_jobs()) == 1  # reconstruction; `none` needs no pre-training job
    assert len(trials) == len(plan.pretrain_jobs()) + len(plan.cells) * plan.num_samples
    assert not [t for t in trials if t.error]
    runs = smoke_study.tracker.child_runs()
    parent_params = smoke_study.tracker.client.get_run(smoke_study.tracker.parent_run_id).data.params
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["trial_id"], []).append(r)
    assert sorted(by_trial) == sorted(t.metrics["trial_id"] for t in trials)
    assert all(len(v) == 1 for v in by_trial.values())
    finetune = [r for r in runs if r.data.tags["stage"] == "finetune"]
    assert len(finetune) == len(plan.cells) * plan.num_samples
    for r in finetune:
        assert r.info.status == "FINISHED"
        for key in FINAL_METRICS:
            assert key in r.data.metrics, (r.data.tags["cell"], key)
        for key in ("train.lr_encoder", "train.seed", "backbone.name", "strategy", "cell.pretrain", "code_version"):
            assert key in r.data.params, key
        assert r.data.params["code_version"] == parent_params["code_version"]
        for tag in ("pretrain", "strategy", "backbone", "cell"):
            assert tag in r.data.tags
    assert {r.data.tags["stage"] for r in runs} == {"pretrain", "finetune"}
    pre = [r for r in runs if r.data.tags["stage"] == "pretrain"]
    assert all("time_total_s" in r.data.metrics and "peak_memory_mb" in r.data.metrics for r in pre)
    parent = smoke_study.tracker.client.get_run(smoke_study.tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and "code_version" in parent.data.params


def _finetune_results(smoke_study, strategy: str, pretrain: str = "reconstruction"):
    return [t for t in smoke_study.results
            if t.config["stage"] == "finetune" and t.config["strategy"] == strategy
            and t.config["cell"]["pretrain"] == pretrain]


def test_finetuning_started_from_the_pretraining_checkpoint(smoke_study) -> None:
    """Each trial's run records the fingerprint of the body it started from, taken inside the trial."""
    runs = {r.data.tags["trial_id"]: r for r in smoke_study.tracker.child_runs()}
    checked = set()
    for trial in smoke_study.results:
        if trial.config["stage"] != "finetune":
            continue
        started = runs[trial.metrics["trial_id"]].data.tags["initial_body_sha256"]
        torch.manual_seed(trial.config["train"]["seed"])  # what a trial without pre-training starts from
        fresh = state_fingerprint(build_backbone(BackboneConfig(**trial.config["backbone"])).body_state_dict())
        ckpt = trial.config["pretrain_checkpoint"]
        if trial.config["cell"]["pretrain"] == "none":
            assert ckpt is None and started == fresh
        else:
            body = load_checkpoint(shared_storage.fetch(ckpt))
            assert started == state_fingerprint(body) != fresh  # the checkpoint, not a fresh init
        checked.add((trial.config["cell"]["pretrain"], trial.config["strategy"]))
    assert {("reconstruction", s) for s in ("full", "top", "lora")} <= checked


def test_frozen_weights_are_the_checkpoints(smoke_study) -> None:
    (trial,) = _finetune_results(smoke_study, "top")
    body = load_checkpoint(shared_storage.fetch(trial.config["pretrain_checkpoint"]))
    model_file = shared_storage.fetch(trial.metrics["model_path"])
    model = load_finetuned(model_file, body_state=body)
    state = model.state_dict()
    trained = set(torch.load(model_file, weights_only=False)["trained"])
    frozen = [k for k in body if k not in trained]
    assert frozen, "top must freeze some blocks"
    for k in frozen:  # frozen weights are exactly the checkpoint's
        assert torch.equal(state[k], body[k]), k


def test_top_and_lora_trained_only_what_they_should(smoke_study) -> None:
    (top,) = _finetune_results(smoke_study, "top")
    trained = set(torch.load(shared_storage.fetch(top.metrics["model_path"]), weights_only=False)["trained"])
    k = top.config["strategy_params"]["trainable_blocks"]
    model = build_backbone(BackboneConfig(**top.config["backbone"]))
    allowed = tuple(name + "." for name, _ in model.blocks()[-k:]) + ("seg_head.", "cls_head.")
    assert trained and all(n.startswith(allowed) for n in trained), sorted(trained)[:5]
    (lora,) = _finetune_results(smoke_study, "lora")
    trained = set(torch.load(shared_storage.fetch(lora.metrics["model_path"]), weights_only=False)["trained"])
    assert any("lora_" in n for n in trained)
    assert all("lora_" in n or n.startswith(("seg_head.", "cls_head.")) for n in trained), sorted(trained)[:5]
    assert lora.metrics["trainable_fraction"] < 0.5


def test_every_finetuning_run_has_its_per_case_table_and_it_recomputes_the_test_metrics(smoke_study) -> None:
    """``test_cases.json`` (an MLflow table): one row per test subject and hemisphere (region); the test Dice, AUC and
    score recomputed from it, independently of the trial's code, equal the logged metrics."""
    from sklearn.metrics import roc_auc_score

    client = smoke_study.tracker.client
    runs = [r for r in smoke_study.tracker.child_runs() if r.data.tags["stage"] == "finetune"]
    assert runs
    for run in runs:
        path = client.download_artifacts(run.info.run_id, "test_cases.json")
        table = json.loads(open(path).read())
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        test_subjects = {r["subject_id"] for r in rows}
        assert len(rows) == 2 * len(test_subjects) and {r["region"] for r in rows} == {"left", "right"}
        m = run.data.metrics
        dice = sum(r["dice"] for r in rows) / len(rows)
        assert dice == pytest.approx(m["test_dice"], abs=1e-6), run.data.tags["cell"]
        truth = [r["truth"] for r in rows]
        prob = [r["probability"] for r in rows]
        if 0 < sum(truth) < len(truth):
            assert roc_auc_score(truth, prob) == pytest.approx(m["test_auc"], abs=1e-6)
        pos = [p >= 0.5 for p, t in zip(prob, truth, strict=True) if t]
        neg = [p < 0.5 for p, t in zip(prob, truth, strict=True) if not t]
        balanced = ((sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)) / 2
        assert (dice + balanced) / 2 == pytest.approx(m["test_score"], abs=1e-6)


def test_study_folder_holds_journal_and_mlflow(smoke_study) -> None:
    out = smoke_study.output
    assert (out / "mlflow.db").exists() and (out / "optuna.journal").exists()
    saved = json.loads((out / "study.json").read_text())
    assert saved["parent_run_id"] == smoke_study.tracker.parent_run_id


def test_shared_state_went_to_the_object_store(smoke_study, s3) -> None:
    """Tune's state, the cohort (without its local cache), the pre-training checkpoint and every model."""
    prefix = STORAGE.split("/", 3)[3] + "/"
    keys = s3_keys(s3, prefix)
    cohort = [k for k in keys if k.startswith(f"{prefix}cohort/")]
    assert any(k.endswith("/manifest.csv") for k in cohort) and any("/images/" in k for k in cohort)
    assert not any("/.cache/" in k for k in cohort)
    bodies = [k for k in keys if k.startswith(f"{prefix}pretrain_cache/") and k.endswith("/body.pt")]
    assert len(bodies) == 1 and bodies[0].replace("body.pt", "meta.json") in keys
    models = {k.split("/")[2].rsplit("__", 1)[0] for k in keys if k.startswith(f"{prefix}models/")}
    assert models == {c.id for c in smoke_study.plan.cells}
    assert any(k.startswith(f"{prefix}tune/study/") for k in keys)  # Tune's own state went there too
    out = smoke_study.output
    assert not (out / "tune").exists() and not (out / "models").exists()  # nothing of it on the driver
    for trial in smoke_study.results:
        if trial.config["stage"] == "finetune":
            assert trial.config["data"]["manifest"].startswith(f"{STORAGE}/cohort/")
            assert trial.metrics["model_path"].startswith(f"{STORAGE}/models/")
            if trial.config["cell"]["pretrain"] != "none":
                assert trial.config["pretrain_checkpoint"] == f"s3://{S3_BUCKET}/{bodies[0]}"
    # the report registered the best model of each cell from the store's files
    assert (out / "report" / "report.html").is_file()
    client = smoke_study.tracker.client
    assert {m.name for m in client.search_registered_models()} and all(
        "best" in m.aliases for m in client.search_registered_models())


def test_default_output_is_runs_study_name(tmp_path, monkeypatch, capsys) -> None:
    from study.launch import main

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "g.yaml"
    grid.write_text("name: lora vs full\nbase: smoke\ncells:\n  - {pretrain: none, strategy: full}\n")
    for argv, folder in ((["--grid", "smoke"], "smoke"), (["--grid", str(grid)], "lora-vs-full")):
        (tmp_path / "runs" / folder).mkdir(parents=True)
        (tmp_path / "runs" / folder / "study.json").write_text("{}")  # an earlier study there: refused, untouched
        assert main(argv) == 2
        assert f"{tmp_path / 'runs' / folder} already holds a study" in capsys.readouterr().err
