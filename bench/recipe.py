"""The training recipe, lever by lever: the between-run spread of each lever's runs against the baseline's
(issue 27, item 2).

Each lever is a ``bench.variance`` measurement (``--designs seed``: K paired seeds x the 4 cells through the real
trial code) with a training-recipe change (``--recipe``, fields of ``trainables.engine.TrainConfig``) and/or a
head change (``--backbone-options``, head-only fields of ``trainables.backbones.BackboneConfig``). A lever is kept
when it lowers the between-run SD of the test score without lowering the mean or adding more than 10% to the
seconds per epoch; the rows here are what that decision reads. Besides the task's score, each row gives the spread
of ``0.5 x Dice + 0.5 x AUC`` computed from the same runs (item 4: would a threshold-free presence term be
steadier?).

    python -m bench.recipe [--lever NAME=RECIPE[|HEAD]] ... [--seeds 8] [--workers 2] [--work .variance/work]
        [--folder .variance/recipe] [--reuse] [--results DIR]

``--lever`` repeats; without one the default levers run (baseline, an averaged model, cosine, the head that reads
the segmentation, it with cosine, it with gradient clipping), each at the strategies' starting points of the code
that runs it (the four cells' are all 1e-3). A lever's recipe is compared by the fields its runs used
(``train_recipe``, recorded by ``bench.variance``), so ``--reuse`` never takes a measurement of another recipe. ``--reuse`` keeps a lever's finished ``variance.json`` in ``--folder/NAME``
(same settings) instead of running it again. Writes ``recipe.json`` (a row per lever and cell; each lever's
command) to ``bench/results/`` or ``--results`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import print_table, write_result

DEFAULT_LEVERS = (
    "baseline=grad_clip_norm=0|cls_reads_seg=false",
    "ema=ema_decay=0.99,grad_clip_norm=0|cls_reads_seg=false",
    "cosine=lr_schedule=cosine,warmup_epochs=1,grad_clip_norm=0|cls_reads_seg=false",
    "seghead=grad_clip_norm=0|cls_reads_seg=true",
    "cosine_seghead=lr_schedule=cosine,warmup_epochs=1,grad_clip_norm=0|cls_reads_seg=true",
    "seghead_clip=grad_clip_norm=1.0|cls_reads_seg=true",
)
# what a measurement made before bench.variance recorded its runs' recipe used: TrainConfig's defaults then
RECIPE_BEFORE_RECORDING = {"lr_schedule": "constant", "warmup_epochs": 0.0, "ema_decay": 0.0, "grad_clip_norm": 0.0,
                           "keep_epoch": "best"}


def parse_lever(text: str) -> tuple[str, str, str]:
    """``NAME=RECIPE[|HEAD]`` -> (name, recipe, head)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"--lever {text!r}: write NAME=RECIPE[|HEAD], e.g. cosine=lr_schedule=cosine or "
                         "seghead=|cls_reads_seg=true")
    recipe, _, head = rest.partition("|")
    return name, recipe, head


def train_recipe(settings: dict) -> dict:
    """The recipe fields a measurement's runs used: their own record, else the defaults before it was recorded
    with the explicit ``--recipe`` over them."""
    if "train_recipe" in settings:
        return dict(settings["train_recipe"])
    return {**RECIPE_BEFORE_RECORDING, **{k: v for k, v in (settings.get("recipe") or {}).items()
                                          if k in RECIPE_BEFORE_RECORDING}}


def wanted_recipe(recipe: str) -> dict:
    """The recipe fields a lever's ``--recipe`` gives with today's TrainConfig defaults."""
    from bench import variance
    from trainables.engine import TrainConfig

    config = TrainConfig(**variance.parse_recipe(recipe))
    return {k: getattr(config, k) for k in RECIPE_BEFORE_RECORDING}


def reads_seg(settings: dict) -> bool:
    """Whether a measurement's presence head read the segmentation: the runs' own record (``head``), else the
    explicit ``--backbone-options``; a measurement made before either was recorded had a head that did not."""
    if "head" in settings:
        return bool(settings["head"].get("cls_reads_seg", False))
    return bool((settings.get("backbone_options") or {}).get("cls_reads_seg", False))


