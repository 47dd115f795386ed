"""Resources per trial: fractional GPU shares chosen from measured memory, CPU cores per trial.

Small trials share a GPU, large ones get room: before the study, one training step of every
(strategy, backbone) is probed on a GPU of the cluster, and each cell's share is its peak memory with
headroom, rounded up to an eighth of the GPU. ``--gpus-per-trial`` overrides the measurement.
"""

from __future__ import annotations

import math

from study.plan.grid import StudyPlan
from trainables.errors import StudyInputError

HEADROOM = 1.3  # allocator fragmentation, cuDNN workspaces, the CUDA context
PRETRAIN_FACTOR = 2.0  # contrastive runs two views, adversarial a discriminator: give pre-training more room


def gpu_share(peak_mb: float, gpu_mb: float, headroom: float = HEADROOM, step: float = 1 / 8) -> float:
    """The fraction of a ``gpu_mb`` GPU that a trial peaking at ``peak_mb`` needs, in multiples of ``step``."""
    if gpu_mb <= 0:
        raise StudyInputError("GPU memory must be positive")
    need = peak_mb * headroom / gpu_mb
    if need > 1:
        raise StudyInputError(
            f"a trial needs about {peak_mb * headroom:.0f} MB but the GPU has {gpu_mb:.0f} MB: lower the budget's "
            f"input size, width or batch size"
        )
    return min(1.0, max(step, math.ceil(need / step) * step))


def measure_shares(plan: StudyPlan, task: dict | None = None) -> dict[str, float]:
    """Probe every (strategy, backbone) on one GPU of the cluster with the study's ``task`` (its dict form);
    ``key -> GPU share``.

    Keys: ``finetune:<strategy>:<backbone>`` and ``pretrain:<backbone>``. Empty without GPUs.
    """
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        return {}

    @ray.remote(num_gpus=1)
    def probe(strategy: str, backbone: dict) -> tuple[float, float]:
        import torch

        from trainables.probe import probe_step_memory

        peak = probe_step_memory(strategy, backbone, tuple(plan.input_size), plan.batch_size, task=task)
        return peak, torch.cuda.get_device_properties(0).total_memory / 2**20

    pairs = list(dict.fromkeys((c.strategy, c.backbone) for c in plan.cells))
    futures = {p: probe.remote(p[0], {"name": p[1], "width": plan.backbone_width(p[1])}) for p in pairs}
    shares: dict[str, float] = {}
    for (strategy, backbone), fut in futures.items():
        peak, total = ray.get(fut)
        shares[f"finetune:{strategy}:{backbone}"] = gpu_share(peak, total)
        if strategy == "full":
            shares[f"pretrain:{backbone}"] = min(1.0, gpu_share(peak * PRETRAIN_FACTOR, total))
    for backbone in {c.backbone for c in plan.cells}:
        shares.setdefault(f"pretrain:{backbone}", 1.0)
    return shares


def trial_resources(cpus: float, gpus: float | None, shares: dict[str, float], custom: dict[str, float]):
    """Tune's per-trial resource function: a fixed GPU share, or the measured one of the trial's cell."""
    from trainables.trials import parse_trial


    def per_trial(config: dict) -> dict:
        spec = parse_trial(config)
        stage, backbone = spec.stage, spec.backbone.name
        if gpus is not None:
            gpu = gpus
        elif stage == "finetune":
            gpu = shares.get(f"finetune:{spec.strategy}:{backbone}", 0.0)
        else:
            gpu = shares.get(f"pretrain:{backbone}", 0.0)
        extra = custom if stage == "finetune" else {}
        return {"cpu": cpus, "gpu": gpu, **extra}

    return per_trial
