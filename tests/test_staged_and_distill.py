"""Staged fine-tuning (lp_ft, gradual) and remapping by distillation (distill, student), on the real training loop.

Staged: in phase one the frozen parts do not change after a step, after the switch they do, the learning rates
ramp up after it, a checkpoint taken in phase one resumes in phase one, and time, memory and trainable counts
are reported per phase. Distillation: on a fixed tiny set the student trained with the teacher's soft targets
ends closer to the teacher's predictions than its label-only twin; the teacher's weights never change; the
student's storage is the student's; and the distillation loss is checked against a direct computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batches

from trainables.backbones import BackboneConfig, build_backbone, state_fingerprint
from trainables.engine import MultiTaskLoss, TrainConfig, fit
from trainables.finetune import STRATEGIES, save_finetuned, task_storage_bytes
from trainables.finetune.distill import DistillStudent, distillation_loss
from trainables.finetune.staged import switch_epoch
from trainables.task import default_task


def _batches(n: int, seed: int) -> list[dict]:
    return tiny_batches(n, seed)


def _staged(name: str, **params):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("segresnet", width=8))
    strategy = STRATEGIES.get(name)
    cfg = strategy.make_config(params)
    model = strategy.apply(model, cfg)
    return model, strategy, cfg


def _snapshot(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefix)}


@pytest.mark.parametrize(("name", "frozen_first"), [("lp_ft", ("encoder.", "decoder.")), ("gradual", ("encoder.",))])
def test_a_staged_strategy_freezes_then_trains_the_body(name: str, frozen_first: tuple[str, ...]) -> None:
    model, strategy, cfg = _staged(name, switch_fraction=0.5, warmup_epochs=1)
    epochs = 4
    schedule = strategy.schedule(model, cfg, epochs)
    assert schedule.switch_epoch == switch_epoch(0.5, epochs) == 2
    start = {p: _snapshot(model, p) for p in frozen_first}
    snapshots, rows = {}, []

    def on_epoch(epoch, metrics, state):
        snapshots[epoch] = {p: _snapshot(model, p) for p in frozen_first}
        rows.append(dict(metrics))

    fit(model, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=epochs, lr_encoder=1e-2, lr_decoder=1e-2),
        spacing_mm=4.0, on_epoch=on_epoch, schedule=schedule)
    for prefix in frozen_first:
        for epoch in (1, 2):  # phase one: the frozen parts are exactly where they started
            assert all(torch.equal(start[prefix][k], v) for k, v in snapshots[epoch][prefix].items()), (prefix, epoch)
        moved = [k for k, v in snapshots[3][prefix].items() if not torch.equal(start[prefix][k], v)]
        assert moved, f"{prefix} did not change after the switch"
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    assert [r["lr_scale"] for r in rows] == [1.0, 1.0, 0.5, 1.0]  # one warm-up epoch after the switch
    last = rows[-1]
    assert last["phase1_trainable_params"] < last["phase2_trainable_params"] == last["trainable_params"]
    assert last["phase1_time_per_epoch_s"] > 0 and last["phase2_time_per_epoch_s"] > 0
    assert last["phase2_peak_memory_mb"] > last["phase1_peak_memory_mb"]  # the body's gradients and Adam state
    assert last["peak_memory_mb"] == max(last["phase1_peak_memory_mb"], last["phase2_peak_memory_mb"])


def test_a_checkpoint_taken_in_phase_one_resumes_in_phase_one() -> None:
    model, strategy, cfg = _staged("lp_ft", switch_fraction=0.5, warmup_epochs=0)
    states = []
    fit(model, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=1), spacing_mm=4.0,
        on_epoch=lambda e, m, state: states.append(state()), schedule=strategy.schedule(model, cfg, 4))
    fresh, strategy, cfg = _staged("lp_ft", switch_fraction=0.5, warmup_epochs=0)
    encoder = _snapshot(fresh, "encoder.")
    rows, after_two = [], {}

    def on_epoch(epoch, metrics, state):
        rows.append(metrics)
        if epoch == 2:
            after_two.update(_snapshot(fresh, "encoder."))

    fit(fresh, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=4), spacing_mm=4.0, resume=states[-1],
        on_epoch=on_epoch, schedule=strategy.schedule(fresh, cfg, 4))
    assert [r["epoch"] for r in rows] == [2, 3, 4] and [r["phase"] for r in rows] == [1, 2, 2]
    assert all(torch.equal(encoder[k], v) for k, v in after_two.items())  # epoch 2 resumed in phase one


def test_a_checkpoint_taken_in_phase_two_resumes_in_phase_two() -> None:
    """The optimiser holds both phases' parameters from the start, so a phase-two checkpoint (Adam state for the
    body) loads into a fresh trial, which goes on training the body at the full rate."""
    model, strategy, cfg = _staged("gradual", switch_fraction=0.25, warmup_epochs=1)
    states = []
    fit(model, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=2), spacing_mm=4.0,
        on_epoch=lambda e, m, state: states.append(state()), schedule=strategy.schedule(model, cfg, 4))
    assert states[-1]["history"][-1]["phase"] == 2
    fresh, strategy, cfg = _staged("gradual", switch_fraction=0.25, warmup_epochs=1)
    rows = []
    fit(fresh, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=4), spacing_mm=4.0, resume=states[-1],
        on_epoch=lambda e, m, state: rows.append(m), schedule=strategy.schedule(fresh, cfg, 4))
    assert [(r["epoch"], r["phase"], r["lr_scale"]) for r in rows] == [(3, 2, 1.0), (4, 2, 1.0)]
    encoder = {k: v for k, v in states[-1]["trained"].items() if k.startswith("encoder.")}
    assert encoder and any(not torch.equal(v, dict(fresh.named_parameters())[k].detach()) for k, v in encoder.items())


def test_the_distillation_loss_is_the_tempered_kl() -> None:
    """Against a direct computation: T^2 KL per voxel over classes, and per hemisphere over [1 - p, p]."""
    g = torch.Generator().manual_seed(0)
    task = default_task()
    s = {"seg": torch.randn(2, 3, 4, 4, 4, generator=g), "cls": torch.randn(2, 2, generator=g)}
    t = {"seg": torch.randn(2, 3, 4, 4, 4, generator=g), "cls": torch.randn(2, 2, generator=g)}
    temperature = 3.0
    p_t, p_s = torch.softmax(t["seg"] / temperature, 1), torch.softmax(s["seg"] / temperature, 1)
    seg = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * temperature**2
    q_t, q_s = torch.sigmoid(t["cls"] / temperature), torch.sigmoid(s["cls"] / temperature)
    cls = (q_t * (q_t.log() - q_s.log()) + (1 - q_t) * ((1 - q_t).log() - (1 - q_s).log())).mean() * temperature**2
    assert distillation_loss(s, t, task, temperature).item() == pytest.approx((seg + cls).item(), rel=1e-5)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A fine-tuned teacher (segresnet width 16, full) saved as a model.pt with its full state."""
    torch.manual_seed(3)
    teacher = STRATEGIES.get("full").apply(build_backbone(BackboneConfig("segresnet", width=16)), None)
    fit(teacher, _batches(3, 0), _batches(1, 1), TrainConfig(epochs=4, lr_encoder=1e-3), spacing_mm=4.0)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_finetuned(teacher, path, backbone_cfg=teacher.config.to_dict(), strategy="full", strategy_cfg={},
                   pretrain_ref=None)
    return str(path), teacher.eval()