def lever_rows(name: str, doc: dict) -> list[dict]:
    """One row per cell of a lever's ``variance.json``: mean and SD of the score, its parts, the alternative
    score and the seconds per epoch."""
    rows = []
    for cell in doc["settings"]["cells"]:
        runs = [r for r in doc["runs"] if r["cell"] == cell and "error" not in r
                and r["init_seed"] == r["data_seed"] and r["replicate"] == 0]
        row: dict = {"lever": name, "cell": cell, "runs": len(runs), "recipe": train_recipe(doc["settings"]),
                     "backbone_options": doc["settings"].get("backbone_options") or {},
                     "head_reads_seg": reads_seg(doc["settings"]),
                     "lr_start": doc["settings"]["cells"][cell]["train"].get("lr_encoder")}
        series = {"score": [r["test_score"] for r in runs], "dice": [r["test_dice"] for r in runs],
                  "auc": [r["test_auc"] for r in runs], "balanced_accuracy": [r["test_balanced_accuracy"] for r in runs],
                  "score_dice_auc": [0.5 * r["test_dice"] + 0.5 * r["test_auc"] for r in runs]}
        for key, values in series.items():
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        times = [r["time_per_epoch_s"] for r in runs if r.get("time_per_epoch_s")]
        row["time_per_epoch_s"] = statistics.fmean(times) if times else None
        rows.append(row)
    return rows


def measure(name: str, recipe: str, head: str, args: argparse.Namespace) -> dict:
    """A lever's ``variance.json``: reused from ``--folder/NAME`` with ``--reuse``, else measured there."""
    from bench import variance

    folder = args.folder / name
    path = folder / "variance.json"
    if args.reuse and path.is_file():
        from trainables.backbones import BackboneConfig

        doc = json.loads(path.read_text())
        wanted = variance.parse_head(head).get("cls_reads_seg", BackboneConfig().cls_reads_seg)
        if doc.get("complete") and train_recipe(doc["settings"]) == wanted_recipe(recipe) and (
                reads_seg(doc["settings"]) == wanted):
            return doc
    argv = ["--seeds", str(args.seeds), "--designs", "seed", "--workers", str(args.workers), "--work", str(args.work),
            "--results", str(folder), "--recipe", recipe, "--backbone-options", head]
    if args.tiny:
        argv.append("--tiny")
    variance.main(argv)
    return json.loads(path.read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__.splitlines()[0])
    p.add_argument("--lever", action="append", default=None, help="NAME=RECIPE[|HEAD] (repeat)")
    p.add_argument("--seeds", type=int, default=8, help="paired seeds per cell and lever")
    p.add_argument("--workers", type=int, default=2, help="processes at once")
    p.add_argument("--work", type=Path, default=Path(".variance/work"), help="the cohort and pre-training (reused)")
    p.add_argument("--folder", type=Path, default=Path(".variance/recipe"), help="one variance.json per lever")
    p.add_argument("--reuse", action="store_true", help="keep a lever's finished measurement in --folder")
    p.add_argument("--results", type=Path, default=None, help="folder for recipe.json (default bench/results)")
    p.add_argument("--tiny", action="store_true", help="bench.variance's tiny mode: checks the path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m bench.recipe " + " ".join(argv if argv is not None else sys.argv[1:])
    levers = [parse_lever(t) for t in (args.lever or DEFAULT_LEVERS)]
    started = time.perf_counter()
    rows, commands = [], {}
    for name, recipe, head in levers:
        doc = measure(name, recipe, head, args)
        rows += lever_rows(name, doc)
        commands[name] = {"commands": doc.get("commands", [doc["command"]]), "commit": doc["commit"],
                          "date": doc["date"], "machines": doc.get("machines")}
    path = write_result("recipe", command, rows, {"levers": commands, "wall_s": time.perf_counter() - started},
                        folder=args.results)
    print_table(rows, ["lever", "cell", "runs", "score_mean", "score_sd", "dice_sd", "auc_sd", "balanced_accuracy_sd",
                       "score_dice_auc_sd", "time_per_epoch_s"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
