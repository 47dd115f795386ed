"""What every command (``python -m study.<command>``) does alike: bad arguments and bad input are one
``error:`` line on stderr and exit status 2, never a usage dump or a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from trainables.errors import StudyInputError


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`StudyInputError` (one line, pointing at ``--help``)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise StudyInputError(f"{message} (see {self.prog} --help)")


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None,
                action: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse ``argv`` and run ``action(args)``; returns its exit status (0 when it returns None), or 2 after
    printing a :class:`StudyInputError` as one ``error:`` line."""
    try:
        return action(parser.parse_args(argv)) or 0
    except StudyInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
