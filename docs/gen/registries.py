"""Generate ``reference/registries.md`` (pre-training methods, fine-tuning strategies with their search spaces,
backbones, classification metrics, tasks, grid presets) by enumerating the registries, and
``reference/metrics.md`` (what every run logs)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import ROOT, cell, code, field_rows, first_paragraph, prose, table, warn  # noqa: E402

SPACE_DRAWS = 64  # random draws per space: enough to visit every conditional branch of the spaces here


def space_rows(space, prefix: str, config_cls: type | None) -> list[list[str]]:
    """``[Optuna parameter, distribution, config field]`` for a define-by-run space, found by running it on
    in-memory Optuna trials (random sampler, seeded) and reading each trial's distributions."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, object] = {}
    returned: dict[str, str] = {}
    for _ in range(SPACE_DRAWS):
        trial = study.ask()
        values = space(trial)
        for key in values or {}:
            returned.setdefault(key, "")
        for name, dist in trial.distributions.items():
            seen.setdefault(name, dist)
        study.tell(trial, 0.0)
    fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set(returned)
    rows = []
    for name, dist in seen.items():
        target = name if name in fields else name.removeprefix(f"{prefix}_")
        rows.append([code(name), distribution(dist), code(target) if target in fields else "&nbsp;"])
    return rows


def distribution(dist) -> str:
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return "one of " + ", ".join(code(c) for c in dist.choices)
    kind = "integer" if isinstance(dist, d.IntDistribution) else "float"
    scale = ", log scale" if dist.log else ""
    step = f", step {dist.step}" if dist.step not in (None, 1) else ""
    return f"{kind} in [{dist.low}, {dist.high}]{scale}{step}"


def methods() -> str:
    from search_spaces import PRETRAIN_SPACES
    from trainables.pretrain import PRETRAIN_METHODS

    out = ["## Pre-training methods\n",
           "`trainables.pretrain.PRETRAIN_METHODS`; each method's space is in `search_spaces.pretrain` "
           "(`PRETRAIN_SPACES`). Pre-training is not searched by the study: a grid file's `pretrain_params` sets "
           "these fields, and the spaces document what is sensible to try.\n"]
    for name in PRETRAIN_METHODS.names():
        cls = PRETRAIN_METHODS.get(name)
        module = inspect.getmodule(cls)
        out.append(f"### `{name}`\n")
        doc = inspect.cleandoc(module.__doc__ or "") if module else ""
        out.append("\n\n".join(prose(p) for p in doc.split("\n\n") if p.strip()) or prose(first_paragraph(cls.__doc__)))
        out.append("")
        out.append(f"Objective `{cls.__module__}.{cls.__name__}`"
                   + ("" if getattr(cls, "trains", True) else "; trains nothing (no pre-training job)") + ".\n")
        rows = field_rows(cls.Config)
        if rows:
            out.append(table(["field", "type", "default", "meaning"], rows))
        if name in PRETRAIN_SPACES:
            space = space_rows(PRETRAIN_SPACES.get(name), name, cls.Config)
            if space:
                out.append("Search space:\n\n" + table(["Optuna parameter", "distribution", "sets field"], space))
        else:
            warn(f"pre-training method {name!r} has no search space in search_spaces.PRETRAIN_SPACES")
    return "\n".join(out)


