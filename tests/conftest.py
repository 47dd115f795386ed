"""Shared fixtures: a tiny synthetic PCS cohort generated once per test session; headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from study.cohort import generate_cohort

# 12 subjects at 4 mm -> 16^3 volumes; splits pretrain=4, train=4, val=2, test=2.
TINY_COHORT = {"subjects": 12, "seed": 0, "spacing": 4.0, "difficulty": 1.0}


@pytest.fixture(scope="session")
def tiny_cohort_params() -> dict:
    """The generate_cohort() arguments behind ``tiny_cohort`` (a copy; changing it changes nothing)."""
    return dict(TINY_COHORT)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the manifest.csv of a 12-subject, 16^3-voxel synthetic cohort, shared by the session.

    Treat it as read-only (load_split may add a ``.cache`` folder next to it); to corrupt or edit
    files use ``tiny_cohort_copy``.
    """
    return generate_cohort(tmp_path_factory.mktemp("tiny_cohort") / "cohort", **TINY_COHORT)


@pytest.fixture
def tiny_cohort_copy(tiny_cohort: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``tiny_cohort`` (without its cache); returns the copy's manifest path."""
    target = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, target, ignore=shutil.ignore_patterns(".cache"))
    return target / "manifest.csv"


# The end-to-end group is every test marked ``slow``: a real Ray (a local one, a cluster of two nodes) or a whole
# launcher run. ``make test-fast`` leaves it out (``-m "not slow"``). Under pytest-xdist (``make test`` runs
# ``-n 2 --dist loadgroup``) the group runs on one worker, one test after another, so that two Ray clusters never
# start at once (``ray.init()`` joins a cluster that ``ray start`` left running), while the other worker takes the
# rest; each worker's torch then uses one thread, so the two do not oversubscribe the cores.
@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("e2e"))


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def start_local_ray(**kwargs) -> None:
    """A real local Ray whose workers can import this folder's test modules (their trainables)."""
    import os

    import ray

    here = str(Path(__file__).resolve().parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])
    ray.init(include_dashboard=False, log_to_driver=False, **kwargs)


_BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _find_browser() -> str | None:
    return next((path for path in map(shutil.which, _BROWSERS) if path), None)


def _install_chromium() -> str | None:
    """Install Debian's ``chromium`` with apt-get (as root, else ``sudo -n``); ``None`` or why it could not."""
    return _apt_install("chromium")


