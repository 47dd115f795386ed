"""The Ray Tune function trainable: a thin adapter around :func:`trainables.trials.run_trial`.

Tune's plain-dict config -> typed spec -> the Ray-free core; every epoch ``ray.tune.report`` with the
metrics and (fine-tuning) a checkpoint of the trained parameters and optimiser, from which a restored
or retried trial continues.
"""

from __future__ import annotations

import os
import tempfile
import time

from ray import tune

# torch, MONAI and peft are imported by the first trial, not when Ray starts the actor: Tune starts an actor
# for a pending trial and hands that trial to an actor that frees up first; an actor that spent ~10 s on
# imports before it could take a trial was then killed unused, over and over, taking a core from the
# running trials (short trials, 2 cores: one trial ran at a time). Started in ~2 s, it takes a trial.

_STATE_FILE = "state.pt"


def _threads_for_trial() -> int:
    """Torch threads = the CPUs Tune gave this trial, so concurrent trials do not oversubscribe cores."""
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a Tune session
        cpus = os.cpu_count() or 1
    return max(1, int(cpus))


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not inside Ray
        return ""


def study_trainable(config: dict) -> None:
    """Run one study trial under Ray Tune."""
    import torch

    from trainables.trials import parse_trial, run_trial

    torch.set_num_threads(_threads_for_trial())
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            path = os.path.join(d, _STATE_FILE)
            if os.path.exists(path):
                resume = torch.load(path, weights_only=False)

    node_id = _node_id()
    spec = parse_trial(config)
    every_s = getattr(spec, "checkpoint_every_s", 0.0)
    last = time.monotonic()

    def report(metrics: dict, state) -> None:
        """Report every epoch; attach a checkpoint when ``checkpoint_every_s`` has passed since the last one
        (0: every epoch). A checkpoint costs a write and a copy into Tune's storage, too much for every
        one-second epoch of a small budget; a retry or resume continues from the last one there is."""
        nonlocal last
        metrics = {**metrics, "node_id": node_id}
        if state is None or time.monotonic() - last < every_s:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state(), os.path.join(d, _STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        last = time.monotonic()

    run_trial(config, report, resume=resume)
