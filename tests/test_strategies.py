"""Every fine-tuning strategy x every backbone, generated from the registries (tiny models, CPU; each backbone's
size from its registered constraints)."""

from __future__ import annotations

import copy
import dataclasses
import functools

import optuna
import pytest
import torch

from trainables.backbones import (
    BACKBONES,
    BackboneConfig,
    MultiTaskNet,
    backbone_info,
    build_backbone,
    count_parameters,
)
from trainables.engine import MultiTaskLoss, TrainConfig, make_optimizer
from trainables.errors import StudyInputError
from trainables.finetune import (
    STRATEGIES,
    check_applicable,
    load_finetuned,
    save_finetuned,
    task_storage_bytes,
    trainable_state_dict,
)
from trainables.finetune.distill import DistillStudent

torch.set_num_threads(2)
CASES = [(s, b) for s in STRATEGIES.names() for b in BACKBONES.names()]
# Strategies whose inserted modules start as the identity: the model's function is unchanged by apply.
IDENTITY_AT_START = {
    "full",
    "decoder",
    "top",
    "linear",
    "partial",
    "bitfit",
    "lora",
    "ia3",
    "adapter",
    "prompt_shallow",
    "prompt_deep",
    "ssf",
}
# Zero-initialised up-projections: the matching down-projection's first gradient is exactly zero.
ZERO_INIT_PAIRS = {"lora", "adapter"}


def _size(backbone: str) -> tuple[int, int]:
    """(width, input side) of a tiny model of ``backbone``, from its registered constraints."""
    info = backbone_info(backbone)
    return max(8, info.width_step), max(16, info.input_multiple)


@functools.cache
def _base(backbone: str) -> MultiTaskNet:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name=backbone, width=_size(backbone)[0]))


