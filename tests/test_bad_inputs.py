"""A corpus of bad inputs, one case each, with the message a person gets: exit 2, one line, no traceback.

Manifest and NIfTI cases at the data layer live in test_data.py; here they are driven through the
launcher's CLI, together with grid files and CLI arguments. Everything is rejected before Ray starts.
"""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from study.launch import main
from study.plan.grid import select_plan
from study.plan.grid_file import load_grid_file
from trainables.data import read_manifest
from trainables.errors import StudyInputError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket goes


CLI_CASES = [
    (["--methods", "bogus"], "unknown pre-training method 'bogus'; valid pre-training methods:"),
    (["--strategies", "full,bogus"], "unknown fine-tuning strategy 'bogus'; valid fine-tuning strategies:"),
    (["--backbones", "resnet50"], "unknown backbone 'resnet50'; valid backbones: unet, segresnet, swinunetr"),
    (["--grid", "huge"], "unknown grid 'huge'; valid grids: smoke, full, or a FILE.yaml"),
    (["--budget", "infinite"], "unknown budget 'infinite'; valid budgets: smoke, laptop, paper"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be in (0, 1] or a whole number"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 0"),
    (["--seeds", "-2"], "--seeds must be >= 0"),
    (["--confirm-runs", "-1"], "--confirm-runs must be >= 0"),
    (["--margin", "1.5"], "--margin must be in [0, 1)"),
    (["--grid", "smoke", "--reference", "none__bogus__segresnet"], "--reference 'none__bogus__segresnet' is not a cell"),
    (["--race", "on", "--seeds", "2"], "--race on and --seeds 2 both add repeats after the search"),
    (["--grid", "smoke", "--race", "on"], "--race on: this study's budget has no race budget"),
    (["--race-budget", "lots"], "--race-budget 'lots': give a number of repeats (e.g. 16) or of minutes"),
    (["--race-budget", "0"], "--race-budget '0': give a number of repeats"),
    (["--race-budget", "2.5"], "--race-budget '2.5': give a number of repeats"),
    (["--race", "off", "--race-budget", "8"], "--race-budget sets the budget of a race, and --race off"),
    (["--address", "127.0.0.1:{port}"], "Ray cluster at 127.0.0.1:{port} is unreachable"),
    (["--address", "not an address"], "is not HOST:PORT"),
    (["--mlflow-uri", "http://127.0.0.1:{port}"], "MLflow server http://127.0.0.1:{port} is unreachable"),
    (["--trial-resources", "{gpu_node: 1"], "--trial-resources is not valid JSON"),
    (["--trial-resources", '{"gpu_node": -1}'], "--trial-resources must be a JSON object"),
    (["--checkpoint-every-s", "-5"], "--checkpoint-every-s must be a number of seconds >= 0"),
    (["--backbones", "swinunetr"], "swinunetr needs an input size that is a multiple of 32"),
    (["--cohort", "{tmp}/nowhere/manifest.csv"], "manifest"),
    (["--num-samples", "abc"], "argument --num-samples: invalid int value: 'abc' (see python -m study.launch --help)"),
    (["--resume", "{tmp}/nothing-here"], "no study.json there"),
    (["--grid", "{tmp}"], "is a folder, not a file; give a grid FILE.yaml"),
    (["--grid", "{tmp}/folder.yaml"], "folder.yaml is a folder, not a file; give a grid FILE.yaml"),
    (["--resume", "{tmp}/file.txt"], "is a file, not a folder; give the study folder"),
    (["--pretrained", "weights.pt"], "--pretrained 'weights.pt': write NAME=PATH"),
    (["--label-fractions", "0.1,half"], "--label-fractions '0.1,half': give shares of the labelled training"),
    (["--label-fractions", "0,1"], "label fraction 0.0 must be a number in (0, 1]"),
    (["--label-fractions", "0.5,0.5"], "label fraction 0.5 is given twice"),
    (["--pretrained", "ssl={tmp}/missing.pt"], "pre-trained checkpoint {tmp}/missing.pt does not exist"),
    (["--pretrained", "reconstruction={tmp}/file.txt"], "pretrained name 'reconstruction' is a registered "
                                                         "pre-training method"),
    (["--pretrained", "my__ssl={tmp}/file.txt"], "pretrained name 'my__ssl': use letters, digits"),
]


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_argument(argv, expected, tmp_path, capsys) -> None:
    port = _closed_port()
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "file.txt").write_text("not a study")
    argv = [a.replace("{port}", str(port)).replace("{tmp}", str(tmp_path)) for a in argv]
    if "--grid" not in argv and "--resume" not in argv:
        argv = ["--grid", "smoke", *argv]
    if "--output" not in argv and "--resume" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert expected.replace("{port}", str(port)).replace("{tmp}", str(tmp_path)) in _run(argv, capsys)