def strategies() -> str:
    from search_spaces.finetune import TRAIN_DEFAULTS, lr_ranges, train_space
    from trainables.engine import TrainConfig
    from trainables.finetune import STRATEGIES

    out = ["## Fine-tuning strategies\n",
           "`trainables.finetune.STRATEGIES`, each registered with `@register_strategy(name, Config, space=...)`. "
           "Every fine-tuning trial also samples the training loop's space (below). A grid file's "
           "`params.strategy_params` fixes the fields of a strategy's config.\n"]
    for name in STRATEGIES.names():
        s = STRATEGIES.get(name)
        module = inspect.getmodule(s.apply)
        out.append(f"### `{name}`\n")
        out.append(prose(first_paragraph(s.apply.__doc__)) + "\n")
        about = first_paragraph(module.__doc__ if module else "")
        if about and module and module.__name__ != "trainables.finetune.basic":
            out.append(f"From `{module.__name__}`: {prose(about)}\n")
        flags = [text for flag, text in (
            (s.schedule is not None, "staged: two phases, the switch searched"),
            (s.needs_teacher, "learns from its teacher cell's best model (the teacher cell must be in the grid)"),
            (s.from_scratch, "builds its own network: crossed with `none` only"),
            (s.unfit is not None, "cannot run on every backbone and width: a preset grid leaves such cells out"),
        ) if flag]
        if flags:
            out.append("- " + "\n- ".join(flags) + "\n")
        body, heads = lr_ranges(name)["lr_encoder"], lr_ranges(name)["lr_heads"]
        out.append(f"Its search starts with every learning rate at `{s.lr_start:g}` (`lr_start`, from "
                   f"`bench/starting_points.py`) and searches the body's rates in [{body[0]:.3g}, {body[1]:.3g}], the "
                   f"heads' in [{heads[0]:.3g}, {heads[1]:.3g}] (log scale).\n")
        rows = field_rows(s.config_cls)
        out.append(table(["field", "type", "default", "meaning"], rows) if rows
                   else "No hyperparameters of its own.\n")
        space = space_rows(s.space, name, s.config_cls)
        if space:
            out.append("Search space:\n\n" + table(["Optuna parameter", "distribution", "sets field"], space))
    out.append("### The training loop's space (every strategy)\n")
    out.append(prose(first_paragraph(train_space.__doc__)) + " The first trial of every searched cell sets every "
               "learning rate to its strategy's `lr_start` (above) and the rest from "
               "`search_spaces.finetune.TRAIN_DEFAULTS`: "
               + ", ".join(f"`{k}={v:g}`" for k, v in TRAIN_DEFAULTS.items() if not k.startswith("lr_")) + ". "
               "The ranges below are those of a strategy that starts at 1e-3.\n")
    out.append(table(["Optuna parameter", "distribution", "sets field"], space_rows(train_space, "", TrainConfig)))
    out.append("Every field of the training config (`trainables.engine.TrainConfig`), which a grid file's "
               "`params.train` may fix:\n")
    out.append(table(["field", "type", "default", "meaning"], field_rows(TrainConfig)))
    return "\n".join(out)


def backbones() -> str:
    from trainables.backbones import BACKBONES, BackboneConfig, backbone_info

    rows = []
    for name in BACKBONES.names():
        cls, info = BACKBONES.get(name), backbone_info(name)
        rows.append([code(name), code(f"{cls.__module__}.{cls.__name__}"), cell(first_paragraph(cls.__doc__)),
                     *(code(getattr(info, f.name)) for f in dataclasses.fields(info))])
    from trainables.backbones import BackboneInfo

    info_fields = [f.name for f in dataclasses.fields(BackboneInfo)]
    return "\n".join([
        "## Backbones\n",
        "`trainables.backbones.BACKBONES`, each registered with `@register_backbone(name, BackboneInfo(...))`. "
        "The `BackboneInfo` columns: " + prose(first_paragraph(BackboneInfo.__doc__)) + "\n",
        table(["name", "class", "what it is", *[code(f) for f in info_fields]], rows),
        "The backbone's config (`trainables.backbones.BackboneConfig`):\n",
        table(["field", "type", "default", "meaning"], field_rows(BackboneConfig)),
    ])


