"""External checkpoints (``--pretrained NAME=PATH``, a grid file's ``pretrained:``) made ready before any trial.

For each (checkpoint, backbone) of the grid the weights are matched against the backbone's body
(:func:`trainables.pretrained.load_pretrained`), the loading report is printed, and the matched body is
written to the pre-training cache as ``external-<backbone>-w<width>-<sha256 of the file>/body.pt`` (with
``meta.json`` holding the report), where every fine-tuning trial of the cell loads it as it loads a
pre-training trial's checkpoint. A checkpoint that loads too little refuses the study, on one line,
before any trial starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from study.plan.grid import StudyPlan, pretrain_id
from trainables import shared_storage
from trainables.atomic import atomic_write
from trainables.backbones import BackboneConfig, build_backbone
from trainables.pretrained import MIN_FRACTION, checkpoint_file, file_sha256, load_pretrained

LOADER_VERSION = 1  # bump when matching changes, so that converted bodies are made again


def prepare_external(plan: StudyPlan, pretrain_cache: str, min_fraction: float = MIN_FRACTION,
                     log=print) -> dict[str, dict]:
    """Convert every external checkpoint of ``plan`` for each backbone it meets.

    Returns ``{"NAME__BACKBONE": {"path", "name", "file", "sha256", "loaded_fraction",
    "encoder_loaded_fraction", "report"}}``, ``path`` being the converted ``body.pt`` (a URI in an object
    store). Raises StudyInputError (one line) for a checkpoint below ``min_fraction`` of the encoder.
    """
    out: dict[str, dict] = {}
    digests: dict[str, str] = {}
    for name, backbone in plan.external_jobs():
        file = checkpoint_file(plan.pretrained[name])
        digest = digests.setdefault(str(file), file_sha256(file))
        cfg = BackboneConfig(backbone, plan.backbone_width(backbone))
        body, report = load_pretrained(file, build_backbone(cfg), min_fraction=min_fraction, sha256=digest)
        log(f"pretrained {name}: {report.summary()}")
        key = f"external-{backbone}-w{cfg.width}-v{LOADER_VERSION}-{digest[:16]}"
        meta = {"name": name, "file": str(file), "sha256": digest, "backbone": cfg.to_dict(),
                "report": report.to_dict()}
        path = _write(pretrain_cache, key, body, meta)
        out[pretrain_id(name, backbone)] = {"path": path, "name": name, "file": str(file), "sha256": digest,
                                      "loaded_fraction": report.loaded_fraction,
                                      "encoder_loaded_fraction": report.encoder_loaded_fraction,
                                      "report": report.to_dict()}
    return out


def _write(cache: str, key: str, body: dict, meta: dict) -> str:
    """``body.pt`` then ``meta.json`` (the completion marker) under ``cache/key``; an object store gets a
    local copy uploaded in the same order. Returns the path (or URI) of ``body.pt``."""
    remote = shared_storage.is_remote(cache)
    folder = (shared_storage.local_mirror(cache) if remote else Path(cache)) / key
    if not (folder / "meta.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "body.pt", lambda p: torch.save(body, p))
        atomic_write(folder / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    if not remote:
        return str(folder / "body.pt")
    target = shared_storage.join(cache, key)
    if not shared_storage.exists(shared_storage.join(target, "meta.json")):
        for name in ("body.pt", "meta.json"):
            shared_storage.put_file(folder / name, shared_storage.join(target, name))
    return shared_storage.join(target, "body.pt")
