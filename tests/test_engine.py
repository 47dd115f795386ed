"""The Ray-free training core: a short run lowers the loss, metrics and costs are reported, NaN raises."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batches

from trainables.backbones import BackboneConfig, build_backbone
from trainables.engine import MultiTaskLoss, NonFiniteLossError, TrainConfig, fit, make_optimizer, train_epoch
from trainables.errors import StudyInputError


def _batches(n: int, seed: int) -> list[dict]:
    return tiny_batches(n, seed)


def test_short_training_lowers_loss_and_reports_costs() -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("segresnet", width=8))
    seen = []
    result = fit(model, _batches(3, 0), _batches(1, 1), TrainConfig(epochs=4, lr_encoder=1e-3), spacing_mm=4.0,
                 test_loader=_batches(1, 2), on_epoch=lambda e, m, state: seen.append((e, m, state())))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert [e for e, _, _ in seen] == [1, 2, 3, 4]
    final = result.final
    for key in ("val_dice", "val_accuracy", "val_auc", "score", "test_dice", "test_hd95", "time_per_epoch_s",
                "test_seconds_per_volume", "peak_memory_mb", "trainable_params", "volumes_per_s"):
        assert key in final, key
    assert final["trainable_fraction"] == 1.0
    assert final["peak_memory_mb"] > 10
    assert seen[-1][2]["epoch"] == 4 and "optimizer" in seen[-1][2]


def test_resume_continues_after_the_saved_epoch() -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("segresnet", width=8))
    states = []
    fit(model, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=2), spacing_mm=4.0,
        on_epoch=lambda e, m, state: states.append(state()))
    torch.manual_seed(0)
    fresh = build_backbone(BackboneConfig("segresnet", width=8))
    epochs = []
    fit(fresh, _batches(2, 0), _batches(1, 1), TrainConfig(epochs=3), spacing_mm=4.0,
        on_epoch=lambda e, m, state: epochs.append(e), resume=states[-1])
    assert epochs == [3]


def test_nan_loss_raises() -> None:
    model = build_backbone(BackboneConfig("segresnet", width=8))
    bad = _batches(1, 0)
    bad[0]["image"][:] = float("nan")
    with pytest.raises(NonFiniteLossError):
        fit(model, bad, _batches(1, 1), TrainConfig(epochs=1), spacing_mm=4.0)


def test_memory_sampler_stops_however_fit_ends() -> None:
    """A reused Ray worker runs trial after trial: a sampler thread left behind by a failed or stopped trial
    would keep polling and slow every later one."""
    import threading

    def samplers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if "_sample" in str(getattr(t, "_target", ""))}

    before = samplers()  # an earlier test's sampler may still be ending: only threads started here count
    model = build_backbone(BackboneConfig("segresnet", width=8))

    def stop(epoch, metrics, state):
        raise KeyboardInterrupt("stopped by the scheduler")

    with pytest.raises(KeyboardInterrupt):
        fit(model, _batches(1, 0), _batches(1, 1), TrainConfig(epochs=2), spacing_mm=4.0, on_epoch=stop)
    bad = _batches(1, 0)
    bad[0]["image"][:] = float("nan")
    with pytest.raises(NonFiniteLossError):
        fit(model, bad, _batches(1, 1), TrainConfig(epochs=1), spacing_mm=4.0)
    # close() joins the thread, so none started by these fits is alive once fit has returned or raised
    assert not samplers() - before


def test_learning_rates_per_part() -> None:
    model = build_backbone(BackboneConfig("unet", width=8))
    opt = make_optimizer(model, TrainConfig(lr_encoder=1e-5, lr_decoder=2e-4, lr_heads=3e-3))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"encoder": 1e-5, "decoder": 2e-4, "heads": 3e-3}
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    assert sum(p.numel() for g in opt.param_groups if g["name"] == "encoder" for p in g["params"]) == n_enc


def test_bad_train_config() -> None:
    with pytest.raises(StudyInputError, match="lr_encoder"):
        TrainConfig(lr_encoder=5.0)


def test_cpu_peak_tensor_memory_ranks_linear_probe_below_full_fine_tuning() -> None:
    """On a CPU the peak memory is the profiled tensor memory of a training step, not the process's RSS
    (imported libraries): a linear probe (no gradients or optimiser state for the body, no activations kept
    for its backward) needs less than half of full fine-tuning, which needs at least its weights, their
    gradients and AdamW's two moments (4 x the parameter bytes)."""
    from trainables.finetune import STRATEGIES

    def peak(strategy: str) -> tuple[float, float]:
        torch.manual_seed(0)
        model = build_backbone(BackboneConfig("segresnet", width=8))
        spec = STRATEGIES.get(strategy)
        model = spec.apply(model, spec.make_config({}))
        row = train_epoch(model, _batches(1, 0), make_optimizer(model, TrainConfig()), MultiTaskLoss(),
                          torch.device("cpu"), measure_memory=True)
        return row["tensor_peak_mb"], sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    full, weights = peak("full")
    linear, _ = peak("linear")
    assert full >= 4 * weights, (full, weights)
    assert 2 * linear <= full, (linear, full)