def metrics() -> str:
    from trainables.classification_metrics import CLASSIFICATION_METRICS

    rows = []
    for name in CLASSIFICATION_METRICS.names():
        m = CLASSIFICATION_METRICS.get(name)
        rows.append([code(name), cell(m.heading), "yes" if m.binary_only else "no", "yes" if m.shown else "no",
                     cell(first_paragraph(m.fn.__doc__))])
    return "\n".join([
        "## Classification metrics\n",
        "`trainables.classification_metrics.CLASSIFICATION_METRICS`, each registered with "
        "`@register_metric(name, heading)`. Every run logs `val_<name>` and `test_<name>`; a task's `score:` may "
        "weigh any of them (and `dice`); shown ones are columns of the report's tables.\n",
        table(["name", "heading", "two classes only", "shown in tables", "definition"], rows),
    ])


def tasks() -> str:
    from trainables.task import builtin_tasks, load_task

    out = ["## Tasks\n", "The built-in task specs (`trainables/tasks/*.yaml`, `--task NAME`). The format is in "
           "[the task spec reference](task-spec.md).\n"]
    for name in builtin_tasks():
        spec = load_task(name)
        out.append(f"### `{name}`\n")
        out.append(prose(spec.description) + "\n")
        out.append(f"- segmentation classes: {', '.join(f'`{n}` = {v}' for n, v in spec.segmentation)}")
        for t in spec.targets:
            out.append(f"- target `{t.name}`: classes {', '.join(code(c) for c in t.classes)}; manifest columns "
                       f"{', '.join(code(c) for c in t.columns)}; pooling `{t.pooling}`, regions "
                       f"{', '.join(code(r) for r in t.regions)}")
        out.append(f"- flips: `{spec.flips}`; selection score: `{spec.score_text()}`\n")
        source = (ROOT / "trainables" / "tasks" / f"{name}.yaml").read_text(encoding="utf-8")
        out.append(f'??? note "trainables/tasks/{name}.yaml"\n    ```yaml\n'
                   + "".join(f"    {line}\n" for line in source.splitlines()) + "    ```\n")
    return "\n".join(out)


def grids() -> str:
    from study.plan.grid import GRID_DEFAULT_BUDGET, GRIDS

    rows = [[code(name), cell(first_paragraph(fn.__doc__)), code(GRID_DEFAULT_BUDGET.get(name, "laptop / paper"))]
            for name, fn in GRIDS.items()]
    return "\n".join(["## Grid presets\n", "`study.plan.grid.GRIDS` (`--grid NAME`); any other `--grid` value is a "
                      "[grid file](grid-file.md). Without `--budget`, a preset without a budget of its own runs at "
                      "`laptop` where torch sees no GPU and at `paper` where it does.\n",
                      table(["grid", "cells", "default budget"], rows)])


def logged_metrics() -> str:
    from trainables.metric_names import EXTRA_FINAL_METRICS, FINAL_METRICS

    rows = [[code(k), cell(v.heading), code(v.fmt)] for k, v in FINAL_METRICS.items()]
    rows += [[code(k), "not a table column", "&nbsp;"] for k in EXTRA_FINAL_METRICS]
    return "\n".join([
        "# Logged metrics\n",
        "The final metrics every fine-tuning run logs to MLflow, in the order the report's tables, the end-of-study "
        "summary and the MLflow callback use them (`trainables.metric_names`). The per-epoch metrics, tags, params "
        "and artifacts are listed in [What MLflow holds](mlflow.md).\n",
        table(["metric", "table heading", "format"], rows),
    ])


def main() -> None:
    parts = []
    for build in (methods, strategies, backbones, metrics, tasks, grids):
        try:
            parts.append(build())
        except Exception as exc:  # the page says what could not be read, and the strict build fails
            warn(f"{build.__name__}: {exc!r}")
    header = ("# Registries\n\nEverything the study can cross, enumerated from the registries at build time: a new "
              "method, strategy, backbone, metric or task appears here without anyone writing a line.\n")
    with mkdocs_gen_files.open("reference/registries.md", "w") as f:
        f.write(header + "\n" + "\n".join(parts))
    with mkdocs_gen_files.open("reference/metrics.md", "w") as f:
        f.write(logged_metrics())


main()
