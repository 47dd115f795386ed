"""Pre-training objectives, loop, cache and search spaces (tiny networks, CPU)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F

from search_spaces import PRETRAIN_SPACES
from search_spaces.pretrain import pretrain_train_space
from trainables.backbones import BACKBONES, BackboneConfig, build_backbone
from trainables.engine import NonFiniteLossError, seed_everything
from trainables.errors import StudyInputError
from trainables.pretrain import PRETRAIN_METHODS, build_objective
from trainables.pretrain.adversarial import AdversarialConfig
from trainables.pretrain.contrastive import ContrastiveConfig, augment_pair, nt_xent
from trainables.pretrain.diffusion import DiffusionConfig
from trainables.pretrain.loop import (
    PretrainConfig,
    cached_pretrain,
    load_checkpoint,
    load_meta,
    make_optimizers,
    pretrain,
    pretrain_key,
    train_step,
)
from trainables.pretrain.masked import masked_loss, random_block_mask
from trainables.pretrain.reconstruction import ReconstructionConfig, ReconstructionLoss

optuna.logging.set_verbosity(optuna.logging.WARNING)
TRAINED = [m for m in PRETRAIN_METHODS.names() if PRETRAIN_METHODS.get(m).trains]
# Smallest shapes each backbone trains at: BasicUNet's instance norm needs > 1 bottleneck voxel (16x16x32
# -> 1x1x2); SwinUNETR needs multiples of 32.
SHAPES = {"unet": (16, 16, 32), "segresnet": (16, 16, 16), "swinunetr": (32, 32, 32)}
WIDTHS = {"unet": 8, "segresnet": 8, "swinunetr": 12}


def smooth_volumes(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Random smooth volumes (blurred noise), z-scored per volume: ``(n, 1, *shape)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *shape, generator=g)
    for _ in range(3):
        x = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    x = x - x.mean(dim=(2, 3, 4), keepdim=True)
    return x / x.std(dim=(2, 3, 4), keepdim=True)


def loader_of(images: torch.Tensor, batch_size: int = 2) -> list[dict]:
    """Batches as the data pipeline yields them (with a label the objectives must ignore)."""
    return [
        {
            "image": images[i : i + batch_size],
            "label": torch.full_like(images[i : i + batch_size], float("nan")),
        }
        for i in range(0, len(images), batch_size)
    ]


# -- registries and configs -----------------------------------------------------------------------
def test_every_method_has_a_space_and_a_documented_config() -> None:
    assert set(PRETRAIN_METHODS.names()) == set(PRETRAIN_SPACES.names())
    assert {"none", "reconstruction", "contrastive", "adversarial", "diffusion", "masked"} <= set(
        PRETRAIN_METHODS
    )
    for name in PRETRAIN_METHODS:
        cls = PRETRAIN_METHODS.get(name)
        assert cls.__doc__ and dataclasses.is_dataclass(cls.Config)
        for f in dataclasses.fields(cls.Config):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help string"


@pytest.mark.parametrize("name", sorted(PRETRAIN_SPACES.names()))
def test_sampled_spaces_build_valid_configs(name: str) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        cfg = PretrainConfig(
            method=name, method_params=PRETRAIN_SPACES.get(name)(trial), **pretrain_train_space(trial)
        )
        build_objective(cfg.method, build_backbone(BackboneConfig("segresnet", 8)), cfg.method_params)
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "bogus"},
        {"method": "masked", "method_params": {"not_a_field": 1}},
        {"method": "masked", "method_params": {"mask_ratio": 1.5}},
        {"method": "masked", "method_params": {"block_size": 0}},
        {"method": "reconstruction", "method_params": {"loss": "huber"}},
        {"method": "reconstruction", "method_params": {"ssim_weight": -1.0}},
        {"method": "contrastive", "method_params": {"temperature": 0.0}},
        {"method": "contrastive", "batch_size": 1},
        {"method": "adversarial", "method_params": {"criterion": "wasserstein"}},
        {"method": "diffusion", "method_params": {"schedule": "quadratic"}},
        {"method": "diffusion", "method_params": {"num_train_timesteps": 1}},
        {"lr": 0.0},
        {"epochs": 0},
        {"weight_decay": -1.0},
    ],
)
def test_bad_values_raise_study_input_error(kwargs: dict) -> None:
    with pytest.raises(StudyInputError):
        PretrainConfig(**kwargs)


# -- each loss against its definition ---------------------------------------------------------------
def _nt_xent_by_hand(views: list[torch.Tensor], tau: float) -> float:
    """SimCLR's NT-Xent from its definition: views ``i`` and ``i + N`` are a positive pair among ``2N``;
    ``-log exp(sim(i, pos) / tau) / sum_{k != i} exp(sim(i, k) / tau)``, averaged over all ``2N`` anchors."""
    two_n = len(views)
    unit = [v.double() / v.double().norm() for v in views]
    total = 0.0
    for i in range(two_n):
        positive = (i + two_n // 2) % two_n
        denominator = sum(math.exp(float(unit[i] @ unit[k]) / tau) for k in range(two_n) if k != i)
        total += -math.log(math.exp(float(unit[i] @ unit[positive]) / tau) / denominator)
    return total / two_n


def test_nt_xent_matches_hand_computation() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)  # 4 volumes -> 8 views; i and i + 4 are a positive pair
    tau = 0.3
    assert nt_xent(z1, z2, tau).item() == pytest.approx(_nt_xent_by_hand([*z1, *z2], tau), rel=1e-5)
    # swapping the partners of two pairs changes the positives, hence the loss
    swapped = z2[[1, 0, 2, 3]]
    assert nt_xent(z1, swapped, tau).item() != pytest.approx(_nt_xent_by_hand([*z1, *z2], tau), rel=1e-3)


def test_contrastive_objective_loss_is_nt_xent_of_its_views() -> None:
    seed_everything(0)
    obj = build_objective("contrastive", build_backbone(BackboneConfig("segresnet", 8)), {"temperature": 0.2})
    x = smooth_volumes(4, (16, 16, 16))
    torch.manual_seed(11)
    loss = obj(x)["loss"].item()
    torch.manual_seed(11)  # the objective draws its views first, from torch's generator
    with torch.no_grad():
        z = obj.embed(torch.cat(augment_pair(x, obj.cfg)))  # one batch of 8, as in forward (batch norm)
    assert loss == pytest.approx(_nt_xent_by_hand(list(z), 0.2), rel=1e-4)


def test_contrastive_views_are_shaped_random_and_seeded() -> None:
    x = smooth_volumes(3, (16, 16, 16)).double()
    cfg = ContrastiveConfig()
    v1, v2 = augment_pair(x, cfg, torch.Generator().manual_seed(4))
    for view in (v1, v2):
        assert view.shape == x.shape and view.dtype == x.dtype and torch.isfinite(view).all()
        assert (view - x).abs().amax(dim=(1, 2, 3, 4)).min() > 0.1  # every sample changed
    assert (v1 - v2).abs().amax(dim=(1, 2, 3, 4)).min() > 0.1  # the two views of each volume differ
    again = augment_pair(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(v1, again[0]) and torch.equal(v2, again[1])
    other = augment_pair(x, cfg, torch.Generator().manual_seed(5))
    assert not torch.equal(v1, other[0])
    torch.manual_seed(9)  # without a generator: torch's global one, which the pre-training seed seeds
    first = augment_pair(x, cfg)
    torch.manual_seed(9)
    assert torch.equal(first[0], augment_pair(x, cfg)[0])


def test_contrastive_augmentations_do_what_their_config_says() -> None:
    x = smooth_volumes(2, (16, 16, 16))
    off = {
        "min_crop": 1.0,
        "flip_prob": 0.0,
        "intensity_scale": 0.0,
        "intensity_shift": 0.0,
        "noise_std": 0.0,
    }
    identity, _ = augment_pair(x, ContrastiveConfig(**off))
    torch.testing.assert_close(identity, x, rtol=1e-5, atol=1e-5)
    flipped, _ = augment_pair(x, ContrastiveConfig(**{**off, "flip_prob": 1.0}))
    torch.testing.assert_close(flipped, x.flip(2, 3, 4), rtol=1e-5, atol=1e-5)
    noisy, _ = augment_pair(x, ContrastiveConfig(**{**off, "noise_std": 0.2}))
    assert (noisy - x).std().item() == pytest.approx(0.2, rel=0.05)
    affine, _ = augment_pair(x, ContrastiveConfig(**{**off, "intensity_scale": 0.5, "intensity_shift": 0.5}))
    for view, volume in zip(
        affine, x, strict=True
    ):  # view = volume * gain + offset, gain in [0.5, 1.5], |offset| <= 0.5
        gain = ((view - view.mean()) * (volume - volume.mean())).sum() / ((volume - volume.mean()) ** 2).sum()
        offset = view.mean() - gain * volume.mean()
        torch.testing.assert_close(view, volume * gain + offset, rtol=1e-4, atol=1e-4)
        assert 0.5 <= gain.item() <= 1.5 and abs(offset.item()) <= 0.5 and gain.item() != pytest.approx(1.0)
    cropped, _ = augment_pair(x, ContrastiveConfig(**{**off, "min_crop": 0.5}))
    assert cropped.shape == x.shape and not torch.allclose(cropped, x, atol=1e-2)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta"])
def test_ddpm_forward_process_is_closed_form(schedule: str) -> None:
    cfg = DiffusionConfig(num_train_timesteps=50, schedule=schedule, beta_start=1e-3, beta_end=0.05)
    if schedule == "linear_beta":
        betas = torch.linspace(1e-3, 0.05, 50, dtype=torch.float64)
    else:
        betas = torch.linspace(1e-3**0.5, 0.05**0.5, 50, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    x0, noise = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([0, 17, 49])
    expected = torch.stack(
        [
            alpha_bar[s].sqrt() * x0[i].double() + (1 - alpha_bar[s]).sqrt() * noise[i].double()
            for i, s in enumerate(t)
        ]
    )
    got = cfg.scheduler().add_noise(x0, noise, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_diffusion_loss_is_noise_prediction_mse() -> None:
    obj = build_objective(
        "diffusion", build_backbone(BackboneConfig("segresnet", 8)), {"num_train_timesteps": 20}
    )
    x = smooth_volumes(2, (16, 16, 16))
    torch.manual_seed(3)
    loss = obj(x)["loss"]
    torch.manual_seed(3)  # draw t and eps in the objective's order, then noise in closed form
    t = torch.randint(0, 20, (2,))
    eps = torch.randn_like(x)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 20, dtype=torch.float64), 0)[t].float()[
        :, None, None, None, None
    ]
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * eps
    expected = ((obj.predict_noise(x_t, t) - eps) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_masked_loss_counts_only_hidden_voxels() -> None:
    target = torch.zeros(1, 1, 2, 2, 2)
    pred = torch.arange(8.0).view(1, 1, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2)
    mask.view(-1)[[0, 3, 5]] = 1
    assert masked_loss(pred, target, mask, "l1").item() == pytest.approx((0 + 3 + 5) / 3)
    assert masked_loss(pred, target, mask, "mse").item() == pytest.approx((0 + 9 + 25) / 3)
    changed = pred.clone()
    changed.view(-1)[[1, 2, 4, 6, 7]] = -100.0  # the visible voxels
    assert masked_loss(changed, target, mask, "l1").item() == masked_loss(pred, target, mask, "l1").item()


def test_block_mask_hides_whole_blocks_at_the_ratio() -> None:
    mask = random_block_mask((3, 1, 16, 16, 16), ratio=0.25, block=4, device=torch.device("cpu"))
    assert mask.shape == (3, 1, 16, 16, 16)
    blocks = mask.view(3, 4, 4, 4, 4, 4, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 64, 64)
    assert torch.all(blocks.amin(-1) == blocks.amax(-1))  # each block all hidden or all visible
    assert torch.all(blocks[:, :, 0].sum(1) == 16)  # round(0.25 * 64) blocks per sample
    obj = build_objective("masked", build_backbone(BackboneConfig("segresnet", 8)), {"mask_ratio": 0.5})
    x = smooth_volumes(2, (16, 16, 16))
    corrupted, m = obj.corrupt(x)
    assert torch.equal(corrupted[m == 0], x[m == 0]) and torch.all(corrupted[m == 1] == 0)


def _ssim_reference(
    x: torch.Tensor, y: torch.Tensor, win: int, sigma: float, data_range: float
) -> torch.Tensor:
    """SSIM (Wang et al., 2004) with a Gaussian window, valid positions only, averaged."""
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    x, y = x.double(), y.double()
    mu_x, mu_y = F.conv3d(x, kernel), F.conv3d(y, kernel)
    var_x = F.conv3d(x * x, kernel) - mu_x**2
    var_y = F.conv3d(y * y, kernel) - mu_y**2
    cov = F.conv3d(x * y, kernel) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean()


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_reconstruction_loss_is_pixel_plus_weighted_ssim(kind: str) -> None:
    cfg = ReconstructionConfig(loss=kind, ssim_weight=0.7, ssim_window=7, ssim_data_range=4.0)
    target = smooth_volumes(2, (12, 12, 12), seed=1)
    pred = target + 0.3 * torch.randn_like(target)
    pixel = (pred - target).abs().mean() if kind == "l1" else ((pred - target) ** 2).mean()
    expected = pixel.double() + 0.7 * (1 - _ssim_reference(pred, target, 7, 1.5, 4.0))
    assert ReconstructionLoss(cfg)(pred, target)["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    # constant volumes a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.5, 1.5, (0.01 * 4.0) ** 2
    const = ReconstructionLoss(cfg)(torch.full((1, 1, 9, 9, 9), a), torch.full((1, 1, 9, 9, 9), b))
    expected = 1.0 + 0.7 * (1 - (2 * a * b + c1) / (a * a + b * b + c1))  # |a - b| = (a - b)^2 = 1
    assert const["loss"].item() == pytest.approx(expected, abs=5e-4)  # float32 variance of a constant ~ 1e-7


def test_adversarial_players_are_separate_and_critic_sees_detached_fakes() -> None:
    obj = build_objective("adversarial", build_backbone(BackboneConfig("segresnet", 8)), {})
    players = obj.players()
    generator, critic = players["loss"], players["d_loss"]
    assert list(players) == ["loss", "d_loss"]
    assert {id(p) for p in generator}.isdisjoint(id(p) for p in critic)
    assert {id(p) for p in generator} | {id(p) for p in critic} == {id(p) for p in obj.trainable_parameters()}
    losses = obj(smooth_volumes(2, (16, 16, 16)))
    grads = torch.autograd.grad(losses["d_loss"], generator, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)  # the discriminator loss never reaches the generator
    assert any(g is not None for g in torch.autograd.grad(losses["loss"], generator, allow_unused=True))


@pytest.mark.parametrize("criterion", ["least_squares", "bce"])
def test_adversarial_losses_match_hand_computation(criterion: str) -> None:
    cfg = AdversarialConfig(adv_weight=0.3, recon_weight=0.7, criterion=criterion, mask_ratio=0.25)
    seed_everything(0)
    obj = build_objective("adversarial", build_backbone(BackboneConfig("segresnet", 8)), cfg)
    x = smooth_volumes(2, (16, 16, 16))
    torch.manual_seed(21)
    losses = obj(x)
    torch.manual_seed(21)  # the objective's only random draw is the block mask of its input
    with torch.no_grad():
        mask = random_block_mask(x.shape, 0.25, 4, x.device)
        fake = obj.through_body(obj.recon_head, x * (1 - mask))
        d_fake, d_real = obj.discriminator(fake)[-1], obj.discriminator(x)[-1]
    if criterion == "least_squares":
        # LSGAN (Mao et al., 2017) on MONAI's activation of the patch logits, LeakyReLU(0.05): generator
        # wants D(fake) = 1; discriminator wants D(real) = 1 and D(fake) = 0.
        a_fake, a_real = F.leaky_relu(d_fake, 0.05), F.leaky_relu(d_real, 0.05)
        g_adv = ((a_fake - 1) ** 2).mean()
        d_loss = 0.5 * ((a_real - 1) ** 2).mean() + 0.5 * (a_fake**2).mean()
    else:
        # BCE on sigmoid(D): -log sigmoid(z) = softplus(-z), -log(1 - sigmoid(z)) = softplus(z)
        g_adv = F.softplus(-d_fake).mean()
        d_loss = 0.5 * F.softplus(-d_real).mean() + 0.5 * F.softplus(d_fake).mean()
    recon = (fake - x).abs().mean()
    assert losses["recon_loss"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert losses["g_adv_loss"].item() == pytest.approx(g_adv.item(), rel=1e-4)
    assert losses["loss"].item() == pytest.approx((0.7 * recon + 0.3 * g_adv).item(), rel=1e-4)
    assert losses["d_loss"].item() == pytest.approx(d_loss.item(), rel=1e-4)


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", TRAINED)
def test_steps_lower_the_loss(method: str) -> None:
    seed_everything(0)
    # Random textures have no mirror symmetry: contrastive flips would ask for an invariance that 12 steps
    # cannot learn on them, so this check (of the optimisation path) turns flips off.
    params = {"flip_prob": 0.0} if method == "contrastive" else {}
    obj = build_objective(method, build_backbone(BackboneConfig("segresnet", 8)), params)
    images = smooth_volumes(4, (16, 16, 16))
    optimizers = make_optimizers(obj, PretrainConfig(method=method, lr=2e-3))
    key = "recon_loss" if method == "adversarial" else "loss"

    def fixed_draw_loss() -> float:  # same masks / noise / views before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return float(obj(images)[key])

    before = fixed_draw_loss()
    for _ in range(12):
        out = train_step(obj, optimizers, images)
        assert all(math.isfinite(v) for v in out.values())
    assert fixed_draw_loss() < before


def _encoder_changed(state: dict, init: dict) -> bool:
    return any(not torch.equal(state[k], init[k]) for k in init if k.startswith("encoder."))


@pytest.mark.parametrize("method", PRETRAIN_METHODS.names())
def test_pretrain_moves_the_encoder_and_reports_metrics(method: str) -> None:
    bcfg = BackboneConfig("segresnet", 8)
    seed_everything(5)
    init = build_backbone(bcfg).body_state_dict()
    rows: list[dict] = []
    cfg = PretrainConfig(method=method, epochs=2, seed=5, device="cpu")
    result = pretrain(
        bcfg, cfg, loader_of(smooth_volumes(2, (16, 16, 16))), on_epoch=lambda e, r: rows.append(r)
    )
    assert _encoder_changed(result.body_state, init) == (method != "none")
    assert set(result.body_state) == set(init)
    for name in ("time_total_s", "time_per_epoch_s", "peak_memory_mb"):
        assert name in result.final
    if method == "none":
        assert rows == [] and all(torch.equal(result.body_state[k], init[k]) for k in init)
        return
    assert len(rows) == 2 and rows == result.history
    expected = {"loss", "epoch_time_s", "time_total_s", "peak_memory_mb", "volumes_per_s"}
    expected |= {"d_loss"} if method == "adversarial" else set()
    assert expected <= set(rows[0])
    if method == "contrastive":  # the decoder is never run, so it keeps its initialisation
        assert all(torch.equal(result.body_state[k], init[k]) for k in init if k.startswith("decoder."))


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_checkpoint_loads_strictly_into_every_backbone(backbone: str, tmp_path: Path) -> None:
    bcfg = BackboneConfig(backbone, WIDTHS[backbone])
    cfg = PretrainConfig(method="reconstruction", epochs=1, batch_size=1, device="cpu")
    path, result = cached_pretrain(
        tmp_path, bcfg, cfg, loader_of(smooth_volumes(1, SHAPES[backbone]), 1), "tiny"
    )
    state = load_checkpoint(path)
    model = build_backbone(bcfg)
    model.load_body(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    other = next(b for b in BACKBONES.names() if b != backbone)
    with pytest.raises(StudyInputError):
        build_backbone(BackboneConfig(other, WIDTHS[other])).load_body(state)


def test_random_init_is_reproducible() -> None:
    bcfg, cfg = BackboneConfig("segresnet", 8), PretrainConfig(method="none", seed=7)
    first, second = pretrain(bcfg, cfg, []), pretrain(bcfg, cfg, [])
    assert all(torch.equal(first.body_state[k], second.body_state[k]) for k in first.body_state)
    other = pretrain(bcfg, PretrainConfig(method="none", seed=8), [])
    assert _encoder_changed(other.body_state, first.body_state)


def test_non_finite_loss_raises() -> None:
    images = smooth_volumes(2, (16, 16, 16))
    images[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        pretrain(BackboneConfig("segresnet", 8), PretrainConfig(method="masked", epochs=1), loader_of(images))


# -- cache ---------------------------------------------------------------------------------------
def test_cache_hit_miss_and_half_written_checkpoints(tmp_path: Path) -> None:
    bcfg = BackboneConfig("segresnet", 8)
    cfg = PretrainConfig(method="reconstruction", epochs=1, device="cpu")
    data = loader_of(smooth_volumes(2, (16, 16, 16)))
    path, result = cached_pretrain(tmp_path, bcfg, cfg, data, "cohort-a")
    assert result is not None and path.name == "body.pt" and load_meta(path)["final"]["epochs_trained"] == 1
    mtime = os.stat(path).st_mtime_ns
    again, hit = cached_pretrain(tmp_path, bcfg, dataclasses.replace(cfg, device="auto"), data, "cohort-a")
    assert hit is None and again == path and os.stat(path).st_mtime_ns == mtime
    for changed, data_id in [(dataclasses.replace(cfg, lr=5e-4), "cohort-a"), (cfg, "cohort-b")]:
        other, res = cached_pretrain(tmp_path, bcfg, changed, data, data_id)
        assert res is not None and other != path
    # an interrupted write (leftover temp file, body without meta.json) is not picked up
    cfg2 = dataclasses.replace(cfg, seed=1)
    folder = tmp_path / pretrain_key(bcfg, cfg2, "cohort-a")
    folder.mkdir()
    (folder / ".body.pt.123.abc.tmp").write_bytes(b"half")
    (folder / "body.pt").write_bytes(b"half")
    fresh, res = cached_pretrain(tmp_path, bcfg, cfg2, data, "cohort-a")
    assert res is not None and fresh == folder / "body.pt"
    assert set(load_checkpoint(fresh)) == set(res.body_state)


def test_key_canonical_forms() -> None:
    bcfg = BackboneConfig("segresnet", 8)
    explicit = PretrainConfig(method="masked", method_params={"mask_ratio": 0.5})
    assert pretrain_key(bcfg, explicit, "d") == pretrain_key(bcfg, PretrainConfig(method="masked"), "d")
    assert pretrain_key(bcfg, explicit, "d") != pretrain_key(
        bcfg, PretrainConfig(method="masked", seed=1), "d"
    )
    assert pretrain_key(bcfg, explicit, "d") != pretrain_key(BackboneConfig("segresnet", 16), explicit, "d")
    none_a, none_b = PretrainConfig(method="none"), PretrainConfig(method="none", lr=1e-2, epochs=9)
    assert pretrain_key(bcfg, none_a, "a") == pretrain_key(bcfg, none_b, "b")  # nothing trained, data unused