def test_ray_address_comes_from_the_environment(tmp_path, monkeypatch, capsys) -> None:
    from study.launch import build_parser

    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert build_parser().parse_args([]).address == f"127.0.0.1:{port}"
    err = _run(["--grid", "smoke", "--output", str(tmp_path / "out")], capsys)
    assert f"127.0.0.1:{port}" in err and "ray start --head" in err  # checked up front, like --address


def test_output_folder_holding_another_study(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text("{}")
    assert "already holds a study; continue it with --resume" in _run(["--grid", "smoke", "--output", str(out)], capsys)


@pytest.mark.parametrize("command", ["report", "predict", "roi_preview", "cohort"])
def test_every_commands_bad_arguments_are_one_line(command, capsys) -> None:
    import importlib

    main_of = importlib.import_module(f"study.{command}").main
    code = main_of(["--no-such-option"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"(see python -m study.{command} --help)" in err


def test_a_moved_study_folder_is_refused_on_resume_saying_where_it_started(tmp_path, capsys) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    study = {"args": {"grid": "smoke"}, "parent_run_id": "abc", "plan": {}, "folder": str(tmp_path / "started")}
    (moved / "study.json").write_text(json.dumps(study))
    before = sorted(p.name for p in moved.iterdir())
    err = _run(["--resume", str(moved)], capsys)
    assert f"this study was started in {tmp_path / 'started'} and has been moved or copied" in err
    assert f"move it back to {tmp_path / 'started'}" in err
    assert sorted(p.name for p in moved.iterdir()) == before  # nothing written


def test_corrupt_image_names_the_subject(tiny_cohort_copy, tmp_path, capsys) -> None:
    rows = list(csv.DictReader(tiny_cohort_copy.open()))
    victim = next(r for r in rows if r["split"] == "train")
    (tiny_cohort_copy.parent / victim["image"]).write_bytes(b"\x1f\x8b not really a nifti")
    err = _run(["--grid", "smoke", "--cohort", str(tiny_cohort_copy), "--output", str(tmp_path / "o")], capsys)
    assert victim["subject_id"] in err


def test_image_that_is_a_folder_is_called_a_folder(tiny_cohort_copy, tmp_path, capsys) -> None:
    rows = list(csv.DictReader(tiny_cohort_copy.open()))
    victim = next(r for r in rows if r["split"] == "train")
    image = tiny_cohort_copy.parent / victim["image"]
    image.unlink()
    image.mkdir()
    err = _run(["--grid", "smoke", "--cohort", str(tiny_cohort_copy), "--output", str(tmp_path / "o")], capsys)
    assert victim["subject_id"] in err and f"image {image} is a folder, not a file" in err, err


def test_split_smaller_than_the_batch(tiny_cohort_copy, tmp_path, capsys) -> None:
    rows = list(csv.DictReader(tiny_cohort_copy.open()))
    val = [r for r in rows if r["split"] == "val"]
    keep = [r for r in rows if r not in val[1:]]  # one validation subject left, batch size 2
    with tiny_cohort_copy.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    err = _run(["--grid", "smoke", "--cohort", str(tiny_cohort_copy), "--output", str(tmp_path / "o")], capsys)
    assert "split 'val' has 1 subjects, fewer than the batch size 2" in err


GRID_CASES = [
    ("cells: [\n  {pretrain: none, strategy: full\n", "malformed YAML at line"),
    ("- just\n- a list\n", "expected a mapping with a 'cells' list"),
    ("cells: []\n", "'cells' must be a non-empty list"),
    ("colour: blue\ncells: [{pretrain: none, strategy: full}]\n", "unknown keys ['colour']"),
    ("cells: [{pretrain: none}]\n", "cell 1: 'strategy' is required"),
    ("cells: [{pretrain: none, strategy: full, lr: 3}]\n", "cell 1: unknown keys ['lr']"),
    ("cells: [{pretrain: none, strategy: full, num_samples: -1}]\n", "num_samples must be a positive integer"),
    ("cells: [{pretrain: none, strategy: full, params: {train: {momentum: 0.9}}}]\n", "params.train has unknown keys"),
    ("cells: [{pretrain: none, strategy: full, params: {train: {lr_encoder: 7}}}]\n", "lr_encoder must be in (0, 1)"),
    ("cells: [{pretrain: none, strategy: lora, params: {strategy_params: {rank: 0}}}]\n", "params.strategy_params"),
    ("input_size: [16, 16]\ncells: [{pretrain: none, strategy: full}]\n", "input_size must be a list of three"),
    ("finetune_epochs: many\ncells: [{pretrain: none, strategy: full}]\n", "finetune_epochs must be a int"),
    ("base: enormous\ncells: [{pretrain: none, strategy: full}]\n", "unknown base 'enormous'"),
    ("cells: [{pretrain: magic, strategy: full}]\n", "unknown pre-training method 'magic'"),
    ("pretrain_params: {contrastive: {temprature: 0.2}}\ncells: [{pretrain: contrastive, strategy: full}]\n",
     "pretrain_params.contrastive: unknown parameter(s) ['temprature']"),
    ("pretrain_params: {contrastive: {lr: -1}}\ncells: [{pretrain: contrastive, strategy: full}]\n",
     "pretrain_params.contrastive.lr must be a number >= 0"),
    ("pretrain_params: {magic: {}}\ncells: [{pretrain: none, strategy: full}]\n",
     "pretrain_params: unknown pre-training method 'magic'"),
    ("splits: {train: 2}\ncells: [{pretrain: none, strategy: full}]\n", "splits must give the number of subjects"),
    ("race: maybe\ncells: [{pretrain: none, strategy: full}]\n", "race must be true or false, got 'maybe'"),
    ("num_samples: true\ncells: [{pretrain: none, strategy: full}]\n", "num_samples must be a int, got True"),
    ("race_minutes: -1\ncells: [{pretrain: none, strategy: full}]\n", "race_minutes must be >= 0, got -1"),
    ("cells: [{pretrain: none, strategy: full}, {pretrain: none, strategy: full, num_samples: 3}]\n",
     "names cell(s) none__full__segresnet more than once"),
    ("splits: {pretrain: 4, train: 4, val: 1, test: 4}\ncells: [{pretrain: none, strategy: full}]\n",
     "splits.val must be an integer >= 2"),
]


@pytest.mark.parametrize(("text", "expected"), GRID_CASES, ids=[e for _, e in GRID_CASES])
def test_grid_file(text, expected, tmp_path, capsys) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    err = _run(["--grid", str(path), "--output", str(tmp_path / "out")], capsys)
    assert expected in err and str(path) in err or expected in err


def test_grid_file_round_trip(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("name: t\nbase: smoke\nfinetune_epochs: 3\ncells:\n"
                    "  - {pretrain: none, strategy: lora, num_samples: 2,\n"
                    "     params: {train: {lr_encoder: 0.001}, strategy_params: {rank: 8}}}\n")
    plan = load_grid_file(path)
    assert plan.name == "t" and plan.finetune_epochs == 3 and plan.input_size == (16, 16, 16)
    (cell,) = plan.cells
    assert (cell.pretrain, cell.strategy, cell.backbone, cell.num_samples) == ("none", "lora", "segresnet", 2)
    assert cell.params == {"train": {"lr_encoder": 0.001}, "strategy_params": {"rank": 8}}


def test_grid_file_sets_the_cohort_size_or_its_splits(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("base: laptop\nsubjects: 16\ncells: [{pretrain: none, strategy: full}]\n")
    plan = load_grid_file(path)  # the file's own size replaces the base's splits
    assert plan.subjects == 16 and plan.splits == {}
    path.write_text("base: smoke\nsplits: {pretrain: 3, train: 5, val: 2, test: 6}\n"
                    "cells: [{pretrain: none, strategy: full}]\n")
    plan = load_grid_file(path)
    assert plan.subjects == 16 and plan.splits == {"pretrain": 3, "train": 5, "val": 2, "test": 6}


def test_grid_file_sets_pretraining_settings(tmp_path) -> None:
    from study.launch import TrialFactory
    from trainables.pretrain.loop import pretrain_key
    from trainables.trials import PretrainTrial

    path = tmp_path / "g.yaml"
    path.write_text("name: t\nbase: smoke\npretrain_params: {contrastive: {temperature: 0.2, lr: 0.0003}}\n"
                    "cells: [{pretrain: contrastive, strategy: full}]\n")
    factory = TrialFactory(plan=load_grid_file(path), data={"manifest": "m.csv", "input_size": [16, 16, 16]},
                           data_id="x", output=str(tmp_path), pretrain_cache=str(tmp_path))
    spec = PretrainTrial.from_dict(factory.pretrain("contrastive", "segresnet"))
    assert spec.pretrain.lr == 0.0003 and spec.pretrain.method_params == {"temperature": 0.2}
    default = PretrainTrial.from_dict(TrialFactory(**{**vars(factory), "plan": select_plan("smoke")})
                                      .pretrain("contrastive", "segresnet"))
    assert default.pretrain.lr != 0.0003  # the defaults otherwise; a changed setting is another cached checkpoint
    assert pretrain_key(spec.backbone, spec.pretrain, "x") != pretrain_key(default.backbone, default.pretrain, "x")


# -- property-based: the parsers return a valid config or raise the project's own error, nothing else --
yaml_text = st.one_of(
    st.text(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["cells", "pretrain", "strategy", "backbone", "params", "train", "strategy_params",
                             "num_samples", "base", "name", "input_size", "width", "lr_encoder", "rank", "x"]),
            inner, max_size=5),
        max_leaves=20,
    ).map(lambda v: __import__("yaml").safe_dump(v)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=yaml_text)
def test_grid_parser_property(text, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("g") / "grid.yaml"
    path.write_text(text)
    try:
        plan = load_grid_file(path)
    except StudyInputError:
        return
    assert plan.cells and all(c.pretrain and c.strategy and c.backbone for c in plan.cells)


csv_text = st.lists(
    st.lists(st.one_of(st.sampled_from(["subject_id", "image", "label", "pcs_left", "pcs_right", "split", "train",
                                        "val", "test", "pretrain", "0", "1", "2", "", "../x.nii.gz", "a.nii.gz"]),
                       st.text(max_size=8)), min_size=0, max_size=7),
    max_size=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=csv_text)
def test_manifest_parser_property(rows, tmp_path_factory) -> None:
    folder: Path = tmp_path_factory.mktemp("m")
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    try:
        records = read_manifest(path)
    except StudyInputError:
        return
    assert all(r.split in ("pretrain", "train", "val", "test") for r in records)
