"""The project's one user-facing exception type."""

from __future__ import annotations


class StudyInputError(ValueError):
    """Bad input: the message says what is wrong, where (file, subject, parameter) and how to fix it.

    The CLI prints it on one line without a traceback and exits non-zero.
    """


def not_a_file(path: object) -> str:
    """Why ``path`` cannot be read as a file, for a message: it is a folder, or it does not exist."""
    from pathlib import Path

    return "is a folder, not a file" if Path(str(path)).is_dir() else "does not exist"