def _student(name: str, teacher_path: str, soft_weight: float) -> DistillStudent:
    torch.manual_seed(5)
    base = build_backbone(BackboneConfig("segresnet", width=16))
    strategy = STRATEGIES.get(name)
    params = {"student_width": 0.5}
    if name == "distill":
        params.update(teacher=teacher_path, temperature=2.0, soft_weight=soft_weight)
    return strategy.apply(base, strategy.make_config(params))


def test_the_student_learns_the_teachers_predictions_better_than_its_twin(teacher_file) -> None:
    path, teacher = teacher_file
    before = state_fingerprint(teacher.state_dict())
    probe = _batches(2, 7)
    with torch.no_grad():
        targets = [teacher(b["image"]) for b in probe]

    def distance_to_teacher(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return sum(distillation_loss(model(b["image"]), t, default_task(), 1.0).item()
                       for b, t in zip(probe, targets, strict=True))

    results = {}
    for name, weight in (("distill", 0.9), ("student", 0.0)):
        student = _student(name, path, weight)
        fit(student, _batches(3, 0), _batches(1, 1), TrainConfig(epochs=6, lr_encoder=1e-3, seed=1), spacing_mm=4.0)
        results[name] = distance_to_teacher(student)
        if name == "distill":
            loaded = student._teacher[0]
            assert state_fingerprint(loaded.state_dict()) == before  # the teacher it learned from never changed
    assert results["distill"] < results["student"], results
    assert state_fingerprint(teacher.state_dict()) == before


def test_the_students_storage_and_size_are_the_students(teacher_file) -> None:
    path, teacher = teacher_file
    student = _student("distill", path, 0.5)
    own = sum(p.numel() * p.element_size() for p in student.student.parameters())
    assert task_storage_bytes(student) == own
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in student.student.parameters())
    assert student.student.config.width == 8  # half the teacher's 16
    info = student.metrics()
    assert info["student_total_params"] < info["teacher_total_params"]
    batch = _batches(1, 0)[0]
    student.train()
    out = student(batch["image"])
    assert "aux_loss" in out and out["task_weight"] == pytest.approx(0.5)
    loss = MultiTaskLoss()(out, batch)
    plain = MultiTaskLoss()({"seg": out["seg"], "cls": out["cls"]}, batch)
    assert loss["loss"].item() == pytest.approx(0.5 * plain["loss"].item() + out["aux_loss"].item(), rel=1e-5)
    student.eval()
    assert set(student(batch["image"])) == {"seg", "cls"}  # predicting needs no teacher


