"""``trainables/shared_storage.py`` and ``--storage s3://...`` against a real S3 API server (the ``s3`` fixture).

moto's server speaks the S3 REST protocol over HTTP on localhost; pyarrow (Ray Tune's storage layer and
``trainables/shared_storage.py``) talks to it exactly as to AWS or MinIO, through ``AWS_ENDPOINT_URL``. The smoke
study of ``tests/test_study_smoke.py`` runs with ``--storage s3://...`` against the same server.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import S3_BUCKET as BUCKET
from conftest import s3_keys as _keys

from trainables import shared_storage
from trainables.errors import StudyInputError


def test_put_fetch_and_tree_round_trip(s3, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    gz = gzip.compress(b"\x00\x01" * 1000)  # bytes kept as they are: no transparent (de)compression
    (src / "images" / "a.nii.gz").write_bytes(gz)
    (src / "manifest.csv").write_text("subject_id\n")
    (src / ".cache").mkdir()
    (src / ".cache" / "skip.npz").write_bytes(b"local only")
    uri = f"s3://{BUCKET}/unit/tree"
    shared_storage.put_tree(src, uri)
    assert sorted(_keys(s3, "unit/tree/")) == ["unit/tree/images/a.nii.gz", "unit/tree/manifest.csv"]

    local = shared_storage.fetch_tree(uri)
    assert (local / "images" / "a.nii.gz").read_bytes() == gz
    assert shared_storage.fetch(f"{uri}/images/a.nii.gz").read_bytes() == gz
    assert not (local / ".cache").exists()
    assert shared_storage.fetch_tree(uri) == local  # once per node

    one = shared_storage.fetch(f"{uri}/manifest.csv")
    assert one.read_text() == "subject_id\n" and shared_storage.exists(f"{uri}/manifest.csv")
    (src / "manifest.csv").write_text("subject_id,image\n")  # the object is rewritten: fetched again
    shared_storage.put_file(src / "manifest.csv", f"{uri}/manifest.csv")
    assert shared_storage.fetch(f"{uri}/manifest.csv").read_text() == "subject_id,image\n"
    assert not shared_storage.exists(f"{uri}/nothing.csv")
    with pytest.raises(StudyInputError, match="does not exist in the shared storage"):
        shared_storage.fetch(f"{uri}/nothing.csv")


def test_unreachable_bucket_is_refused_before_any_work(s3, tmp_path: Path, capsys) -> None:
    from study.launch import main

    out = tmp_path / "study"
    code = main(["--grid", "smoke", "--output", str(out), "--storage", "s3://no-such-bucket/x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--storage 's3://no-such-bucket/x': cannot write there" in err and "AWS_ENDPOINT_URL" in err
    assert "Traceback" not in err and not out.exists()
