"""Generate ``reference/task-spec.md``, ``reference/grid-file.md`` and ``reference/budgets.md`` from the dataclasses
and key lists the code validates against (``trainables.task``, ``study.plan.grid_file``, ``study.plan.grid``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import (  # noqa: E402
    cell,
    code,
    default_cell,
    docstring_args,
    field_comments,
    field_default,
    field_rows,
    prose,
    table,
    warn,
)


def docstring_example(doc: str | None) -> str:
    """The literal block (after ``::``) of a module docstring, dedented; '' without one."""
    text = inspect.cleandoc(doc or "")
    if "::" not in text:
        return ""
    block = text.split("::", 1)[1].split("\n\n", 1)[1] if "\n\n" in text.split("::", 1)[1] else ""
    lines = []
    for line in block.splitlines():
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return inspect.cleandoc("\n".join(lines))


def top_level_comments(example: str) -> dict[str, str]:
    """``key -> comment`` of the top-level keys of a commented YAML example."""
    out = {}
    for line in example.splitlines():
        m = re.match(r"^([A-Za-z_]\w*):[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def yaml_type(python_type: object) -> str:
    """How a TaskSpec field is written in YAML (its Python type stores mappings as tuples of pairs)."""
    text = str(python_type)
    if text.startswith("tuple[tuple["):
        return "mapping"
    if text.startswith("tuple["):
        return "list"
    return code(text)


def set_literal(function, name: str) -> list[str]:
    """The string elements of ``name = {...}`` inside ``function``'s source (the keys it accepts)."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            if isinstance(node.value, ast.Set):
                return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return []


def task_spec() -> str:
    import trainables.task as task
    from trainables.task import POOLINGS, SCORE_METRICS, Target, TaskSpec, task_from_dict

    keys = set_literal(task_from_dict, "known")
    if not keys:
        warn("trainables.task.task_from_dict: the set of known keys was not found")
    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    comments = field_comments(TaskSpec)
    example = top_level_comments(docstring_example(task.__doc__))
    rows = []
    for key in [k for k in fields if k in keys] + sorted(set(keys) - set(fields)):
        f = fields.get(key)
        rows.append([code(key), yaml_type(f.type) if f else "&nbsp;", default_cell(f) if f else "&nbsp;",
                     cell(comments.get(key) or example.get(key, ""))])
    return "\n".join([
        "# Task spec (`task.yaml`)\n",
        prose(inspect.cleandoc(task.__doc__ or "").split("::")[0]) + "\n",
        "An example (from `trainables.task`'s docstring):\n",
        "```yaml\n" + docstring_example(task.__doc__) + "\n```\n",
        "## Top-level keys\n",
        "The keys `trainables.task.task_from_dict` accepts; any other key is refused. Types and defaults are "
        "those of `trainables.task.TaskSpec`.\n",
        table(["key", "type", "default", "meaning"], rows),
        f"- `segmentation`: class name -> label value (0..255); one class must be the background, value 0.\n"
        f"- `score`: weights summing to 1 over {', '.join(code(m) for m in SCORE_METRICS)}; a classification "
        "metric needs a target.\n",
        "## A target (`targets:` entries)\n",
        prose(inspect.cleandoc(Target.__doc__ or "").split("\n\n")[0]) + f" `pooling` is one of "
        f"{', '.join(code(p) for p in POOLINGS)}.\n",
        table(["key", "type", "default", "meaning"], field_rows(Target)),
        "The built-in specs are listed under [Registries](registries.md#tasks); "
        "[Your own task](../how-to/own-task.md) walks through writing one.\n",
    ])


