"""Generate ``reference/cli/<command>.md``: every option of every ``python -m study.<command>``, read from the
command's own argparse parser (built here, never run)."""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import ROOT, cell, code, first_paragraph, prose, table, warn  # noqa: E402


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def commands() -> list[str]:
    """The modules of ``study/`` run as ``python -m study.<name>``: a ``main`` and an ``if __name__`` guard."""
    found = []
    for path in sorted((ROOT / "study").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if has_main and guarded:
            found.append(path.stem)
    return found


def parser_of(name: str) -> argparse.ArgumentParser:
    """The command's parser: its ``build_parser()`` where it has one, else the parser its ``main`` builds, caught
    when ``main`` asks it to parse (so nothing of the command runs)."""
    module = importlib.import_module(f"study.{name}")
    if hasattr(module, "build_parser"):
        return module.build_parser()
    original = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        module.main([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
    raise RuntimeError(f"study.{name}.main() built no argparse parser")


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help as ``--help`` prints it (``%(default)s`` and ``%%`` expanded)."""
    if not action.help:
        return ""
    try:
        return parser._get_formatter()._expand_help(action)  # the formatter ``--help`` uses
    except (TypeError, ValueError, KeyError):
        return action.help.replace("%%", "%")


def value_of(action: argparse.Action) -> str:
    """What the option takes: its choices, its metavar, its type, or nothing for a flag."""
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(code(c) for c in action.choices)
    if action.metavar:
        return code(action.metavar)
    kind = getattr(action.type, "__name__", None)
    return code(kind.upper() if kind else action.dest.upper())


def default_of(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return "&nbsp;"
    return code(repr(action.default) if isinstance(action.default, str) else action.default)


def option_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(action.option_strings) or action.dest
        text = help_text(parser, action)
        repeat = " (repeatable)" if isinstance(action, argparse._AppendAction) and "repeatable" not in text else ""
        rows.append([code(names), value_of(action), default_of(action), cell(text + repeat)])
    return rows


def page(name: str, parser: argparse.ArgumentParser) -> str:
    module = importlib.import_module(f"study.{name}")
    usage = parser.format_usage().strip().removeprefix("usage: ")
    text = [f"# `python -m study.{name}`\n", prose(first_paragraph(module.__doc__) or parser.description or ""), "",
            "```text", usage, "```", "",
            "Generated from the command's argparse parser at build time: this table is what `--help` says. "
            "A bad option or value stops the command with one `error:` line and exit status 2.", "",
            table(["option", "value", "default", "meaning"], option_rows(parser))]
    return "\n".join(text)


def main() -> None:
    names = commands()
    if "launch" not in names:
        warn("study.launch is not found as a command")
    index = ["# Commands\n", "Every command a user runs, with every option, generated from its parser.\n"]
    for name in names:
        try:
            parser = parser_of(name)
        except Exception as exc:  # a command whose parser cannot be built: say so, and fail the strict build
            warn(f"cannot build the parser of study.{name}: {exc!r}")
            continue
        with mkdocs_gen_files.open(f"reference/cli/{name}.md", "w") as f:
            f.write(page(name, parser))
        summary = first_paragraph(importlib.import_module(f"study.{name}").__doc__)
        index.append(f"- [`python -m study.{name}`]({name}.md): {prose(summary)}")
    with mkdocs_gen_files.open("reference/cli/index.md", "w") as f:
        f.write("\n".join(index) + "\n")


main()