def _apt_install(package: str) -> str | None:
    """Install a Debian package with apt-get (as root, else ``sudo -n``); ``None`` or why it could not."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available (not a Debian-like system); install Chromium by hand"
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") is None:
        return f"not running as root and sudo is not installed; run `apt-get install -y {package}` as root"
    elif subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=30).returncode != 0:
        return f"not running as root and `sudo -n` needs a password; run `sudo apt-get install -y {package}`"
    else:
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", package]):
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not finish in 900 s"
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            return f"`{' '.join(command)}` exited with {proc.returncode}: {last}"
    return None


COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")  # Debian's mricron-data: Colin27, whole head, skull on


@pytest.fixture(scope="session")
def colin27() -> Path:
    """A real whole-head T1 with skull the project does not ship: Colin27 (``ch2.nii.gz``) from Debian's
    ``mricron-data``, installed with apt-get when missing. Skips, saying why, where it cannot be."""
    if not COLIN27.is_file():
        reason = _apt_install("mricron-data")
        if not COLIN27.is_file():
            pytest.skip(f"Colin27 ({COLIN27}) is missing and could not be installed: "
                        f"{reason or 'apt-get succeeded but the file is not there'}")
    return COLIN27


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a working headless Chromium, installed with apt-get (``chromium``) when missing.

    Skips, saying exactly why, where it is missing and cannot be installed or does not start.
    """
    path = _find_browser()
    if path is None:
        reason = _install_chromium()
        path = _find_browser()
        if path is None:
            pytest.skip(f"headless Chromium is missing and could not be installed: "
                        f"{reason or 'apt-get succeeded but no chromium executable is on PATH'}")
    try:
        proc = subprocess.run([path, "--headless", "--no-sandbox", "--version"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium at {path} does not start: {exc}")
    if proc.returncode != 0 or "chrom" not in proc.stdout.lower():
        pytest.skip(f"Chromium at {path} does not start: `{path} --version` exited with {proc.returncode}: "
                    f"{(proc.stderr.strip() or proc.stdout.strip())[-300:]}")
    return path


S3_BUCKET = "studies"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 API server (moto) with the bucket ``studies``; returns a boto3 client.

    ``AWS_*`` variables point every process started afterwards (Ray workers too) at it, exactly as at
    AWS or MinIO; ``STUDY_NODE_CACHE`` keeps downloaded copies in a temporary folder.
    """
    import logging

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency: pip install -e '.[dev]'")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "STUDY_NODE_CACHE": str(tmp_path_factory.mktemp("node_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=S3_BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def s3_keys(client, prefix: str) -> list[str]:
    """Every object key under ``prefix`` in the test bucket."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition()`` until it returns something truthy (returned), or fail after ``timeout`` seconds
    saying ``what`` was awaited. Timing-dependent states (a node marked dead, a process gone, a file
    written) are waited for, never read once at an instant."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f}s for {what}; last seen: {value!r}")
        time.sleep(interval)


def run_in_terminal(argv: list[str], cwd: Path, timeout: float, width: int = 200, height: int = 50) -> tuple[int, str]:
    """Run ``argv`` in a real pseudo-terminal (a private tmux server) as a person would; returns its exit
    code and the whole screen at the end (scrollback included, wrapped lines joined)."""
    import shlex
    import tempfile

    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux; `make test` installs it as root)")
    state = Path(tempfile.mkdtemp(prefix="term-"))
    rc_file, socket = state / "rc", f"pcs-test-{os.getpid()}-{state.name}"
    script = f"cd {shlex.quote(str(cwd))} && {shlex.join(map(str, argv))}; echo $? > {shlex.quote(str(rc_file))}; exec sleep 3600"
    base = [tmux, "-L", socket, "-f", "/dev/null"]
    subprocess.run([*base, "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), script], check=True)
    try:
        wait_for(rc_file.exists, timeout, f"`{shlex.join(map(str, argv))}` to finish in a terminal", interval=0.5)
        wait_for(lambda: rc_file.read_text().strip(), 10, "its exit code")
        screen = subprocess.run([*base, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"], capture_output=True,
                                text=True, check=True).stdout
        return int(rc_file.read_text()), screen
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def trial_config(stage: str = "finetune", *, strategy: str = "full", epochs: int = 2, backbone: str = "segresnet",
                 cell: str = "none__full__segresnet") -> dict:
    """A minimal trial config as the launcher writes it (the typed schema of ``trainables.trials``), for tests
    whose trainables read only part of it."""
    from trainables.backbones import BackboneConfig
    from trainables.data import DataConfig
    from trainables.engine import TrainConfig
    from trainables.pretrain.loop import PretrainConfig
    from trainables.trials import CellRef, FinetuneTrial, PretrainTrial

    data = DataConfig(manifest="unused/manifest.csv")
    if stage == "pretrain":
        return PretrainTrial(BackboneConfig(backbone), PretrainConfig(method="reconstruction", epochs=epochs), data,
                             cache_dir="unused", cell=CellRef(cell, "reconstruction", backbone)).to_dict()
    return FinetuneTrial(BackboneConfig(backbone), strategy, {}, TrainConfig(epochs=epochs), data,
                         cell=CellRef(cell, "none", backbone, strategy)).to_dict()


def tiny_batches(n: int, seed: int) -> list[dict]:
    """``n`` batches of two 16^3 volumes of the PCS task: a dark left groove (label 1) in the first, a right one
    (label 2) in the second, presence [1, 0] and [0, 1]: a set small models learn in a few epochs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.randn(2, 1, 16, 16, 16, generator=g) * 0.3
        lab = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
        lab[0, 0, 3:6, 6:12, 6:10] = 1
        lab[1, 0, 10:13, 6:12, 6:10] = 2
        img[lab > 0] -= 1.5
        out.append({"image": img, "label": lab, "cls": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    return out
