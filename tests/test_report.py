"""``study.report`` on a real smoke study (local Ray, MLflow SQLite, Optuna journal), checked against
MLflow queried independently; plus a hand-written MLflow study for seeds, failures and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pytest
import ray
import yaml
from conftest import run_in_terminal, wait_for
from mlflow.tracking import MlflowClient

from study.evidence.plots import cell_importances, pareto_front
from study.evidence.verdict import _cache_note
from study.launch import build_parser, run_study
from study.plan.grid_file import load_grid_file
from study.predict import predict_image
from study.report import COLUMNS, optuna_location, write_report
from study.run.model_registry import load_model_folder, registered_name
from study.run.searcher import optuna_storage

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_cohort):
    """One smoke study (2 methods x 2 strategies, 2 trials per cell, 1 seed re-run), run as a person runs it:
    the launcher in a terminal (a pseudo-terminal, so the live display is on); then its report once more."""
    root = tmp_path_factory.mktemp("report_study")
    out = root / "smoke"
    # cwd: MLflow's default artifact root is ./mlruns; keep it out of the repository
    rc, screen = run_in_terminal([sys.executable, "-m", "study.launch", "--grid", "smoke", "--strategies", "full,top",
                                  "--num-samples", "2", "--seeds", "1", "--cohort", tiny_cohort, "--output", out],
                                 cwd=root, timeout=600)
    assert rc == 0, screen[-4000:]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        report = write_report(out)  # a second time (the launcher wrote it first): registering must be idempotent
    finally:
        os.chdir(cwd)
    saved = json.loads((out / "study.json").read_text())
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_run(saved["parent_run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{saved['parent_run_id']}'", max_results=1000)
    return {"screen": screen, "report": report, "saved": saved, "client": client, "runs": runs,
            "data": strict_loads((report / "report.json").read_text())}


def _refuse(constant: str) -> None:
    raise AssertionError(f"report.json holds {constant}, which strict JSON parsers reject")


def strict_loads(text: str) -> object:
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as a browser's JSON.parse and jq do."""
    return json.loads(text, parse_constant=_refuse)


def _cell_ids(saved: dict) -> list[str]:
    return [f"{c['pretrain']}__{c['strategy']}__{c['backbone']}" for c in saved["plan"]["cells"]]


def _expected_best(runs: list) -> dict[str, object]:
    """Independently: per cell, the completed search-phase fine-tuning run with the highest final score."""
    best = {}
    for r in runs:
        t = r.data.tags
        if t.get("stage") == "finetune" and t.get("phase") == "search" and t.get("outcome") == "completed":
            if t["cell"] not in best or r.data.metrics["score"] > best[t["cell"]].data.metrics["score"]:
                best[t["cell"]] = r
    return best


def _same_config(a, b) -> bool:
    def config(r):
        return {k: v for k, v in r.data.params.items()
                if k.startswith(("train.", "strategy_params.")) and k != "train.seed"}
    return config(a) == config(b)


