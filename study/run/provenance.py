"""Which code produced a result: the git commit, marked ``-dirty`` when tracked files have local changes.

Imports neither Ray nor MLflow, so the benchmarks can use it on a GPU machine that has neither.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_version(ignore: tuple[str, ...] = ()) -> str:
    """``<short commit>`` or ``<short commit>-dirty``; ``unknown`` outside a git checkout.

    ``ignore``: paths (relative to the repository root) whose local changes do not count, e.g. earlier
    benchmark results.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in ignore))
        return (rev + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
