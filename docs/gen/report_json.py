"""Generate ``reference/report-json.md``: the fields of ``report.json``, read from the source of ``study.report``
(the dict literals ``summary`` returns and the functions it calls), so the page follows the code.

No study is run at build time: each field is listed with the expression that computes it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import ROOT, code, first_paragraph, prose, warn  # noqa: E402

SOURCE = ROOT / "study" / "report.py"
MAX_DEPTH = 4


class Fields:
    """Resolves what keys a value built in ``study/report.py`` has, by following names and calls."""

    def __init__(self, tree: ast.Module) -> None:
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def returned(self, name: str) -> list[ast.expr]:
        """The expressions ``name`` returns (not those of functions nested in it)."""
        fn = self.functions.get(name)
        return [n.value for n in _own_nodes(fn) if isinstance(n, ast.Return) and n.value is not None] if fn else []

    def is_list(self, node: ast.expr | None, fn: ast.FunctionDef | None, depth: int = 0) -> bool:
        """Whether ``node`` evaluates to a list (of the objects whose keys are listed)."""
        if node is None or depth > MAX_DEPTH:
            return False
        if isinstance(node, (ast.List, ast.ListComp)):
            return True
        if isinstance(node, ast.IfExp):
            return self.is_list(node.body, fn, depth + 1) or self.is_list(node.orelse, fn, depth + 1)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            callee = self.functions[node.func.id]
            return any(self.is_list(r, callee, depth + 1) for r in self.returned(callee.name))
        if isinstance(node, ast.Name) and fn is not None:
            return _appended(fn, node.id) or any(
                isinstance(n, ast.Assign) and isinstance(n.value, (ast.List, ast.ListComp))
                and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets) for n in _own_nodes(fn))
        return False

    def keys(self, node: ast.expr, fn: ast.FunctionDef | None, depth: int = 0) -> list[tuple[str, ast.expr | None]]:
        """``(key, value expression)`` of the mapping ``node`` evaluates to (for a list: of its items)."""
        if depth > MAX_DEPTH:
            return []
        if isinstance(node, ast.Dict):
            out = []
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    out.append((k.value, v))
            return out
        if isinstance(node, ast.IfExp):
            return self.keys(node.body, fn, depth + 1) + self.keys(node.orelse, fn, depth + 1)
        if isinstance(node, (ast.ListComp, ast.GeneratorExp)):
            return self.keys(node.elt, fn, depth + 1)
        if isinstance(node, ast.List) and node.elts:
            return self.keys(node.elts[0], fn, depth + 1)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            callee = self.functions[node.func.id]
            return [kv for r in self.returned(callee.name) for kv in self.keys(r, callee, depth + 1)]
        if isinstance(node, ast.Name) and fn is not None:
            return self.name_keys(node.id, fn, depth)
        return []

    def name_keys(self, name: str, fn: ast.FunctionDef, depth: int) -> list[tuple[str, ast.expr | None]]:
        """Keys of a local variable: its dict literal, ``name["key"] = ...``, and the items appended to it."""
        out: list[tuple[str, ast.expr | None]] = []
        for node in _own_nodes(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    elts = target.elts if isinstance(target, ast.Tuple) else [target]
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        values: list[ast.expr | None] = list(node.value.elts)
                    elif isinstance(target, ast.Tuple):  # unpacking a call's tuple: not followed
                        values = [None] * len(elts)
                    else:
                        values = [node.value]
                    for t, v in zip(elts, values, strict=True):
                        if isinstance(t, ast.Name) and t.id == name and v is not None:
                            out += self.keys(v, fn, depth + 1)
                        elif (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == name
                              and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)):
                            out.append((t.slice.value, v))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == name and node.args):
                out += self.keys(node.args[0], fn, depth + 1)
        seen, unique = set(), []
        for key, value in out:
            if key not in seen:
                seen.add(key)
                unique.append((key, value))
        return unique


def rows(fields: Fields, pairs, fn, prefix: str, depth: int = 0) -> list[str]:
    lines = []
    for key, value in pairs:
        expression = ast.unparse(value) if value is not None else ""
        if len(expression) > 110:
            expression = expression[:107] + "..."
        lines.append(f"| `{prefix}{key}` | {code(expression)} |")
        nested = fields.keys(value, fn, depth + 1) if value is not None and depth < MAX_DEPTH else []
        if nested:
            mark = "[]" if fields.is_list(value, fn) else ""
            lines += rows(fields, nested, _owner(fields, value, fn), f"{prefix}{key}{mark}.", depth + 1)
    return lines


def _own_nodes(fn: ast.FunctionDef):
    """The nodes of ``fn``'s body, not descending into the functions and classes defined inside it."""
    stack = list(reversed(fn.body))
    while stack:  # depth first, in source order
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _appended(fn: ast.FunctionDef | None, name: str) -> bool:
    return fn is not None and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "append"
        and isinstance(n.func.value, ast.Name) and n.func.value.id == name for n in _own_nodes(fn))


def _owner(fields: Fields, value: ast.expr, fn):
    """The function whose locals a nested value's names refer to (the callee for a call)."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in fields.functions:
        return fields.functions[value.func.id]
    return fn


def main() -> None:
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    fields = Fields(tree)
    if "summary" not in fields.functions:
        warn("study/report.py has no function `summary`: the report.json reference cannot be generated")
        return
    summary = fields.functions["summary"]
    top = [kv for r in fields.returned("summary") for kv in fields.keys(r, summary)]
    # what write_report adds to the summary before writing report.json: data["key"] = ...
    extra = fields.name_keys("data", fields.functions["write_report"], 0) if "write_report" in fields.functions else []
    body = rows(fields, top, summary, "") + rows(fields, [kv for kv in extra if kv[0] not in dict(top)],
                                                   fields.functions.get("write_report"), "")
    if len(top) < 3:
        warn("study.report.summary: fewer than 3 top-level fields were found; the generator needs a look")
    text = "\n".join([
        "# `report.json`\n",
        prose(first_paragraph(ast.get_docstring(summary))) + " The report writes it as strict JSON "
        "(`trainables.atomic.strict_json`): a missing or undefined number is `null`, never `NaN`.\n",
        "The fields below are read from the source of `study.report` at build time (the dictionaries `summary` "
        "returns, the helpers it calls, and what `write_report` adds), each with the expression that fills it; "
        "`[]` marks a list of such objects. For their meaning, the functions named in the expressions are in the "
        "[API reference](api/study/report.md).\n",
        "| field | computed as |", "|---|---|", *body, "",
    ])
    with mkdocs_gen_files.open("reference/report-json.md", "w") as f:
        f.write(text)


main()
