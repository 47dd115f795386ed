"""The training recipe's levers (issue 27): the learning-rate schedule against its closed form, the weight
average against an average computed here, the kept epoch, gradient clipping, the head that reads the
segmentation, and every strategy's starting point and searched ranges."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from conftest import tiny_batches
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from trainables.backbones import BackboneConfig, build_backbone
from trainables.engine import Schedule, TrainConfig, fit, lr_factor
from trainables.errors import StudyInputError


def test_warmup_then_cosine_follows_its_closed_form() -> None:
    cfg = TrainConfig(epochs=4, lr_schedule="cosine", warmup_epochs=1)
    factor = lr_factor(cfg, steps_per_epoch=5)
    total, warmup = 20, 5
    for step in range(total):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert factor(step) == pytest.approx(expected)
    assert factor(4) == 1.0 and factor(19) < 0.02  # full rate after the warm-up, near 0 at the end
    assert lr_factor(TrainConfig(epochs=4), 5)(13) == 1.0  # constant without warm-up


def test_a_staged_ramp_multiplies_the_schedule() -> None:
    noop = lambda model: None  # noqa: E731
    staged = Schedule(switch_epoch=2, first=noop, second=noop, warmup_epochs=1)
    factor = lr_factor(TrainConfig(epochs=4), 3, staged)
    assert [factor(s) for s in range(12)] == [1.0] * 6 + [0.5] * 3 + [1.0] * 3  # epoch 3 at half the rate


def _fit(cfg: TrainConfig, seen: list | None = None, model=None):
    torch.manual_seed(0)
    model = model or build_backbone(BackboneConfig("segresnet", width=8))
    result = fit(model, tiny_batches(3, 0), tiny_batches(2, 1), cfg, spacing_mm=4.0, test_loader=tiny_batches(1, 2),
                 on_epoch=(lambda e, m, state: seen.append((m, state()))) if seen is not None else None)
    return model, result


def test_the_rates_a_run_steps_with_are_the_schedules() -> None:
    cfg = TrainConfig(epochs=3, lr_encoder=2e-3, lr_decoder=2e-3, lr_heads=2e-3, lr_schedule="cosine",
                      warmup_epochs=1)
    seen: list = []
    _fit(cfg, seen)
    factor = lr_factor(cfg, 3)
    for epoch, (_, state) in enumerate(seen, start=1):  # the optimiser's rate after the epoch's last step
        assert state["scheduler"]["last_epoch"] == 3 * epoch
        for group in state["optimizer"]["param_groups"]:
            assert group["lr"] == pytest.approx(2e-3 * factor(3 * epoch))


def test_the_weight_average_is_what_is_kept_and_tested() -> None:
    """With ema_decay the kept model is the exponential average of the weights after every step, computed here
    independently from the weights the run stepped through."""
    decay = 0.7
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("segresnet", width=8))
    trajectory: list[dict] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    try:
        _, result = _fit(TrainConfig(epochs=2, ema_decay=decay, keep_epoch="last"), model=model)
    finally:
        handle.remove()
    average = {k: v.clone().float() for k, v in trajectory[0].items()}
    for weights in trajectory[1:]:
        for k, v in weights.items():
            if v.is_floating_point():
                average[k] = decay * average[k] + (1 - decay) * v
    name = "encoder.0.conv_init.weight" if "encoder.0.conv_init.weight" in average else next(
        k for k, v in average.items() if v.dim() == 5)
    assert torch.allclose(model.state_dict()[name], average[name], atol=1e-6)
    assert not torch.allclose(trajectory[-1][name], average[name], atol=1e-6)  # not the last step's weights
    assert result.final["best_epoch"] == 2


def test_keep_last_keeps_the_last_epoch_and_reports_its_score() -> None:
    seen: list = []
    _, result = _fit(TrainConfig(epochs=3, keep_epoch="last"), seen)
    assert result.final["best_epoch"] == 3
    assert result.final["score"] == seen[-1][0]["val_score"]


def test_resume_restores_the_schedule_and_the_average() -> None:
    """A run resumed after epoch 2 steps on with the schedule and the average where the whole run had them
    (the rate of its next step, the count of averaged steps), not from their start."""
    cfg = TrainConfig(epochs=3, ema_decay=0.8, lr_schedule="cosine", warmup_epochs=1, lr_encoder=2e-3)
    whole: list = []
    _fit(cfg, whole)
    torch.manual_seed(0)
    resumed: list = []
    fit(build_backbone(BackboneConfig("segresnet", width=8)), tiny_batches(3, 0), tiny_batches(2, 1), cfg,
        spacing_mm=4.0, resume=whole[1][1], on_epoch=lambda e, m, state: resumed.append(state()))
    mine, theirs = resumed[0], whole[2][1]
    assert mine["scheduler"]["last_epoch"] == theirs["scheduler"]["last_epoch"] == 9
    assert [g["lr"] for g in mine["optimizer"]["param_groups"]] == pytest.approx(
        [g["lr"] for g in theirs["optimizer"]["param_groups"]])
    assert mine["averaged"]["n"] == theirs["averaged"]["n"] == 9
    fresh: list = []
    torch.manual_seed(0)  # without the saved schedule (an older checkpoint) the step is recomputed the same
    older = {k: v for k, v in whole[1][1].items() if k not in ("scheduler", "averaged")}
    fit(build_backbone(BackboneConfig("segresnet", width=8)), tiny_batches(3, 0), tiny_batches(2, 1), cfg,
        spacing_mm=4.0, resume=older, on_epoch=lambda e, m, state: fresh.append(state()))
    assert fresh[0]["scheduler"]["last_epoch"] == 9
    assert [g["lr"] for g in fresh[0]["optimizer"]["param_groups"]] == pytest.approx(
        [g["lr"] for g in theirs["optimizer"]["param_groups"]])


def test_gradient_clipping_bounds_every_step() -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("segresnet", width=8))
    norms: list[float] = []

    def record(opt, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        _fit(TrainConfig(epochs=1, grad_clip_norm=0.05), model=model)
    finally:
        handle.remove()
    assert norms and max(norms) <= 0.05 + 1e-5


@pytest.mark.parametrize("field,value", [("lr_schedule", "step"), ("warmup_epochs", 5), ("ema_decay", 1.0),
                                         ("grad_clip_norm", -1.0), ("keep_epoch", "median")])
def test_bad_recipe_fields_are_refused_by_name(field: str, value) -> None:
    with pytest.raises(StudyInputError, match=field):
        TrainConfig(epochs=5, **{field: value})


@pytest.mark.parametrize("name,size", [("segresnet", 16), ("unet", 16), ("swinunetr", 32)])
def test_the_head_that_reads_the_segmentation(name: str, size: int) -> None:
    """Presence logits move with the segmentation's most confident voxel in each hemisphere, by the head's
    learned weight, and the segmentation itself is not trained by the classification loss."""
    torch.manual_seed(0)
    width = 12 if name == "swinunetr" else 8
    model = build_backbone(BackboneConfig(name, width=width, cls_reads_seg=True)).eval()
    plain = build_backbone(BackboneConfig(name, width=width, cls_reads_seg=False))
    assert set(model.state_dict()) - set(plain.state_dict()) == {"cls_head.seg_weight"}
    head = model.cls_head
    seg = torch.full((1, 3, size, size, size), -5.0)
    seg[:, 0] = 5.0  # background everywhere
    bottleneck = torch.zeros(1, model.stage_channels[model.cls_stage], 2, 2, 2)
    with torch.no_grad():
        base = head(bottleneck, seg)
        seg[0, 1, 1, 3, 3] = 10.0  # one confident left-PCS voxel in the low (left) half of axis 0
        moved = head(bottleneck, seg)
    p = torch.softmax(seg[0, :, 1, 3, 3], 0)[1]
    p0 = torch.softmax(torch.tensor([5.0, -5.0, -5.0]), 0)[1]
    assert float(moved[0, 0] - base[0, 0]) == pytest.approx(float(torch.logit(p, eps=1e-4) - torch.logit(p0, eps=1e-4)),
                                                      rel=1e-4)
    assert float(moved[0, 1]) == pytest.approx(float(base[0, 1]))  # the right hemisphere saw nothing new
    seg.requires_grad_(True)
    head(bottleneck, seg).sum().backward()
    assert seg.grad is None or not seg.grad.any()


def test_every_strategy_starts_its_search_at_its_own_rate() -> None:
    from search_spaces.finetune import LR_FIELDS, first_trial, lr_ranges, train_space
    from trainables.finetune import STRATEGIES

    for name in STRATEGIES.names():
        start = STRATEGIES.get(name).lr_start
        first = first_trial(name)
        assert [first[f] for f in LR_FIELDS] == [start] * 3
        ranges = lr_ranges(name)
        assert all(low < start < high for low, high in ranges.values()), name
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
        study.enqueue_trial(first)
        sampled = [train_space(study.ask(), name) for _ in range(3)]
        assert sampled[0] == first  # the enqueued first trial
        for params in sampled:
            TrainConfig(**params)
            assert all(ranges[f][0] <= params[f] <= ranges[f][1] for f in LR_FIELDS)


def test_the_chance_score_is_that_of_a_model_that_learned_nothing() -> None:
    """Empty segmentation (Dice 1 where a hemisphere has no groove, 0 where it has one) and constant presence
    (balanced accuracy 0.5): the PCS score is 0.5 x the share of empty (subject, class) pairs + 0.25."""
    from trainables.metrics import chance_score

    labels = torch.zeros(4, 1, 16, 16, 16, dtype=torch.long)
    labels[0, 0, 2:4, 5:8, 5:8] = 1  # subject 0: left groove
    labels[1, 0, 12:14, 5:8, 5:8] = 2  # subject 1: right groove
    labels[2, 0, 2:4, 5:8, 5:8] = 1  # subject 2: both
    labels[2, 0, 12:14, 5:8, 5:8] = 2
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    empty_share = 4 / 8  # (subject, class) pairs without a groove
    assert chance_score(labels, truth, 4.0) == pytest.approx(0.5 * empty_share + 0.25)


def test_a_saved_model_rebuilds_the_head_it_was_trained_with(tmp_path) -> None:
    """A model saved with the head that reads the segmentation reloads with it (same outputs); a saved config
    without the field (an earlier version) means the head without it, which is the default."""
    from trainables.finetune.storage import load_finetuned, save_finetuned

    x = torch.randn(1, 1, 16, 16, 16)
    for reads in (True, False):
        torch.manual_seed(0)
        config = BackboneConfig("segresnet", width=8, cls_reads_seg=reads)
        model = build_backbone(config)
        saved = config.to_dict() if reads else {k: v for k, v in config.to_dict().items() if k != "cls_reads_seg"}
        path = tmp_path / f"model-{reads}.pt"
        save_finetuned(model, path, backbone_cfg=saved, strategy="full", strategy_cfg={}, pretrain_ref=None)
        loaded = load_finetuned(path, None).eval()
        assert torch.equal(loaded(x)["cls"], model.eval()(x)["cls"])
        assert hasattr(loaded.cls_head, "seg_weight") is reads


def test_a_head_that_does_not_train_the_body_leaves_its_gradient_at_zero() -> None:
    """cls_trains_body=false: the classification loss reaches the head only; on (the default before), it also
    reaches the encoder."""
    from trainables.engine import MultiTaskLoss

    batch = tiny_batches(1, 0)[0]
    for trains in (True, False):
        torch.manual_seed(0)
        model = build_backbone(BackboneConfig("segresnet", width=8, cls_trains_body=trains))
        MultiTaskLoss(seg_weight=0.0)(model(batch["image"]), batch)["loss"].backward()
        body = [p.grad for p in model.encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        head = [p.grad for p in model.cls_head.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert head and bool(body) is trains
