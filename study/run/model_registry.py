"""The MLflow model registry: the best fine-tuned model of each cell, and loading one back.

A registered version's source is ``runs:/<run id>/model``: an artifact folder under the trial's own
MLflow run holding ``model.pt`` (the trained parameters, :mod:`trainables.finetune.storage`),
``body.pt`` (the pre-training checkpoint it was fine-tuned from, when there is one and it is small)
and ``model_info.json`` (cell, preprocessing spacing and input size, the score). The folder is
self-contained, so ``python -m study.predict --model NAME@best`` needs neither the study folder nor
the pre-training cache. Registering is idempotent: re-running the report reuses the version that
already points at the same run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainables import shared_storage
from trainables.errors import StudyInputError
from trainables.finetune.storage import pretrain_ref

ARTIFACT_DIR = "model"
INFO_FILE = "model_info.json"
ALIAS = "best"
MAX_BODY_BYTES = 256 * 2**20  # larger pre-training bodies are referenced by path, not copied


def registered_name(experiment: str, cell_id: str) -> str:
    """``pcs-<study>-<cell id>``, where the study is the MLflow experiment name without ``study-``."""
    study = experiment.removeprefix("study-")
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"pcs-{study}-{cell_id}")


def stage_model(model_path: str | Path, info: dict, folder: str | Path) -> Path:
    """Copy ``model.pt`` (+ its pre-training ``body.pt`` when small) and write ``model_info.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = shared_storage.fetch(model_path)  # this machine's copy when the study's storage is an object store
    shutil.copyfile(model_path, folder / "model.pt")
    ref = pretrain_ref(model_path)
    info = {**info, "pretrain_ref": ref, "body_included": False}
    body = shared_storage.find(ref)
    if body is not None and body.stat().st_size <= MAX_BODY_BYTES:
        shutil.copyfile(body, folder / "body.pt")
        info["body_included"] = True
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return folder


def register_best(client: MlflowClient, name: str, run_id: str, model_path: str | Path, info: dict,
                  tags: dict[str, str] | None = None) -> int:
    """Log the model folder under ``run_id`` (once) and point ``name@best`` at a version of it.

    Returns:
        The registered version number.
    """
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if not {"model.pt", INFO_FILE} <= logged:
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifacts(run_id, str(stage_model(model_path, info, tmp)), ARTIFACT_DIR)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags=tags or {}, description=f"best fine-tuned model of {name}")
    source = f"runs:/{run_id}/{ARTIFACT_DIR}"
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id and v.source == source]
    if versions:
        version = max(int(v.version) for v in versions)
    else:
        version = int(client.create_model_version(name, source=source, run_id=run_id, tags=tags or {}).version)
    client.set_registered_model_alias(name, ALIAS, str(version))
    return version


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def download_registered(spec: str, tracking_uri: str, folder: str | Path) -> Path:
    """Download the model folder of ``NAME[@ALIAS]`` (default alias ``best``, else the latest version)."""
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise StudyInputError(f"no MLflow database at {db} (tracking URI {tracking_uri}); check --tracking-uri")
    name, _, alias = spec.partition("@")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise StudyInputError(
            f"no registered model {name!r} at {tracking_uri}; registered models: {', '.join(known) or 'none'}"
        ) from None
    aliases = dict(model.aliases or {})
    if alias:
        if alias not in aliases:
            raise StudyInputError(f"registered model {name!r} has no alias {alias!r}; aliases: "
                                  f"{', '.join(sorted(aliases)) or 'none'}")
        version = client.get_model_version(name, str(aliases[alias]))
    elif ALIAS in aliases:
        version = client.get_model_version(name, str(aliases[ALIAS]))
    else:
        version = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    run_id, _, path = version.source.removeprefix("runs:/").partition("/")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr for errors
    local = client.download_artifacts(run_id or version.run_id, path or ARTIFACT_DIR, str(folder))
    return Path(local)


def load_model_folder(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from ``model.pt`` (a file, or a folder holding it) and read ``model_info.json``.

    The pre-training body comes from ``body.pt`` next to the model when present, else from the path
    recorded in the model file. Returns ``(model in eval mode, info)``; ``info`` is ``{}`` when there
    is no ``model_info.json``.
    """
    from trainables.finetune.storage import load_finetuned
    from trainables.pretrain.loop import load_checkpoint

    path = Path(path)
    model_file = path / "model.pt" if path.is_dir() else path
    if path.is_dir() and not model_file.is_file():
        raise StudyInputError(f"model {path} is a folder without a model.pt in it; give a trial's model.pt (or its "
                              "folder) or a registered model name")
    if not model_file.is_file():
        raise StudyInputError(f"no fine-tuned model at {model_file}; give a model.pt or a registered model name")
    info_file = model_file.parent / INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    try:
        ref = pretrain_ref(model_file)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise StudyInputError(f"cannot read fine-tuned model {model_file}: {' '.join(str(exc).split())[:200]}") from None
    body = None
    if ref is not None:
        local = model_file.parent / "body.pt"
        source = local if local.is_file() else shared_storage.find(ref)
        if source is None:
            raise StudyInputError(f"{model_file} needs its pre-training checkpoint {ref}, which does not exist")
        body = load_checkpoint(source)
    model = load_finetuned(model_file, body_state=body)
    return model.eval(), info