def grid_file() -> str:
    import study.plan.grid_file as gf
    from study.plan.grid import BUDGETS, Cell, StudyPlan

    helps = docstring_args(StudyPlan.__doc__)
    plan_rows = [[code("base"), code("str"), code("'smoke'"),
                  cell("the budget whose values are the defaults of every key below: " + ", ".join(BUDGETS))],
                 [code("name"), code("str"), cell("the file's name without .yaml"), cell(helps.get("name", ""))],
                 [code("cells"), code("list"), "required", cell("the cells, below (a non-empty list)")]]
    for f in dataclasses.fields(StudyPlan):
        if f.name in gf.PLAN_FIELDS:
            plan_rows.append([code(f.name), code(f.type), cell("the base budget's, else " + field_default(f)),
                              cell(f.metadata.get("help") or helps.get(f.name, ""))])
    cell_keys = getattr(gf, "_CELL_KEYS", set())
    cell_help = {**field_comments(Cell), **docstring_args(Cell.__doc__)}
    cell_fields = {f.name: f for f in dataclasses.fields(Cell)}
    cell_rows = []
    for key in [k for k in cell_fields if k in cell_keys] + sorted(set(cell_keys) - set(cell_fields)):
        f = cell_fields.get(key)
        default = default_cell(f) if f else "&nbsp;"
        if key == "backbone":
            default = code(repr(gf.DEFAULT_BACKBONE))
        cell_rows.append([code(key), default, cell(cell_help.get(key, ""))])
    searched = sorted(getattr(gf, "_TRAIN_SEARCHED", set()))
    return "\n".join([
        "# Grid file (`--grid FILE.yaml`)\n",
        prose(inspect.cleandoc(gf.__doc__ or "").split("\n\n")[0]) + "\n",
        "```yaml\n" + docstring_example(gf.__doc__) + "\n```\n",
        prose(inspect.cleandoc(gf.__doc__ or "").split("\n\n")[-1]) + "\n",
        "## Top-level keys\n",
        "Every key but `cells` is optional; the keys besides `base`, `name` and `cells` are the fields of "
        "`study.plan.grid.StudyPlan` a file may set (`study.plan.grid_file.PLAN_FIELDS`). Any other key is refused.\n",
        table(["key", "type", "default", "meaning"], plan_rows),
        "## A cell (`cells:` entries)\n",
        table(["key", "default", "meaning"], cell_rows),
        "`params` holds `train` (any of " + ", ".join(code(k) for k in searched) + ") and `strategy_params` (the "
        "fields of the strategy's config, listed per strategy under [Registries](registries.md#fine-tuning-"
        "strategies)). A cell with `params` is not searched: every trial uses them, each with its own seed.\n",
        "The budgets that `base` names are tabulated in [Budgets](budgets.md).\n",
    ])


def budgets() -> str:
    from study.plan.grid import BUDGETS, StudyPlan

    helps = docstring_args(StudyPlan.__doc__)
    fields = [f for f in dataclasses.fields(StudyPlan) if any(f.name in b for b in BUDGETS.values())]
    rows = []
    for f in fields:
        values = [code(BUDGETS[b][f.name]) if f.name in BUDGETS[b] else cell(f"default ({field_default(f)})")
                  for b in BUDGETS]
        rows.append([code(f.name), *values, cell(helps.get(f.name, ""))])
    unknown = sorted({k for b in BUDGETS.values() for k in b} - {f.name for f in dataclasses.fields(StudyPlan)})
    if unknown:
        warn(f"study.plan.grid.BUDGETS sets {unknown}, which are not StudyPlan fields")
    return "\n".join([
        "# Budgets\n",
        "How big a study is: `--budget NAME`, or a grid file's `base:`. Read from `study.plan.grid.BUDGETS`; a field "
        "a budget does not set keeps `StudyPlan`'s default. Without `--budget`, `--grid smoke` runs at `smoke` and "
        "the other grids at `laptop` where torch sees no GPU, `paper` where it does. How long each takes on a given "
        "machine is measured, not written here: see [Results](../results.md).\n",
        table(["field", *[code(b) for b in BUDGETS], "meaning"], rows),
    ])


def main() -> None:
    for path, build in (("reference/task-spec.md", task_spec), ("reference/grid-file.md", grid_file),
                        ("reference/budgets.md", budgets)):
        try:
            text = build()
        except Exception as exc:
            warn(f"{path}: {exc!r}")
            text = f"# {path}\n\nThis page could not be generated: {prose(repr(exc))}\n"
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)


main()
