"""``--storage s3://...``: the study's shared state in an object store, against a real S3 API server.

moto's server speaks the S3 REST protocol over HTTP on localhost; pyarrow (Ray Tune's storage layer and
``trainables/shared.py``) talks to it exactly as to AWS or MinIO, through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency: pip install -e '.[dev]'")

from trainables import shared  # noqa: E402
from trainables.errors import StudyInputError  # noqa: E402

BUCKET = "studies"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server with one bucket; AWS_* variables point every process (Ray workers too) at it."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "STUDY_NODE_CACHE": str(tmp_path_factory.mktemp("node_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_put_fetch_and_tree_round_trip(s3, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    gz = gzip.compress(b"\x00\x01" * 1000)  # bytes kept as they are: no transparent (de)compression
    (src / "images" / "a.nii.gz").write_bytes(gz)
    (src / "manifest.csv").write_text("subject_id\n")
    (src / ".cache").mkdir()
    (src / ".cache" / "skip.npz").write_bytes(b"local only")
    uri = f"s3://{BUCKET}/unit/tree"
    shared.put_tree(src, uri)
    assert sorted(_keys(s3, "unit/tree/")) == ["unit/tree/images/a.nii.gz", "unit/tree/manifest.csv"]

    local = shared.fetch_tree(uri)
    assert (local / "images" / "a.nii.gz").read_bytes() == gz
    assert shared.fetch(f"{uri}/images/a.nii.gz").read_bytes() == gz
    assert not (local / ".cache").exists()
    assert shared.fetch_tree(uri) == local  # once per node

    one = shared.fetch(f"{uri}/manifest.csv")
    assert one.read_text() == "subject_id\n" and shared.exists(f"{uri}/manifest.csv")
    (src / "manifest.csv").write_text("subject_id,image\n")  # the object is rewritten: fetched again
    shared.put_file(src / "manifest.csv", f"{uri}/manifest.csv")
    assert shared.fetch(f"{uri}/manifest.csv").read_text() == "subject_id,image\n"
    assert not shared.exists(f"{uri}/nothing.csv")
    with pytest.raises(StudyInputError, match="does not exist in the shared storage"):
        shared.fetch(f"{uri}/nothing.csv")


def test_unreachable_bucket_is_refused_before_any_work(s3, tmp_path: Path, capsys) -> None:
    from study.launch import main

    out = tmp_path / "study"
    code = main(["--grid", "smoke", "--output", str(out), "--storage", "s3://no-such-bucket/x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--storage 's3://no-such-bucket/x': cannot write there" in err and "AWS_ENDPOINT_URL" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_smoke_study_with_object_storage(s3, tmp_path: Path) -> None:
    import mlflow
    import ray

    from study.launch import build_parser, run_study
    from study.model_registry import load_model_folder

    out = tmp_path / "study"
    prefix = "run1"
    args = build_parser().parse_args(["--grid", "smoke", "--methods", "reconstruction", "--strategies", "full",
                                      "--output", str(out), "--storage", f"s3://{BUCKET}/{prefix}"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_study(args)
    finally:
        ray.shutdown()
    assert outcome.results.num_errors == 0

    keys = _keys(s3, f"{prefix}/")
    cohort = [k for k in keys if k.startswith(f"{prefix}/cohort/")]
    assert any(k.endswith("/manifest.csv") for k in cohort) and any("/images/" in k for k in cohort)
    assert not any("/.cache/" in k for k in cohort)
    bodies = [k for k in keys if k.startswith(f"{prefix}/pretrain_cache/") and k.endswith("/body.pt")]
    assert len(bodies) == 1 and bodies[0].replace("body.pt", "meta.json") in keys
    models = sorted(k for k in keys if k.startswith(f"{prefix}/models/") and k.endswith("/model.pt"))
    assert [k.split("/")[2].rsplit("__", 1)[0] for k in models] == ["reconstruction__full__segresnet"]
    assert any(k.startswith(f"{prefix}/tune/study/") for k in keys)  # Tune's own state went there too
    assert not (out / "tune").exists() and not (out / "models").exists()

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([outcome.tracker.experiment_id],
                              "tags.stage = 'finetune'")
    assert len(runs) == 1 and all(r.info.status == "FINISHED" for r in runs)
    by_cell = {r.data.tags["cell"]: r for r in runs}
    recon = by_cell["reconstruction__full__segresnet"]
    assert recon.data.params["pretrain_checkpoint"] == f"s3://{BUCKET}/{bodies[0]}"
    assert recon.data.params["data.manifest"].startswith(f"s3://{BUCKET}/{prefix}/cohort/")

    # The report registered the best model of each cell; rebuilding it from the store's files works.
    model, _ = load_model_folder(shared.fetch(f"s3://{BUCKET}/{models[0]}"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "report" / "report.html").is_file()
