"""The project's one user-facing exception type."""

from __future__ import annotations


class StudyInputError(ValueError):
    """Bad input: the message says what is wrong, where (file, subject, parameter) and how to fix it.

    The CLI prints it on one line without a traceback and exits non-zero.
    """
