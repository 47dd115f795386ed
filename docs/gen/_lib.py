"""Helpers shared by the scripts that generate the documentation's reference pages from the code.

The scripts run inside ``mkdocs build`` (mkdocs-gen-files); they import the project, never start Ray and never
download anything. Anything they cannot read is reported with ``warn``, which fails a strict build.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import logging
import math
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("mkdocs.plugins.pcs_reference")


def warn(message: str) -> None:
    """A warning in mkdocs' log: ``mkdocs build --strict`` fails on it."""
    log.warning("reference generator: %s", message)


_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|obj|exc):`~?([^`]+)`")
_CODE_SPAN = re.compile(r"(``[^`]+``|`[^`]+`)")


def prose(value: object) -> str:
    """Docstring or help text as one line of Markdown: Sphinx roles become code, ``<`` and ``>`` outside code are
    escaped (so ``<output>`` is shown, not taken for an HTML tag)."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", " ".join(str(value).split()))
    parts = _CODE_SPAN.split(text)
    return "".join(p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                   for i, p in enumerate(parts))


def cell(value: object) -> str:
    """Text for one Markdown table cell: one line of prose, pipes escaped."""
    text = prose(value)
    return text.replace("|", "\\|") if text else "&nbsp;"


def code(value: object) -> str:
    """``value`` as inline code for a table cell (empty stays empty)."""
    text = " ".join(str(value).split())
    if not text:
        return "&nbsp;"
    if "|" in text:  # a pipe in a table's code span: raw HTML, since Markdown would show the escaping backslash
        return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; every cell is already formatted (``cell`` / ``code``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value: object) -> str:
    """A measured value for a table: floats to 4 significant digits, the rest as JSON would show them."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line ('' without one)."""
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def docstring_args(doc: str | None) -> dict[str, str]:
    """``name -> help`` from a docstring's ``Args:`` section (Google style; ``a, b: text`` names several)."""
    out: dict[str, str] = {}
    if not doc:
        return out
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Attributes:"))
    except StopIteration:
        return out
    names: list[str] = []
    body = lines[start + 1:]
    indent = next((len(line) - len(line.lstrip()) for line in body if line.strip()), 0)
    for line in body:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth < indent or indent == 0:
            break
        entry = re.match(r"^([A-Za-z_][\w, ]*?)\s*(?:\([^)]*\))?:\s+(.*)$", line.strip())
        if depth == indent and entry:
            names = [n.strip() for n in entry.group(1).split(",") if n.strip()]
            for name in names:
                out[name] = entry.group(2).strip()
        elif depth > indent and names:
            for name in names:
                out[name] += " " + line.strip()
        else:
            break
    return out


def field_comments(cls: type) -> dict[str, str]:
    """``field -> trailing comment`` of a dataclass's field lines in its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = re.match(r"^\s{4}([a-z_][\w]*)\s*:\s*[^#]*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def field_default(f: dataclasses.Field) -> str:
    """A dataclass field's default, as Python writes it ('required' without one)."""
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def default_cell(f: dataclasses.Field) -> str:
    """A field's default for a table cell: code, or the word *required*."""
    default = field_default(f)
    return "required" if default == "required" else code(default)


def field_rows(cls: type, skip: set[str] | frozenset[str] = frozenset()) -> list[list[str]]:
    """``[name, type, default, help]`` per field of a dataclass: the help from the field's ``metadata['help']``,
    else the class docstring's ``Args:``, else the comment on the field's line."""
    args, comments = docstring_args(cls.__doc__), field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help") or args.get(f.name) or comments.get(f.name) or ""
        rows.append([code(f.name), code(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)),
                     default_cell(f), cell(help_text)])
    return rows


def module_doc(path: Path) -> str:
    """A module's docstring, read without importing it."""
    import ast

    try:
        return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
