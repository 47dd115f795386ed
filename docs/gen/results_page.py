"""Generate ``results.md`` from ``bench/results/*.json`` (each benchmark with the machine, date, commit and command
its file records, and says so where one is missing) and ``changelog.md`` from the repository's ``CHANGELOG.md``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import ROOT, cell, code, first_paragraph, module_doc, number, prose, table, warn  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROVENANCE = ("machine", "date", "commit", "command")
MAX_ROWS = 80  # rows shown per table; the JSON holds the rest
MAX_COLUMNS = 16  # beyond this, nested objects in rows are left to the JSON
MISSING = "**not recorded in this file**"


def machine_text(machine: object) -> str:
    if isinstance(machine, dict):
        parts = [f"{machine['cpus']} CPUs" if "cpus" in machine else "",
                 str(machine.get("platform", "")),
                 f"Python {machine['python']}" if "python" in machine else "",
                 f"torch {machine['torch']}" if "torch" in machine else "",
                 ("CUDA: " + ("yes" if machine["cuda"] else "no")) if "cuda" in machine else "",
                 *(f"{k} {v}" for k, v in machine.items() if k not in ("cpus", "platform", "python", "torch", "cuda"))]
        return cell(", ".join(p for p in parts if p))
    return cell(machine)


def short(value: object, limit: int = 160) -> str:
    if isinstance(value, (dict, list)):
        if isinstance(value, list) and len(value) <= 4 and all(not isinstance(v, (dict, list)) for v in value):
            return cell("[" + ", ".join(number(v) for v in value) + "]")
        text = json.dumps(value)
        return code(text if len(text) <= limit else text[:limit - 3] + "...")
    return cell(number(value)) if not isinstance(value, str) else cell(value)


def in_row(value: object) -> str:
    """A table cell of a row: a long list is counted, not shown (the JSON holds it)."""
    if isinstance(value, list) and (len(value) > 4 or any(isinstance(v, (dict, list)) for v in value)):
        return cell(f"{len(value)} entries")
    return short(value)


def flatten(row: dict, nested: bool) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict) and nested:
            for k, v in value.items():
                out[f"{key}.{k}"] = v
        elif isinstance(value, dict):
            continue
        else:
            out[key] = value
    return out


def rows_table(items: list[dict]) -> str:
    columns: list[str] = []
    flat = [flatten(r, True) for r in items]
    for r in flat:
        columns += [k for k in r if k not in columns]
    dropped: list[str] = []
    if len(columns) > MAX_COLUMNS:
        flat = [flatten(r, False) for r in items]
        dropped = sorted({k for r in items for k, v in r.items() if isinstance(v, dict)})
        columns = []
        for r in flat:
            columns += [k for k in r if k not in columns]
    body = [[in_row(r[c]) if c in r else "&nbsp;" for c in columns] for r in flat[:MAX_ROWS]]
    text = table([code(c) for c in columns], body)
    if len(flat) > MAX_ROWS:
        text += f"\n{len(flat) - MAX_ROWS} more rows are in the JSON.\n"
    if dropped:
        text += f"\nNested fields left to the JSON: {', '.join(code(d) for d in dropped)}.\n"
    return text


def provenance(data: dict, inherited: dict | None = None) -> tuple[str, list[str]]:
    rows, missing = [], []
    for key in PROVENANCE:
        if key in data:
            value = machine_text(data[key]) if key == "machine" else (
                code(data[key]) if key in ("command", "commit") else cell(data[key]))
            rows.append([key, value])
        elif inherited and key in inherited:
            rows.append([key, "as above"])
        else:
            rows.append([key, MISSING])
            missing.append(key)
    return table(["", "recorded"], rows), missing


def question(name: str) -> str:
    """The benchmark's question: its script's docstring (``bench/<name>.py``, else the script it extends)."""
    candidates = [name, name.split("_")[0]]
    for stem in candidates:
        path = ROOT / "bench" / f"{stem}.py"
        if path.is_file():
            return f"`python -m bench.{stem}`: " + prose(first_paragraph(module_doc(path)))
    return ""


def section(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warn(f"{path.name} cannot be read as JSON: {exc}")
        return f"## `{path.name}`\n\nThis file cannot be read as JSON.\n"
    if not isinstance(data, dict):
        return f"## `{path.name}`\n\nNot a JSON object; see the file.\n"
    name = str(data.get("benchmark") or path.stem)
    out = [f"## {name}\n", f"File: `bench/results/{path.name}`. {question(name)}\n"]
    prov, missing = provenance(data)
    groups = [g for g in data.get("runs", []) if isinstance(g, dict) and isinstance(g.get("rows"), list)] \
        if isinstance(data.get("runs"), list) else []
    if missing and groups and all(any(k in g for k in missing) for g in groups):
        prov = prov.replace(MISSING, "per group, below")
    out.append(prov)
    if missing and not groups:
        out.append(f"This file does not record its {', '.join(missing)}.\n")
    for key, value in data.items():
        if key in PROVENANCE or key == "benchmark":
            continue
        if key == "runs" and groups:
            for i, group in enumerate(groups, 1):
                out.append(f"### Group {i}\n")
                gprov, gmissing = provenance(group, data)
                out.append(gprov)
                if gmissing:
                    out.append(f"This group does not record its {', '.join(gmissing)}.\n")
                extra = {k: v for k, v in group.items() if k not in PROVENANCE and k != "rows"}
                if extra:
                    out.append(table(["field", "value"], [[code(k), short(v)] for k, v in extra.items()]))
                out.append(rows_table([r for r in group["rows"] if isinstance(r, dict)]))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out.append(f"**`{key}`**\n")
            out.append(rows_table(value))
    others = {k: v for k, v in data.items()
              if k not in PROVENANCE and k != "benchmark"
              and not (isinstance(v, list) and v and all(isinstance(r, dict) for r in v))}
    if others:
        out.append("Other fields:\n")
        out.append(table(["field", "value"], [[code(k), short(v, 300)] for k, v in others.items()]))
    return "\n".join(out)


def main() -> None:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        warn("bench/results/ holds no JSON file")
    intro = ("# Results\n\n"
             "Every measured figure of this project, rendered at build time from `bench/results/*.json`: one section "
             "per file, with the machine, date, commit and command the file records (where it lacks one, the page "
             "says so). Figures are not copied into the rest of the documentation; pages cite a benchmark by name. "
             "`make bench` re-runs the CPU set and rewrites these files; what changed and when is in the "
             "[changelog](changelog.md).\n\n"
             "Floats are shown to 4 significant digits; the JSON holds the full values. The files measured before "
             "a later change of budget or code say so in their `note` field where their authors knew it.\n\n")
    index = table(["file", "benchmark", "date", "commit"],
                  [[f"[`{p.name}`](#{_anchor(p)})", code(_field(p, "benchmark")), cell(_field(p, "date")),
                    code(_field(p, "commit"))] for p in files])
    body = "\n".join(section(p) for p in files)
    with mkdocs_gen_files.open("results.md", "w") as f:
        f.write(intro + index + "\n" + body)
    changelog = ROOT / "CHANGELOG.md"
    with mkdocs_gen_files.open("changelog.md", "w") as f:
        f.write(changelog.read_text(encoding="utf-8") if changelog.is_file() else "# Changelog\n\nNo CHANGELOG.md.\n")


def _field(path: Path, key: str) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if key not in data and any(isinstance(g, dict) and key in g for g in data.get("runs") or []):
            return "per group"
        return str(data.get(key, "not recorded"))
    except (OSError, ValueError, AttributeError, TypeError):
        return "unreadable"


def _anchor(path: Path) -> str:
    """The anchor mkdocs' toc gives the section heading (the benchmark's name)."""
    import re

    name = _field(path, "benchmark") if _field(path, "benchmark") not in ("not recorded", "unreadable") else path.stem
    return re.sub(r"[^\w\- ]", "", name).strip().lower().replace(" ", "-")


main()