@functools.cache
def _batch(side: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(1, 1, side, side, side)
    label[:, :, 2 : side // 2 - 1, 4:12, 4:12] = 1  # left PCS
    label[:, :, side // 2 + 1 : side - 2, 4:12, 4:12] = 2  # right PCS
    return {
        "image": torch.randn(1, 1, side, side, side, generator=g),
        "label": label,
        "cls": torch.tensor([[1.0, 1.0]]),
    }


def _fresh(strategy: str, backbone: str, params: dict | None = None) -> MultiTaskNet:
    s = STRATEGIES.get(strategy)
    return s.apply(copy.deepcopy(_base(backbone)), s.make_config(params))


@torch.no_grad()
def _eval_out(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    return model(x)


@functools.cache
def _base_out(backbone: str) -> dict[str, torch.Tensor]:
    return _eval_out(_base(backbone), _batch(_size(backbone)[1])["image"])


def _step(model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """One optimiser step; returns the (training-mode) forward output."""
    model.train()
    out = model(batch["image"])
    assert all(torch.isfinite(v).all() for v in out.values()), "non-finite forward"
    loss = MultiTaskLoss()(out, batch)["loss"]
    opt.zero_grad(set_to_none=False)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    opt.step()
    return {k: v.detach() for k, v in out.items()}


# -- registry and search spaces -------------------------------------------------------------------
def test_every_strategy_is_registered_with_its_search_space():
    assert all(callable(STRATEGIES.get(name).space) for name in STRATEGIES.names())


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_sampled_space_builds_a_config_that_applies(strategy):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        params = STRATEGIES.get(strategy).space(study.ask())
        cfg = STRATEGIES.get(strategy).make_config(params)
        for backbone in BACKBONES.names():  # no sampled value is impossible on any backbone
            STRATEGIES.get(strategy).apply(copy.deepcopy(_base(backbone)), cfg)
    assert all(f.metadata.get("help") for f in dataclasses.fields(STRATEGIES.get(strategy).config_cls))


def test_train_space_gives_train_config_fields():
    from search_spaces.finetune import train_space

    params = train_space(optuna.create_study().ask())
    assert set(params) <= {f.name for f in dataclasses.fields(TrainConfig)}
    TrainConfig(**params)


BAD = {
    "top": {"trainable_blocks": 0},
    "partial": {"trainable_stages": -1},
    "mlp": {"hidden_layers": 0},
    "lora": {"rank": 3},
    "ia3": {"targets": "heads"},
    "adapter": {"reduction": 0},
    "prompt_shallow": {"prompt_size": 0},
    "prompt_deep": {"prompt_size": 1.5},
    "sidetune": {"alpha_init": 1.0},
    "distill": {"temperature": 0.0},
    "student": {"student_width": 2.0},
    "lp_ft": {"switch_fraction": 1.0},
    "gradual": {"warmup_epochs": -1},
}


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_bad_config_values_raise_study_input_error(strategy):
    s = STRATEGIES.get(strategy)
    with pytest.raises(StudyInputError, match="no parameter"):
        s.make_config({"not_a_field": 1})
    for f in dataclasses.fields(s.config_cls):
        with pytest.raises(StudyInputError, match=f.name):
            s.make_config({f.name: "bogus"})
    if dataclasses.fields(s.config_cls):
        assert strategy in BAD, f"add an out-of-range config of {strategy!r} to BAD"
        with pytest.raises(StudyInputError):
            s.make_config(BAD[strategy])


@pytest.mark.parametrize(
    ("strategy", "params"), [("top", {"trainable_blocks": 99}), ("partial", {"trainable_stages": 9})]
)
def test_impossible_depth_raises_at_apply(strategy, params):
    with pytest.raises(StudyInputError, match="has"):
        _fresh(strategy, "segresnet", params)


# -- what trains ----------------------------------------------------------------------------------
def _promised(strategy: str, model: MultiTaskNet, name: str) -> bool:
    """Whether the strategy's rule says that (non-head) parameter ``name`` trains."""
    blocks = [n for n, _ in model.blocks()]
    top_k = STRATEGIES.get("top").make_config().trainable_blocks
    partial_k = STRATEGIES.get("partial").make_config().trainable_stages
    deep_stages = [f"encoder.{i}." for i in range(len(model.encoder) - partial_k, len(model.encoder))]
    rules = {
        "full": lambda: True,
        "decoder": lambda: name.startswith("decoder."),
        "top": lambda: any(name.startswith(b + ".") for b in blocks[-top_k:]),
        "partial": lambda: name.startswith(tuple(deep_stages)),
        "linear": lambda: False,
        "mlp": lambda: False,
        "bitfit": lambda: name.endswith(".bias"),
        "lora": lambda: ".lora_" in name,
        "ia3": lambda: ".ia3_l." in name,
        "adapter": lambda: ".adapter." in name,
        "prompt_shallow": lambda: name.endswith(".prompt.pattern"),
        "prompt_deep": lambda: name.endswith(".prompt.pattern"),
        "sidetune": lambda: name.startswith("side."),
        "ssf": lambda: name.endswith((".scale", ".shift")),
        "distill": lambda: name.startswith("student."),  # a new, smaller network: all of it trains
        "student": lambda: name.startswith("student."),
        "lp_ft": lambda: True,  # the stored task: everything (the first phase's freezing is the schedule's)
        "gradual": lambda: True,
    }
    if strategy not in rules:
        pytest.fail(f"strategy {strategy!r} is registered: add its trainable-parameter rule to _promised")
    return rules[strategy]()


@pytest.mark.parametrize(("strategy", "backbone"), CASES)
def test_trainable_set_is_what_the_strategy_promises(strategy, backbone):
    model = _fresh(strategy, backbone)
    net = model.student if isinstance(model, DistillStudent) else model  # a distillation student's own network
    prefix = "student." if net is not model else ""
    heads = {f"{prefix}{h}.{n}" for h, m in net.heads() for n, _ in m.named_parameters()}
    for name, p in model.named_parameters():
        expected = name in heads or _promised(strategy, net, name)
        assert p.requires_grad == expected, f"{name}: requires_grad={p.requires_grad}"
    if strategy == "mlp":  # k hidden layers + the output layer
        k = STRATEGIES.get("mlp").make_config().hidden_layers
        assert sum(isinstance(m, torch.nn.Linear) for m in model.cls_head.modules()) == k + 1


def test_trainable_fractions_on_segresnet_16():
    torch.manual_seed(0)
    base = build_backbone(BackboneConfig(name="segresnet", width=16))
    fractions = {}
    for name in ("full", "linear", "lora", "bitfit"):
        s = STRATEGIES.get(name)
        trainable, total = count_parameters(s.apply(copy.deepcopy(base), s.make_config()))
        fractions[name] = trainable / total
    assert fractions["full"] == 1.0
    assert (
        fractions["linear"]
        == sum(p.numel() for _, h in base.heads() for p in h.parameters()) / count_parameters(base)[1]
    )
    assert fractions["lora"] < 0.05 and fractions["bitfit"] < 0.05, fractions


# -- one optimiser step, storage and round trip ---------------------------------------------------
@pytest.mark.parametrize(("strategy", "backbone"), CASES)
def test_step_storage_and_round_trip(strategy, backbone, tmp_path):
    """One step: frozen parameters bit-identical, trainable ones changed; storage; save/load identical.

    The backbones have no dropout and no running statistics, so the training-mode forward of the
    step is also the check that a function-preserving strategy left the pre-trained outputs unchanged.
    """
    width, side = _size(backbone)
    batch = _batch(side)
    model = _fresh(strategy, backbone)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(
        model, TrainConfig(lr_encoder=1e-3, lr_decoder=1e-3, lr_heads=1e-3, weight_decay=0.0)
    )
    out = _step(model, batch, opt)
    if strategy in IDENTITY_AT_START or strategy == "mlp":  # mlp keeps the segmentation function only
        keys = ("seg",) if strategy == "mlp" else ("seg", "cls")
        assert all(torch.equal(out[k], _base_out(backbone)[k]) for k in keys), "apply changed the function"
    params = dict(model.named_parameters())
    zero_grad = {n for n in trainable if not params[n].grad.any()}
    if zero_grad:  # only a zero-initialised partner may see an exactly zero first gradient
        assert strategy in ZERO_INIT_PAIRS, f"no gradient reaches {sorted(zero_grad)[:5]}"
        _step(model, batch, opt)
    for name, p in params.items():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"

    state = trainable_state_dict(model)
    assert set(state) == trainable  # no strategy here adds buffers
    assert task_storage_bytes(model) == sum(params[n].numel() * params[n].element_size() for n in trainable)

    path = tmp_path / "model.pt"
    cfg = BackboneConfig(name=backbone, width=width).to_dict()
    save_finetuned(
        model, path, backbone_cfg=cfg, strategy=strategy, strategy_cfg={}, pretrain_ref="pretrained.pt"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left
    loaded = load_finetuned(path, _base(backbone).body_state_dict())
    expected, got = _eval_out(model, batch["image"]), _eval_out(loaded, batch["image"])
    assert all(torch.equal(got[k], expected[k]) for k in expected), "round trip changed the outputs"


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_round_trip_without_pretraining_stores_the_random_body(strategy, tmp_path):
    torch.manual_seed(2)
    model = STRATEGIES.get(strategy).apply(
        build_backbone(BackboneConfig(name="segresnet", width=8)), STRATEGIES.get(strategy).make_config()
    )
    cfg = BackboneConfig(name="segresnet", width=8).to_dict()
    save_finetuned(
        model, tmp_path / "m.pt", backbone_cfg=cfg, strategy=strategy, strategy_cfg={}, pretrain_ref=None
    )
    x = _batch(16)["image"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            _eval_out(load_finetuned(tmp_path / "m.pt", None), x).values(),
            _eval_out(model, x).values(),
            strict=True,
        )
    )


def test_load_without_the_body_it_needs_raises(tmp_path):
    model = _fresh("linear", "segresnet")
    cfg = BackboneConfig(name="segresnet", width=8).to_dict()
    save_finetuned(
        model, tmp_path / "m.pt", backbone_cfg=cfg, strategy="linear", strategy_cfg={}, pretrain_ref="ck.pt"
    )
    with pytest.raises(StudyInputError, match="body state"):
        load_finetuned(tmp_path / "m.pt", None)


# -- applicability --------------------------------------------------------------------------------
def test_check_applicable_passes_for_every_strategy():
    """Each strategy x backbone is also applied and run by the step test; here the grid's entry point."""
    for strategy in STRATEGIES.names():
        check_applicable(strategy, "segresnet", (16, 16, 16))


def test_check_applicable_raises_for_impossible_cases():
    with pytest.raises(StudyInputError, match="multiples of 32"):
        check_applicable("lora", "swinunetr", (16, 16, 16))
    check_applicable("full", "unet", (16, 16, 16))  # group norm: a one-voxel bottleneck trains
    with pytest.raises(StudyInputError, match="valid"):
        check_applicable("no_such_strategy", "segresnet")