def test_a_saved_student_reloads_without_its_teacher(teacher_file, tmp_path) -> None:
    from trainables.finetune import load_finetuned

    path, _ = teacher_file
    student = _student("distill", path, 0.5)
    cfg = STRATEGIES.get("distill").make_config({"student_width": 0.5, "teacher": str(tmp_path / "gone.pt")})
    file = tmp_path / "student.pt"
    save_finetuned(student, file, backbone_cfg=BackboneConfig("segresnet", width=16).to_dict(), strategy="distill",
                   strategy_cfg=cfg, pretrain_ref=None)
    again = load_finetuned(file, None).eval()
    x = _batches(1, 0)[0]["image"]
    with torch.no_grad():
        assert torch.equal(again(x)["seg"], copy.deepcopy(student).eval()(x)["seg"])


# -- the study: grid, searcher ----------------------------------------------------------------------------------
def test_the_grid_crosses_the_twin_with_none_and_needs_each_teacher() -> None:
    from study.plan.grid import select_plan
    from trainables.errors import StudyInputError

    plan = select_plan("full", budget="smoke", methods=["none", "reconstruction"],
                       strategies=["full", "distill", "student"])
    ids = {c.id for c in plan.cells}
    assert "none__student__segresnet" in ids and "reconstruction__student__segresnet" not in ids
    assert {c.teacher_id for c in plan.cells if c.strategy == "distill"} == {
        "none__full__segresnet", "reconstruction__full__segresnet"}
    with pytest.raises(StudyInputError, match="learns from its teacher cell none__full__segresnet, which is not in "
                                              "the grid: add strategy full"):
        select_plan("full", budget="smoke", methods=["none"], strategies=["distill"])


