"""External checkpoints: MONAI's and SuPreM-like layouts load by name and shape, the loading report counts
exactly, a wrong width is refused on one line, and a study fine-tunes every strategy from the file.

The checkpoints are written here from MONAI's own classes (``SwinUNETR``'s ``swinViT`` encoder in the layout
of MONAI's self-supervised weights, ``SegResNet`` wrapped by DataParallel) and by this project's own
pre-training cache; the expected counts and fractions are computed from those MONAI networks, not from
the loader.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.networks.nets import SegResNet, SwinUNETR

from trainables.backbones import BackboneConfig, build_backbone, state_fingerprint
from trainables.errors import StudyInputError
from trainables.pretrain.loop import PretrainConfig, cached_pretrain
from trainables.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]


def _monai_segresnet(width: int) -> SegResNet:
    """MONAI's SegResNet as the study builds it (group norm, 4 down / 3 up stages), with its final conv."""
    torch.manual_seed(width)
    return SegResNet(spatial_dims=3, init_filters=width, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4),
                     blocks_up=(1, 1, 1), norm=("GROUP", {"num_groups": 8}))


def _floats(state: dict) -> int:
    return sum(v.numel() for v in state.values() if v.is_floating_point())


def test_monai_self_supervised_swinunetr_weights_load_into_the_encoder(tmp_path):
    """``{"state_dict": {"module.<swinViT key>": ...}}`` plus the SSL heads: every encoder tensor loads, the
    heads are unexpected, the CNN decoder is missing; fractions as MONAI's network counts them."""
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=3, norm_name=("group", {"num_groups": 4}))
    encoder = net.swinViT.state_dict()
    heads = {"module.rotation_head.weight": torch.randn(4, 192), "module.contrastive_head.weight": torch.randn(512, 192)}
    torch.save({"epoch": 100, "state_dict": {**{f"module.{k}": v for k, v in encoder.items()}, **heads}},
               tmp_path / "model_swinvit.pt")
    model = build_backbone(BackboneConfig("swinunetr", 12))
    body, report = load_pretrained(tmp_path / "model_swinvit.pt", model)
    native = {k: v for k, v in net.state_dict().items() if not k.startswith("out.")}  # the body in MONAI's names
    assert report.loaded == len(encoder)
    assert sorted(report.unexpected) == sorted(heads)
    assert len(report.missing) == len(native) - len(encoder) and not report.mismatched
    assert report.encoder_loaded_fraction == 1.0
    assert report.loaded_fraction == pytest.approx(_floats(encoder) / _floats(native))
    model.load_body(body)
    for ours, theirs in model.native_keys.items():
        if theirs.startswith("swinViT."):
            assert torch.equal(model.state_dict()[ours], encoder[theirs.removeprefix("swinViT.")]), ours


def test_a_dataparallel_segresnet_loads_whole_and_a_partial_one_counts_exactly(tmp_path):
    """MONAI's SegResNet saved from DataParallel under ``model``: all 79 body tensors load with MONAI's values;
    without its up-sampling path the report counts exactly the tensors taken away."""
    net = _monai_segresnet(8)
    state = net.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, tmp_path / "full.pth")
    model = build_backbone(BackboneConfig("segresnet", 8))
    body, report = load_pretrained(tmp_path / "full.pth", model)
    final = [k for k in state if k.startswith("conv_final.")]
    assert report.loaded == len(state) - len(final) and not report.missing and not report.mismatched
    assert sorted(report.unexpected) == sorted(f"module.{k}" for k in final)
    assert report.loaded_fraction == 1.0
    assert all(torch.equal(body[ours], state[theirs]) for ours, theirs in model.native_keys.items())

    dropped = [k for k in state if k.startswith(("up_layers.", "up_samples."))]
    torch.save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "partial.pt")
    body, report = load_pretrained(tmp_path / "partial.pt", model)
    assert len(report.missing) == len(dropped) and report.loaded == len(state) - len(final) - len(dropped)
    assert report.encoder_loaded_fraction == 1.0
    kept = {k: v for k, v in state.items() if k not in dropped and not k.startswith("conv_final.")}
    assert report.loaded_fraction == pytest.approx(_floats(kept) / _floats({k: state[k] for k in model.native_keys.values()}))
    own = model.state_dict()  # what the checkpoint lacks keeps the network's own initialisation
    assert all(torch.equal(body[ours], own[ours]) for ours, theirs in model.native_keys.items() if theirs in dropped)