def test_report_lists_every_cell_with_the_numbers_mlflow_holds(study) -> None:
    data, runs = study["data"], study["runs"]
    cells = {c["cell"]: c for c in data["cells"]}
    assert set(_cell_ids(study["saved"])) <= set(cells)
    best = _expected_best(runs)
    assert best, "the smoke study finished no fine-tuning trial"
    md = (study["report"] / "report.md").read_text()
    for cell_id, run in best.items():
        entry = cells[cell_id]
        assert entry["best_run_id"] == run.info.run_id and cell_id in md
        assert entry["score"] == run.data.metrics["score"]
        seeds = [r for r in runs if r.data.tags.get("phase") == "seeds" and r.data.tags.get("cell") == cell_id
                 and r.data.tags.get("outcome") == "completed" and _same_config(r, run)]
        assert sorted(entry["seed_run_ids"]) == sorted(r.info.run_id for r in seeds)
        for key in COLUMNS:
            assert entry["best"][key] == run.data.metrics.get(key), (cell_id, key)
            values = [r.data.metrics[key] for r in [run, *seeds] if key in r.data.metrics]
            stats = entry["stats"][key]
            assert stats["n"] == len(values)
            if values:
                assert stats["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        accuracy = run.data.metrics["test_accuracy"]
        assert f"{statistics.fmean([accuracy, *(r.data.metrics['test_accuracy'] for r in seeds)]):.3f}" in md
    counts = {}
    for r in runs:
        if r.data.tags.get("stage") == "finetune":
            counts[r.data.tags["outcome"]] = counts.get(r.data.tags["outcome"], 0) + 1
    reported = {}
    for c in data["cells"]:
        for k, v in c["counts"].items():
            k = k.removeprefix("seed re-runs ")
            reported[k] = reported.get(k, 0) + v
    assert reported == counts
    assert len(data["failed"]) == sum(r.data.tags.get("outcome") == "failed" for r in runs)


def test_every_image_is_a_valid_png(study) -> None:
    plots = sorted((study["report"] / "plots").glob("*"))
    names = {p.name for p in plots}
    assert {"pareto_memory.png", "pareto_time.png", "heatmap_segresnet.png", "curves.png"} <= names
    for p in plots:
        assert p.read_bytes()[:8] == PNG, p
        image = matplotlib.image.imread(p)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50 and float(image.std()) > 0.01, p


def test_importances_or_a_note_for_every_cell(study) -> None:
    data = study["data"]
    plots = {p.name for p in (study["report"] / "plots").glob("importance_*.png")}
    for cell_id in _cell_ids(study["saved"]):
        assert f"importance_{cell_id}.png" in plots or any(n.startswith(cell_id + ":") for n in data["importance_notes"])


def test_best_configs_load_back_with_the_same_cells_and_params(study) -> None:
    plan = load_grid_file(study["report"] / "best_configs.yaml")
    best = _expected_best(study["runs"])
    assert {c.id for c in plan.cells} == set(best)
    saved = study["saved"]["plan"]
    assert plan.input_size == tuple(saved["input_size"]) and plan.spacing_mm == saved["spacing_mm"]
    assert plan.finetune_epochs == saved["finetune_epochs"] and plan.width == saved["width"]
    for cell in plan.cells:
        params = best[cell.id].data.params
        train = {k.removeprefix("train."): float(v) for k, v in params.items()
                 if k.removeprefix("train.") in ("lr_encoder", "lr_decoder", "lr_heads", "weight_decay")}
        assert cell.params["train"] == train
        strategy = {k.removeprefix("strategy_params."): v for k, v in params.items() if k.startswith("strategy_params.")}
        assert {k: str(v) for k, v in cell.params["strategy_params"].items()} == strategy


def _rerun_cells(cells: list[dict]) -> list[dict]:
    """Two cells of ``best_configs.yaml``: one without and one with pre-training where there are both."""
    scratch = [c for c in cells if c["pretrain"] == "none"][:1]
    pretrained = [c for c in cells if c["pretrain"] != "none"][:1]
    return (scratch + pretrained) if scratch and pretrained else cells[:2]


def test_best_configs_rerun_through_the_launcher_with_the_same_hyperparameters(study, tiny_cohort) -> None:
    """``--grid best_configs.yaml`` (trimmed to 2 cells) runs the same cells with the best trials' values fixed."""
    root = study["report"].parent.parent  # beside the first study: the pre-training cache is shared
    grid = yaml.safe_load((study["report"] / "best_configs.yaml").read_text())
    grid["cells"] = _rerun_cells(grid["cells"])
    trimmed = root / "best_configs_2_cells.yaml"
    trimmed.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = root / "rerun"
    cwd = os.getcwd()
    os.chdir(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_study(build_parser().parse_args(["--grid", str(trimmed), "--num-samples", "1", "--seeds", "0",
                                             "--cohort", str(tiny_cohort), "--output", str(out)]))
    finally:
        ray.shutdown()
        os.chdir(cwd)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    every = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                               max_results=1000)
    runs = [r for r in every if r.data.tags.get("stage") == "finetune"]
    # the pre-training checkpoint came from the first study's cache: the claims say its cost was measured there
    cached = [r for r in every if r.data.tags.get("stage") == "pretrain"]
    assert cached and all(r.data.metrics["cache_hit"] == 1.0 for r in cached)
    assert "came from the pre-training cache" in _cache_note(cached)
    assert _cache_note([r for r in study["runs"] if r.data.tags.get("stage") == "pretrain"]) == ""
    expected = {f"{c['pretrain']}__{c['strategy']}__{c['backbone']}" for c in grid["cells"]}
    assert len(expected) == 2 and sorted(r.data.tags["cell"] for r in runs) == sorted(expected)
    best = _expected_best(study["runs"])

    def fixed(run) -> dict[str, str]:  # what the grid file fixes: training and strategy hyperparameters
        return {k: v for k, v in run.data.params.items()
                if (k.startswith("train.") and k != "train.seed") or k.startswith("strategy_params.")}

    for run in runs:
        assert run.data.tags.get("outcome") != "failed", run.data.tags.get("failure_reason")
        want = fixed(best[run.data.tags["cell"]])
        assert "train.lr_encoder" in want and fixed(run) == want, run.data.tags["cell"]


def test_registry_holds_the_best_model_of_every_cell(study, tiny_cohort) -> None:
    client, best = study["client"], _expected_best(study["runs"])
    experiment = client.get_experiment(best[next(iter(best))].info.experiment_id).name
    image = next((tiny_cohort.parent / "images").glob("*.nii.gz"))
    for cell_id, run in best.items():
        name = registered_name(experiment, cell_id)
        version = client.get_model_version_by_alias(name, "best")
        assert version.run_id == run.info.run_id
        assert len(client.search_model_versions(f"name='{name}'")) == 1  # the report ran twice
        target = study["report"].parent / "dl" / cell_id
        target.mkdir(parents=True)
        local = client.download_artifacts(run.info.run_id, "model", str(target))
        model, info = load_model_folder(local)
        assert info["cell"] == cell_id and info["spacing_mm"] == study["saved"]["plan"]["spacing_mm"]
        pred = predict_image(model, image, info["spacing_mm"], info["input_size"])
        assert pred.segmentation.shape == (16, 16, 16)


def test_report_is_logged_to_the_parent_run(study) -> None:
    client = study["client"]
    listed = {Path(f.path).name for f in client.list_artifacts(study["saved"]["parent_run_id"], "report")}
    assert {"report.html", "report.md", "report.json", "best_configs.yaml", "plots"} <= listed


def _browser(exe: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_renders_tables_and_every_image_in_chromium(study, chromium, tmp_path) -> None:
    page = study["report"] / "report.html"
    html = page.read_text()
    assert "src=\"data:image/png;base64," in html and "plots/" not in html.split("<pre>")[0]  # self-contained
    proc = _browser(chromium, "--virtual-time-budget=10000", "--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-images="loaded"' in dom, dom[:500]
    assert f'data-image-count="{html.count("<img ")}"' in dom
    assert dom.count("<table") >= 2 and "none__full__segresnet" in dom
    shot = tmp_path / "shot.png"
    _browser(chromium, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "profile2")
    pixels = matplotlib.image.imread(shot)
    assert float(pixels.std()) > 0.05  # not a blank page


def test_report_leads_with_the_verdict_and_carries_intervals_for_every_cell(study) -> None:
    """The first section is the verdict (the cell chosen on validation, the set that may be best, its
    confirmation on test) and the forest plot; report.json has the statistics of every cell with a finished
    trial; a claim with fewer than 3 runs per side reads "not resolved: needs repeats"."""
    data, report = study["data"], study["report"]
    verdict = data["verdict"]
    assert verdict["best"] in {c["cell"] for c in data["cells"]}
    assert verdict["reference"] == "none__full__segresnet"
    chosen = data["selection"]["best"]
    assert verdict["text"][0].startswith(f"Chosen on validation: {chosen}, ")
    # two runs per cell (the search's and one seed re-run): the choice rests on one repeat; nothing is excluded
    assert data["selection"]["runs"][chosen] == 1 and data["selection"]["chosen_from"] == "repeats"
    assert "not resolved: needs repeats" in verdict["text"][1]
    assert "not confirmed on test" in verdict["text"][2] and "Primary comparison" in verdict["text"][2]
    assert data["confirmation"]["status"] == "no confirmation runs"
    assert not any("P(best)" in t or "Wilcoxon" in t for t in verdict["text"])
    subjects = verdict["test_subjects"]
    assert subjects == 2  # the tiny cohort's test split: far too small, and the report says so
    assert verdict["too_small_to_separate"] and any(t.startswith("Warning: the test split") for t in verdict["text"])
    finished = [c for c in data["cells"] if c["best_run_id"]]
    assert finished and all("statistics" in c for c in finished)
    for c in finished:
        st = c["statistics"]
        for metric in ("score", "dice"):
            lo, hi = st["ci"][metric]
            assert lo <= st["estimate"][metric] <= hi, (c["cell"], metric)
        assert st["runs"] == 2  # the best trial and its seed re-run, resampled together
        if c["cell"] != verdict["reference"]:
            assert set(st["vs_reference"]) == {"score", "dice", "auc"}
        assert 1 <= c["rank"]["ci"][0] <= c["rank"]["rank"] <= c["rank"]["ci"][1] <= len(finished)
    assert [c["claim"] for c in data["claims"]][3] == "LoRA is weaker on this small-region task"
    assert all(c["kind"] == "exploratory" for c in data["claims"])
    tested = [c for c in data["claims"] if c["status"] != "not tested"]
    assert tested and all(c["status"] == "not resolved: needs repeats" for c in tested if "Dice" in c["evidence"])
    html = (report / "report.html").read_text()
    first = html.index('<section id="verdict">')
    assert first < html.index("<h2>Ranking with confidence intervals") < html.index("<h2>The study</h2>")
    assert "forest plot" in html[first:html.index("</section>")] and (report / "plots" / "forest.png").is_file()
    md = (report / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Ranking") < md.index("## The source study's findings, tested")


def test_cells_that_did_not_learn_are_named_apart_from_worse_ones(study) -> None:
    """Every finished cell says whether it learned within the budget: its mean validation score over its runs
    (read back from MLflow here) against the chance score its best run logged plus LEARN_MARGIN; the verdict
    lists the cells that did not, and the ranking marks them."""
    from study.evidence.verdict import LEARN_MARGIN

    data, client = study["data"], study["client"]
    finished = [c for c in data["cells"] if c["best_run_id"]]
    expected = {}
    for c in finished:
        runs = [client.get_run(r) for r in [c["best_run_id"], *c["seed_run_ids"]]]
        mean = statistics.fmean(r.data.metrics["score"] for r in runs)
        chance = runs[0].data.metrics["val_chance_score"]
        assert 0.0 <= chance <= 1.0 and c["chance_score"] == pytest.approx(chance)
        expected[c["cell"]] = mean >= chance + LEARN_MARGIN
        assert c["learned"] is expected[c["cell"]]
    idle = sorted(k for k, v in expected.items() if not v)
    assert data["verdict"]["did_not_learn"] == idle
    lines = [t for t in data["verdict"]["text"] if "did not learn within the budget" in t]
    assert len(lines) == (1 if idle else 0) and all(cell in lines[0] for cell in idle)
    md = (study["report"] / "report.md").read_text()
    assert md.count("(did not learn)") == len(idle)


def test_terminal_shows_the_live_table_once_and_none_of_rays_console_output(study) -> None:
    """The screen of the study run in a terminal: the study's live table drawn once, counts that add up, an
    ETA that is a duration; Ray's and Tune's own console output is in study.log, not on the screen."""
    screen = study["screen"]
    ray_output = ("Token authentication", "Started a local Ray instance", "Configuration for experiment",
                  "Number of trials", "View detailed results", "TensorBoard")
    assert [s for s in ray_output if s in screen] == [], screen[-4000:]
    log = (study["report"].parent / "study.log").read_text()
    assert "Configuration for experiment" in log and "TensorBoard" in log  # kept, in the log
    assert screen.count("study progress") == 1, screen
    done, active, waiting, cells = map(int, re.search(
        r"cells\s*│\s*(\d+) done, (\d+) in progress, (\d+) waiting \(of (\d+)\)", screen).groups())
    assert (done, active, waiting) == (cells, 0, 0) and cells == 4
    ended, total = map(int, re.search(r"trials\s*│\s*(\d+)/(\d+) ended", screen).groups())
    plan = study["saved"]["plan"]
    assert ended == total == 1 + cells * (plan["num_samples"] + plan["seeds"])  # one pre-training job
    assert re.search(r"pre-training\s*│\s*1/1 jobs done, 0 running", screen)
    elapsed, eta = re.search(r"elapsed / eta\s*│\s*(\S+(?: \d+s)?) / (\S+)", screen).groups()
    assert re.fullmatch(r"\d+s|\d+m \d\ds", elapsed) and eta in ("0s", "–"), (elapsed, eta)
    assert not re.search(r"-\d+ (waiting|pending|running)", screen)
    assert "Best trial per cell (4/4 cells)" in screen


def test_printed_mlflow_url_opens_the_runs_table_with_the_parent_run(study, chromium, tmp_path) -> None:
    """The launcher's last lines: the `mlflow ui` command and the URL of the study's runs; served as printed
    and opened in headless Chromium, the page is the runs table (not MLflow 3's GenAI view) with the
    study's parent run in it."""
    screen, client, saved = study["screen"], study["client"], study["saved"]
    command = re.search(r"MLflow UI: (mlflow ui --backend-store-uri \S+)", screen).group(1)
    url = re.search(r"study runs: (\S+)", screen).group(1)
    parent = client.get_run(saved["parent_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert url == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(Path(sys.executable).parent / a) if i == 0 else a for i, a in enumerate(command.split())]
    server = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, 120, "the MLflow UI to answer", interval=0.5)
        page = url.replace("http://127.0.0.1:5000", f"http://127.0.0.1:{port}")
        link = f'href="#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"'

        def rendered() -> str:
            dom = _browser(chromium, "--virtual-time-budget=20000", "--dump-dom", page,
                           profile=tmp_path / "profile").stdout
            return dom if link in dom else ""

        dom = wait_for(rendered, 180, "the runs table to list the study's parent run", interval=1)
        row = dom[dom.index(link):dom.index(link) + 400]
        assert f">{parent.info.run_name}</span>" in row, row
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# -- a hand-written study in a real MLflow SQLite store: seeds, failures, bad input ---------------
def _hand_study(folder: Path, runs: list[dict], args: dict | None = None) -> Path:
    """study.json (with the launcher's ``args``) + mlflow.db with a parent run and the given child runs."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study-hand-x", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"stage": "study"}).info.run_id
    for r in runs:
        tags = {"mlflow.parentRunId": parent, "stage": "finetune", "backbone": "segresnet", **r["tags"]}
        run_id = client.create_run(exp, tags=tags).info.run_id
        for k, v in r.get("params", {}).items():
            client.log_param(run_id, k, v)
        for k, v in r.get("metrics", {}).items():
            for step, value in enumerate(v if isinstance(v, list) else [v], start=1):
                client.log_metric(run_id, k, value, step=step)
        client.set_terminated(run_id, "FAILED" if tags.get("outcome") == "failed" else "FINISHED")
    cells = [{"pretrain": "none", "strategy": s, "backbone": "segresnet"} for s in ("full", "top")]
    plan = {"name": "hand", "cells": cells, "num_samples": 3, "finetune_epochs": 2, "spacing_mm": 4.0,
            "input_size": [16, 16, 16], "width": 8, "seeds": 2}
    (folder / "study.json").write_text(json.dumps({"args": args or {}, "parent_run_id": parent, "plan": plan}))
    return folder


def _run(cell: str, phase: str, outcome: str, score: float, acc: float, lr: str = "0.001", **extra) -> dict:
    metrics = {"score": [score / 2, score], "test_accuracy": acc, "peak_memory_mb": 100.0, "time_per_epoch_s": 1.0}
    return {"tags": {"cell": cell, "pretrain": "none", "strategy": cell.split("__")[1], "phase": phase,
                     "outcome": outcome, **extra}, "params": {"train.lr_encoder": lr, "train.seed": str(acc)},
            "metrics": metrics if outcome != "failed" else {}}


def test_seeds_failures_and_early_stops_from_a_hand_written_study(tmp_path) -> None:
    full = "none__full__segresnet"
    reason = "NonFiniteLossError: training loss is nan at batch 0: the trial diverged"
    folder = _hand_study(tmp_path / "hand", [
        _run(full, "search", "completed", 0.6, 0.7),
        _run(full, "search", "completed", 0.4, 0.9, lr="0.01"),
        _run(full, "search", "stopped_early", 0.8, 0.95, lr="0.02"),  # higher score, but not finished
        _run(full, "seeds", "completed", 0.5, 0.8),
        _run(full, "seeds", "completed", 0.55, 0.6),
        _run(full, "seeds", "completed", 0.9, 0.1, lr="0.01"),  # another configuration: not counted
        _run(full, "search", "failed", 0.0, 0.0, lr="0.5", failure_reason=reason),
        _run("none__top__segresnet", "search", "failed", 0.0, 0.0, failure_reason="RuntimeError: boom"),
    ])
    report = write_report(folder, register=False)
    data = strict_loads((report / "report.json").read_text())
    cells = {c["cell"]: c for c in data["cells"]}
    acc = cells[full]["stats"]["test_accuracy"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(statistics.fmean([0.7, 0.8, 0.6]))
    assert acc["std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.6]))
    assert cells[full]["counts"] == {"completed": 2, "stopped_early": 1, "failed": 1, "seed re-runs completed": 3}
    assert cells["none__top__segresnet"]["best_run_id"] is None
    assert sorted(f["reason"] for f in data["failed"]) == sorted([reason, "RuntimeError: boom"])
    md, html = (report / "report.md").read_text(), (report / "report.html").read_text()
    assert "Failed trials (2)" in md and reason in md and "RuntimeError: boom" in html
    assert "0.700 ± 0.100 (n=3)" in md
    plan = load_grid_file(report / "best_configs.yaml")
    assert [c.id for c in plan.cells] == [full] and plan.cells[0].params["train"] == {"lr_encoder": 0.001}
    assert plan.seeds == 2 and plan.input_size == (16, 16, 16)


def _report_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.report", str(folder)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["empty folder", "no mlflow.db", "no finished trial"])
def test_bad_study_folder_is_one_line_and_exit_2(tmp_path, case) -> None:
    folder = tmp_path / "study"
    if case == "empty folder":
        folder.mkdir()
    elif case == "no mlflow.db":
        folder.mkdir()
        (folder / "study.json").write_text(json.dumps({"args": {}, "parent_run_id": "abc", "plan": {"cells": []}}))
    else:
        _hand_study(folder, [_run("none__full__segresnet", "search", "failed", 0, 0, failure_reason="x")])
    proc = _report_cli(folder)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "INFO mlflow" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (folder / "report" / "report.html").exists()


def test_importances_handle_conditional_parameters_and_few_trials(tmp_path) -> None:
    storage = optuna_storage(None, tmp_path)
    study = optuna.create_study(study_name="p/cell", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        if trial.suggest_categorical("kind", ["a", "b"]) == "b":
            return -math.log10(lr) + trial.suggest_int("rank", 1, 8)
        return -math.log10(lr)

    study.optimize(objective, n_trials=12)
    importances = cell_importances(storage, "p/cell", min_trials=3)
    assert isinstance(importances, dict) and {"lr", "kind"} <= set(importances)
    assert "fewer than the 20 needed" in cell_importances(storage, "p/cell", min_trials=20)
    assert "no Optuna study" in cell_importances(storage, "p/other", min_trials=3)


def _searched_optuna_study(storage: object, name: str) -> None:
    """A finished Optuna study of 6 trials over two hyperparameters, as the searcher would leave it."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -math.log10(t.suggest_float("lr", 1e-4, 1e-1, log=True)) + t.suggest_int("rank", 1, 8),
                   n_trials=6)


@pytest.mark.parametrize("where", ["--storage", "--optuna-storage URL"])
def test_importances_come_from_where_the_launcher_kept_the_optuna_studies(tmp_path, where) -> None:
    """The journal in the shared ``--storage`` folder (not the output folder), or the ``--optuna-storage`` RDB."""
    folder = tmp_path / "out"
    if where == "--storage":
        shared = tmp_path / "shared"
        shared.mkdir()
        storage, args = optuna_storage(None, shared), {"output": str(folder), "storage": str(shared)}
    else:
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        args = {"output": str(folder), "optuna_storage": storage}
    full = "none__full__segresnet"
    _searched_optuna_study(storage, f"hand/{full}")
    _hand_study(folder, [_run(full, "search", "completed", 0.6, 0.7)], args=args)
    report = write_report(folder, register=False, log_to_mlflow=False)
    notes = json.loads((report / "report.json").read_text())["importance_notes"]
    assert (report / "plots" / f"importance_{full}.png").read_bytes()[:8] == PNG, notes
    assert notes == ["none__top__segresnet: no Optuna study (fixed parameters, or no trial was suggested)"]
    assert not (folder / "optuna.journal").exists()


def test_optuna_location(tmp_path) -> None:
    folder = tmp_path / "runs" / "x"
    assert optuna_location(folder, {"output": "runs/x", "storage": str(tmp_path / "s")}) == tmp_path / "s"
    assert optuna_location(folder, {"output": "runs/x", "storage": None}) == folder
    assert optuna_location(folder, {"output": "runs/x", "storage": "s3://bucket/study"}) == folder  # journal stays local
    assert optuna_location(folder, {"storage": "/a", "optuna_storage": "sqlite:///o.db"}) == "sqlite:///o.db"


def test_launcher_saves_shared_paths_absolute(tmp_path, monkeypatch) -> None:
    """A relative --storage is saved as an absolute path, so --resume and the report find it from anywhere."""
    from study.launch import build_parser, saved_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--grid", "smoke", "--storage", "shared", "--pretrain-cache", "s3://b/c",
                                      "--resume", "x"])
    saved = saved_args(args)
    assert saved["storage"] == str(tmp_path.resolve() / "shared") and saved["pretrain_cache"] == "s3://b/c"
    assert "resume" not in saved and saved["grid"] == "smoke"
    assert optuna_location(tmp_path / "elsewhere", saved) == tmp_path.resolve() / "shared"


def test_pareto_front_keeps_only_undominated_points() -> None:
    costs, gains = [1.0, 2.0, 3.0, 2.5, 1.5], [0.5, 0.7, 0.9, 0.6, 0.5]
    assert pareto_front(costs, gains) == [0, 1, 2]  # (2.5, 0.6) and (1.5, 0.5) are beaten
    assert np.all(np.diff([costs[i] for i in pareto_front(costs, gains)]) > 0)