def test_a_student_is_narrower_than_its_teacher_or_its_cell_is_left_out(tmp_path) -> None:
    """The student's width rounds to the backbone's width step; where even the narrowest student would be as wide
    as its teacher (SwinUNETR at its width step, 12), a preset grid leaves the cells out saying why, and a grid
    file naming one is refused in one line."""
    from study.plan.grid import select_plan
    from trainables.errors import StudyInputError
    from trainables.finetune.distill import student_width

    assert [student_width("segresnet", 16, f) for f in (0.25, 0.5)] == [4, 8]
    assert [student_width("segresnet", 8, f) for f in (0.25, 0.5)] == [4, 4]  # at least 4 channels
    assert [student_width("swinunetr", 48, f) for f in (0.25, 0.5)] == [12, 24]  # multiples of 12
    assert student_width("swinunetr", 12, 0.5) == 12

    args = dict(budget="smoke", methods=["none"], strategies=["full", "distill", "student"], input_size=(32, 32, 32))
    plan = select_plan("full", backbones=["swinunetr", "segresnet"], **args)
    assert {c.id for c in plan.cells} == {"none__full__swinunetr", "none__full__segresnet",
                                          "none__distill__segresnet", "none__student__segresnet"}
    assert set(plan.left_out) == {"none__distill__swinunetr", "none__student__swinunetr"}
    assert "narrowest student (width 12) is as wide as its teacher; use --width 24" in plan.left_out[
        "none__distill__swinunetr"]
    wide = select_plan("full", backbones=["swinunetr"], width=24, **args)
    assert not wide.left_out and len(wide.cells) == 3
    with pytest.raises(StudyInputError, match="no cell of the grid can run: on swinunetr at width 12"):
        select_plan("full", backbones=["swinunetr"], **{**args, "strategies": ["student"]})
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nbase: smoke\ninput_size: [32, 32, 32]\ncells:\n"
                    "  - {pretrain: none, strategy: full, backbone: swinunetr}\n"
                    "  - {pretrain: none, strategy: distill, backbone: swinunetr}\n")
    with pytest.raises(StudyInputError, match="cell none__distill__swinunetr: on swinunetr at width 12"):
        select_plan(str(grid))


def test_a_distillation_cell_waits_for_its_teachers_best_model(tmp_path) -> None:
    """The real searcher: the distill cell is suggested only once its teacher cell's search has ended, with the
    teacher's best model; a teacher whose every trial failed leaves the distill cell skipped, and the study ends."""
    from study.plan.grid import Cell, StudyPlan
    from study.run.searcher import StudySearcher

    def run(outcomes: list[dict | None]) -> tuple[StudySearcher, list[dict]]:
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        plan = StudyPlan(name="t", cells=[Cell("none", "full", "segresnet"), Cell("none", "distill", "segresnet")],
                         num_samples=2, finetune_epochs=1, race=False)
        searcher = StudySearcher(
            plan, make_pretrain=lambda m, b: {"stage": "pretrain"},
            make_finetune=lambda cell, ckpt, train, params, seed, phase: {"cell": cell.id, "params": params},
            output=str(folder), study_name="t")
        suggested = []
        for i, result in enumerate(outcomes):
            config = searcher.suggest(f"t{i}")
            suggested.append(config)
            if config not in (None, "FINISHED") and config["cell"] == "none__full__segresnet":
                searcher.on_trial_complete(f"t{i}", result, error=result is None)
        return searcher, suggested

    ok = [{"score": 0.4, "epoch": 1, "model_path": "/m/a.pt"}, {"score": 0.6, "epoch": 1, "model_path": "/m/b.pt"}]
    searcher, suggested = run([*ok, None])
    assert [c["cell"] for c in suggested[:2]] == ["none__full__segresnet"] * 2
    assert suggested[2]["cell"] == "none__distill__segresnet" and suggested[2]["params"]["teacher"] == "/m/b.pt"
    plan_wait = StudyPlan(name="w", cells=[Cell("none", "full", "segresnet"), Cell("none", "distill", "segresnet")],
                          num_samples=2, finetune_epochs=1, race=False)
    (tmp_path / "w").mkdir()
    waiting = StudySearcher(plan_wait, make_pretrain=lambda m, b: {},
                            make_finetune=lambda cell, ckpt, train, params, seed, phase: {"cell": cell.id},
                            output=str(tmp_path / "w"), study_name="w")
    first = [waiting.suggest(f"w{i}") for i in range(3)]
    assert [c["cell"] if c else None for c in first] == ["none__full__segresnet"] * 2 + [None]  # the teacher runs
    searcher, suggested = run([None, None, None])  # every teacher trial fails
    assert searcher.state.skipped == {"none__distill__segresnet": "its teacher cell none__full__segresnet has no "
                                                                  "fine-tuned model"}
    assert suggested[2] == "FINISHED"