def test_a_checkpoint_of_another_width_is_refused_on_one_line(tmp_path):
    torch.save(_monai_segresnet(16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(StudyInputError) as info:
        load_pretrained(tmp_path / "wide.pt", build_backbone(BackboneConfig("segresnet", 8)))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "wide.pt") in message
    assert "loads 0% of segresnet's encoder" in message and "another width than 8" in message


def test_this_projects_pretraining_cache_loads_as_a_folder(tmp_path):
    """A checkpoint of the project's own pre-training cache (``cached_pretrain``), given as its folder."""
    backbone = BackboneConfig("segresnet", 8)
    body_file, _ = cached_pretrain(tmp_path / "cache", backbone, PretrainConfig(method="none", epochs=1), [], "data")
    model = build_backbone(backbone)
    body, report = load_pretrained(body_file.parent, model)
    assert report.loaded_fraction == 1.0 and not report.unexpected and not report.missing
    assert state_fingerprint(body) == state_fingerprint(torch.load(body_file, weights_only=True))


@pytest.mark.slow
def test_a_study_with_an_external_checkpoint_and_two_label_fractions(tmp_path):
    """``--pretrained mine=FILE --label-fractions 0.5,1.0`` on the smoke grid. The external method joins every
    strategy; each of its runs is tagged with the file's sha256, logs the loaded fraction and starts from
    the file's weights; the parent run holds the loading report. Every cell runs at both fractions on
    nested training subjects (the same per fraction), tagged; the report draws one point per fraction per
    method and words the label-efficiency verdict. A file of the wrong width stops the launcher first."""
    net = _monai_segresnet(8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "mine.pth")
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "study.launch", "--grid", "smoke", "--methods", "none", "--strategies", "full,top",
            "--pretrained", f"mine={tmp_path / 'mine.pth'}", "--label-fractions", "0.5,1.0", "--output", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pretrained mine: " in proc.stdout and "79 tensors loaded, 0 missing, 4 unexpected" in proc.stdout
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study-smoke-study")
    runs = client.search_runs([experiment.experiment_id])
    finetune = [r for r in runs if r.data.tags.get("stage") == "finetune"]
    mine = [r for r in finetune if r.data.tags.get("pretrain") == "mine"]
    assert sorted(r.data.tags["cell"] for r in mine) == ["mine__full__segresnet", "mine__full__segresnet__f0.5",
                                                         "mine__top__segresnet", "mine__top__segresnet__f0.5"]
    digest = hashlib.sha256((tmp_path / "mine.pth").read_bytes()).hexdigest()
    model = build_backbone(BackboneConfig("segresnet", 8))
    expected = {ours: net.state_dict()[theirs] for ours, theirs in model.native_keys.items()}
    for run in mine:
        assert run.data.tags["pretrained_sha256"] == digest
        assert run.data.metrics["pretrained_loaded_fraction"] == 1.0
        assert run.data.tags["initial_body_sha256"] == state_fingerprint(expected)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    report = client.download_artifacts(parent.info.run_id, "pretrained/mine__segresnet.json", str(tmp_path))
    assert json.loads(Path(report).read_text())["sha256"] == digest

    subjects: dict[float, set] = {}
    for run in finetune:
        tags, params = run.data.tags, run.data.params
        fraction = float(tags["fraction"])
        assert params["data.train_fraction"] == str(fraction) and tags["cell"].endswith("__f0.5") == (fraction == 0.5)
        subjects.setdefault(fraction, set()).add(tags["train_subjects"])
        assert int(params["labelled_subjects"]) == len(tags["train_subjects"].split(","))
    assert set(subjects) == {0.5, 1.0} and all(len(s) == 1 for s in subjects.values())  # same subjects per fraction
    half, full = (set(next(iter(subjects[f])).split(",")) for f in (0.5, 1.0))
    assert half < full and len(half) == 2 and len(full) == 4

    from study.evidence.verdict import label_verdict
    from study.report import compare_cells, label_efficiency, load_study

    study = load_study(out)
    comparison = compare_cells(study)
    curves = label_efficiency(study, comparison)
    assert set(curves) == {("full", "segresnet"), ("top", "segresnet")}
    for lines in curves.values():
        assert {m: [p[0] for p in pts] for m, pts in lines.items()} == {"none": [2.0, 4.0], "mine": [2.0, 4.0]}
    lines = label_verdict(study.cells, comparison)
    assert lines and all(line.startswith("Label efficiency: ") for line in lines)
    text = (out / "report" / "report.md").read_text()
    assert "plots/label_efficiency.png" in text and lines[-1] in text

    torch.save(_monai_segresnet(16).state_dict(), tmp_path / "wide.pt")
    argv[argv.index(f"mine={tmp_path / 'mine.pth'}")] = f"wide={tmp_path / 'wide.pt'}"
    argv[-1] = str(tmp_path / "refused")
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "wide.pt loads 0% of segresnet's encoder" in proc.stderr
    assert not (tmp_path / "refused" / "mlflow.db").exists()


def test_a_grid_file_names_checkpoints_relative_to_itself(tmp_path):
    """``pretrained:`` in a grid file: paths relative to the file; its cells use the name; a name that is a
    registered method is refused on one line."""
    from study.plan.grid import select_plan

    (tmp_path / "weights").mkdir()
    torch.save(_monai_segresnet(8).state_dict(), tmp_path / "weights" / "seg.pt")
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: smoke\npretrained:\n  seg_ext: weights/seg.pt\ncells:\n"
                    "  - {pretrain: seg_ext, strategy: lora}\n  - {pretrain: none, strategy: full}\n")
    plan = select_plan(str(grid))
    assert plan.pretrained == {"seg_ext": str((tmp_path / "weights" / "seg.pt").resolve())}
    assert plan.external_jobs() == [("seg_ext", "segresnet")] and plan.pretrain_jobs() == []
    grid.write_text(grid.read_text().replace("seg_ext", "contrastive"))
    with pytest.raises(StudyInputError, match="pretrained name 'contrastive' is a registered pre-training method"):
        select_plan(str(grid))


def test_study_json_keeps_checkpoint_paths_absolute(tmp_path, monkeypatch):
    """``--resume`` from another folder must find the same files: saved arguments hold absolute paths."""
    from study.launch import build_parser, saved_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--pretrained", "mine=weights/seg.pt", "--label-fractions", "0.5,1"])
    saved = saved_args(args)
    assert saved["pretrained"] == [f"mine={tmp_path.resolve() / 'weights' / 'seg.pt'}"]
    assert saved["label_fractions"] == "0.5,1"
