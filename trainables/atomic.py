"""Atomic file writes: through a unique temporary name in the same folder, then ``os.replace``, so a
reader never sees a half-written file (cohort files, caches, checkpoints, reports)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, then move ``tmp`` onto ``path``; the temporary file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _finite(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON's ``null``), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(data: object) -> str:
    """Strict JSON (RFC 8259): missing or undefined numbers are ``null``, never ``NaN`` or ``Infinity``,
    which a browser's ``JSON.parse`` and ``jq`` reject (``report.json``, ``race.json``)."""
    return json.dumps(_finite(json.loads(json.dumps(data, default=str))), indent=2, allow_nan=False)
