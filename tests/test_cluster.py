"""Scaling out: a real multi-node Ray cluster on one machine (infra/local-cluster.sh), and the infra files.

The cluster tests start a head and worker Ray nodes as separate process trees (each node its own session
and temp dir), an MLflow tracking server (infra/mlflow-server.sh), and the launcher as a subprocess that
joins the cluster. Where this machine allows unprivileged namespaces (``unshare -rn``) all of it runs in a
private network namespace that has only a loopback interface: Ray's GCS and raylets listen on every
interface, and there every interface is 127.0.0.1. Teardown ends exactly the processes these tests started
(by session id), never ``ray stop``, which would end every Ray process of the user on the machine.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
LOCAL_CLUSTER = INFRA / "local-cluster.sh"
MLFLOW_SERVER = INFRA / "mlflow-server.sh"

_LOOPBACK_UP = """
import fcntl, signal, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
print("ready", flush=True)
signal.pause()
"""


class Net:
    """Runs commands in a loopback-only network namespace, or on the host network where none can be made."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen | None = None
        if not (shutil.which("unshare") and shutil.which("nsenter")):
            return
        holder = subprocess.Popen(["unshare", "-rn", sys.executable, "-c", _LOOPBACK_UP],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if holder.stdout.readline().strip() == "ready":
            self.holder = holder
            probe = subprocess.run(self.wrap(["true"]), capture_output=True, timeout=30)
            if probe.returncode == 0:
                return
        holder.kill()
        holder.wait()
        self.holder = None

    @property
    def isolated(self) -> bool:
        return self.holder is not None

    def wrap(self, cmd: list[str]) -> list[str]:
        if self.holder is None:
            return [str(c) for c in cmd]
        return ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(self.holder.pid), *map(str, cmd)]

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


def _session_processes(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of session ``sid``: one Ray node, or one server."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _titles(sid: int) -> list[str]:
    """The process titles of session ``sid`` (Ray names a worker process ``ray::<Class>.<method>`` while busy)."""
    titles = []
    for proc in _session_processes(sid):
        try:
            titles.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return titles


def _kill_session(sid: int) -> None:
    for proc in _session_processes(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """infra/local-cluster.sh driven from a test, plus the study's MLflow server (infra/mlflow-server.sh)."""

    def __init__(self, net: Net, state: Path) -> None:
        self.net, self.state = net, state
        self.sessions: list[int] = []  # every session (node, server) started, for teardown
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        # The GCS declares a node dead after `failure_threshold` missed health checks: 2 s apart with a 5 s
        # timeout, about 10 s after a node is killed instead of Ray's default of about 30 s (the killed-node
        # test waits for it), still lenient enough for a worker slowed by a loaded machine.
        self.env.update(RAY_health_check_period_ms="2000", RAY_health_check_timeout_ms="5000",
                        RAY_health_check_failure_threshold="5", RAY_health_check_initial_delay_ms="2000")
        self.env.update(PCS_CLUSTER_DIR=str(state), PCS_CLUSTER_GRACE_S="3", PYTHONUNBUFFERED="1",
                        RAY_USAGE_STATS_ENABLED="0", RAY=str(Path(sys.executable).parent / "ray"),
                        PYTHON=sys.executable, MLFLOW=str(Path(sys.executable).parent / "mlflow"))
        self.mlflow_root = state / "mlflow"
        self.mlflow_uri = f"http://127.0.0.1:{_free_port()}"
        self.mlflow: subprocess.Popen | None = None

    def script(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(self.net.wrap(["bash", LOCAL_CLUSTER, *args]), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        self._remember_sessions()
        assert proc.returncode == 0, f"local-cluster.sh {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def _remember_sessions(self) -> None:
        for f in self.state.glob("*.pid"):
            sid = int(f.read_text())
            if sid not in self.sessions:
                self.sessions.append(sid)

    def start_mlflow(self) -> None:
        port = self.mlflow_uri.rsplit(":", 1)[1]
        log = open(self.state / "mlflow-server.out", "ab")
        self.mlflow = subprocess.Popen(
            self.net.wrap(["bash", MLFLOW_SERVER, "--root", self.mlflow_root, "--port", port, "--workers", "1"]),
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(self.mlflow.pid)

    def wait_mlflow(self, timeout: float = 180) -> None:
        probe = ("import sys, time, urllib.request\n"
                 "deadline = time.time() + float(sys.argv[2])\n"
                 "while True:\n"
                 "    try:\n"
                 "        urllib.request.urlopen(sys.argv[1] + '/health', timeout=2); break\n"
                 "    except OSError:\n"
                 "        if time.time() > deadline: sys.exit('MLflow server not up')\n"
                 "        time.sleep(0.5)\n")
        proc = subprocess.run(self.net.wrap([sys.executable, "-c", probe, self.mlflow_uri, str(timeout)]),
                              env=self.env, capture_output=True, text=True, timeout=timeout + 30)
        log = (self.state / "mlflow-server.out").read_text(errors="replace")[-3000:]
        assert proc.returncode == 0, f"infra/mlflow-server.sh did not come up:\n{log}"

    @property
    def address(self) -> str:
        return (self.state / "address").read_text().strip()

    def nodes(self) -> dict[str, tuple[str, str]]:
        """name -> (node id, ALIVE|DEAD); the newest line wins for a name."""
        out = {}
        for line in self.script("nodes").splitlines():
            name, node_id, state, _ = line.split(" ", 3)
            if name not in out or state == "ALIVE":
                out[name] = (node_id, state)
        return out

    def add_worker(self, cpus: int) -> str:
        return self.script("add-worker", "--cpus", str(cpus)).split()[-2]  # "worker-K joined"

    def session_of(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text())

    def launch(self, args: list, log: Path) -> subprocess.Popen:
        """The launcher, with what `eval "$(infra/local-cluster.sh env)"` exports, but RAY_ADDRESS."""
        env = dict(self.env, RAY_TMPDIR=str(self.state), RAY_AUTH_MODE=(self.state / "auth_mode").read_text().strip())
        args = [str(a) for a in args]
        proc = subprocess.Popen(self.net.wrap([sys.executable, "-m", "study.launch", *args]), cwd=REPO, env=env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(proc.pid)
        return proc

    def teardown(self) -> None:
        try:
            subprocess.run(self.net.wrap(["bash", LOCAL_CLUSTER, "stop"]), env=self.env, capture_output=True,
                           timeout=120)
        except subprocess.SubprocessError:
            pass
        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGTERM)
            try:
                self.mlflow.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._remember_sessions()
        for sid in self.sessions:  # whatever is left of the sessions these tests started, and nothing else
            _kill_session(sid)


@pytest.fixture(scope="module")
def cluster():
    net = Net()
    # a short folder: Ray's Unix socket paths (<temp dir>/session_.../sockets/...) must stay under 108 bytes
    state = Path(tempfile.mkdtemp(prefix="pcs-rc-", dir="/tmp"))
    c = LocalCluster(net, state)
    try:
        c.start_mlflow()  # starts while the head does; the launcher checks it answers before it begins
        c.script("start", "0", "--port", "0", "--client-port", "0", "--head-cpus", "1",
                 "--object-store-bytes", "100000000")
        c.wait_mlflow()
        yield c
    finally:
        c.teardown()
        net.close()
        shutil.rmtree(state, ignore_errors=True)


# --- MLflow, read from the server's SQLite store ------------------------------------------------------------
def _sql(db: Path, query: str, *params) -> list[tuple]:
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return con.execute(query, params).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def _pretrain_runs(db: Path, experiment: str, status: str = "%") -> int:
    """Pre-training runs of ``experiment`` (created when a trial starts), with ``status`` if given."""
    return len(_sql(db, "SELECT r.run_uuid FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                        "JOIN tags t ON t.run_uuid = r.run_uuid WHERE e.name = ? AND t.key = 'stage' "
                        "AND t.value = 'pretrain' AND r.status LIKE ?", experiment, status))


def _child_runs(cluster: LocalCluster, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cluster.mlflow_root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _plan(*filters: str):
    from study.plan.grid import select_plan

    methods = filters[filters.index("--methods") + 1].split(",") if "--methods" in filters else None
    return select_plan("smoke", methods=methods)


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:]


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the study did not finish in {timeout:.0f}s:\n{_log_tail(log)}")


def _assert_one_finished_run_per_trial(runs: list, plan) -> None:
    from study.run.tracking import FINAL_METRICS

    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["trial_id"], []).append(r)
    assert all(len(v) == 1 for v in by_trial.values()), {k: len(v) for k, v in by_trial.items() if len(v) > 1}
    assert len(by_trial) == plan.total_trials()
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags["trial_id"], r.info.status)
        assert r.data.tags.get("node_id"), r.data.tags["trial_id"]
        if r.data.tags["stage"] == "finetune":
            assert r.data.tags.get("outcome") in ("completed", "stopped_early")
            missing = [k for k in FINAL_METRICS if k not in r.data.metrics]
            assert not missing, (r.data.tags["trial_id"], missing)


# --- the cluster tests ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trials_pinned_by_a_custom_resource_run_on_the_worker_that_advertises_it(cluster, tmp_path) -> None:
    """`--address auto`, pre-training on the head, fine-tuning (which needs `worker_node`) on a worker that
    joins while the study waits for it; every run in one MLflow store, tagged with the node it ran on. With
    `--roi register` the registrations run as Ray tasks and are stored beside the cohort's manifest."""
    args = ["--grid", "smoke", "--address", "auto", "--output", tmp_path / "pin", "--storage",
            cluster.state / "shared" / "pin", "--mlflow-uri", cluster.mlflow_uri,
            "--trial-resources", '{"worker_node": 0.01}', "--roi", "register"]
    plan, log = _plan(), tmp_path / "pin.log"
    db, experiment = cluster.mlflow_root / "mlflow.db", "study-smoke-pin"
    proc = cluster.launch(args, log)
    # pre-training needs no custom resource, and the head is the only node: it starts there; the
    # fine-tuning trials then wait for a node with `worker_node`, which joins now
    deadline = time.time() + 300
    while _pretrain_runs(db, experiment) < len(plan.pretrain_jobs()):
        assert proc.poll() is None, f"the study ended early (exit {proc.returncode}):\n{_log_tail(log)}"
        assert time.time() < deadline, f"pre-training did not start:\n{_log_tail(log)}"
        time.sleep(0.5)
    worker = cluster.add_worker(cpus=1)
    try:
        assert _wait(proc, log, 400) == 0, _log_tail(log)
        nodes = cluster.nodes()
    finally:
        cluster.script("remove-worker", worker.split("-")[1])  # the next test wants the head alone
    head_id, worker_id = nodes["head"][0], nodes[worker][0]
    runs = _child_runs(cluster, experiment)
    _assert_one_finished_run_per_trial(runs, plan)
    node_of = {r.data.tags["trial_id"]: (r.data.tags["stage"], r.data.tags["node_id"]) for r in runs}
    assert {n for s, n in node_of.values() if s == "pretrain"} == {head_id}, node_of
    assert {n for s, n in node_of.values() if s == "finetune"} == {worker_id}, node_of
    assert len({n for _, n in node_of.values()}) == 2
    # the worker fine-tuned from the checkpoint the head pre-trained, through the shared folder, which also
    # holds Tune's state and every fine-tuned model
    shared = cluster.state / "shared"
    checkpoints = {r.data.params["pretrain_checkpoint"] for r in runs
                   if r.data.tags["stage"] == "finetune" and r.data.tags["pretrain"] != "none"}
    assert checkpoints and all(Path(c).is_file() and Path(c).is_relative_to(shared) for c in checkpoints)
    assert (shared / "pin" / "tune" / "study").is_dir()
    stored = list((shared / "pin" / "cohort" / ".registration").glob("sub-*.json"))
    assert len(stored) == plan.subjects and "registering (Ray tasks)" in log.read_text()
    assert len(list((shared / "pin" / "models").glob("*/model.pt"))) == len(plan.cells) * plan.num_samples


_HOLD_A_CPU = """
import sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=1)
class Hold:
    def ready(self) -> bool:
        return True


hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(hold.ready.remote())
print("holding", flush=True)
sys.stdin.read()  # until the test ends this driver; its actor and the CPU go with it
"""


@pytest.mark.slow
def test_a_worker_node_killed_mid_study_has_its_trials_retried_on_the_head(cluster, tmp_path) -> None:
    """SIGKILL of every process of the worker node while a fine-tuning trial runs there: Tune marks its
    trials errored and retries them on the head from their last checkpoint; the study ends normally, each
    trial has exactly one MLflow run and every finished run its final metrics."""
    # Until the worker dies, a small driver holds the head's only CPU, so that the trials start on the worker
    # (Ray would otherwise prefer the driver's node); it lets go the moment the worker is killed.
    head_id = cluster.nodes()["head"][0]
    holder = subprocess.Popen(cluster.net.wrap([sys.executable, "-c", _HOLD_A_CPU, cluster.address, head_id]),
                              env=dict(cluster.env, RAY_AUTH_MODE=(cluster.state / "auth_mode").read_text().strip()),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    cluster.sessions.append(holder.pid)
    worker = cluster.add_worker(cpus=1)
    sid, worker_id = cluster.session_of(worker), cluster.nodes()[worker][0]
    ready, _, _ = select.select([holder.stdout], [], [], 180)
    assert ready and holder.stdout.readline().strip() == b"holding", "the CPU-holding driver did not start"

    filters = ["--methods", "none"]
    args = ["--grid", "smoke", *filters, "--address", cluster.address, "--output", tmp_path / "kill",
            "--storage", cluster.state / "shared" / "kill", "--mlflow-uri", cluster.mlflow_uri, "--max-failures", "3"]
    plan, log = _plan(*filters), tmp_path / "kill.log"
    db, experiment = cluster.mlflow_root / "mlflow.db", "study-smoke-kill"
    proc = cluster.launch(args, log)
    killed_at = None
    try:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline and killed_at is None:
            if _pretrain_runs(db, experiment, "FINISHED") >= len(plan.pretrain_jobs()):
                if any(t.startswith("ray::ImplicitFunc.train") for t in _titles(sid)):  # a trial executing there
                    cluster.script("kill-worker", worker.split("-")[1])
                    killed_at = time.time()
            time.sleep(0.1)
    finally:
        _kill_session(holder.pid)
    assert killed_at is not None, f"no fine-tuning trial ran on {worker}; nothing was killed:\n{_log_tail(log)}"
    # SIGKILL is delivered asynchronously
    wait_for(lambda: not _session_processes(sid), 30, f"every process of {worker} to die", interval=0.05)
    assert _wait(proc, log, 300) == 0, _log_tail(log)

    # Ray marks a node dead only once its health checks time out, which may be after a fast study ends
    wait_for(lambda: cluster.nodes()[worker] == (worker_id, "DEAD"), 180, f"Ray to mark {worker} DEAD", interval=1)
    runs = _child_runs(cluster, experiment)
    _assert_one_finished_run_per_trial(runs, plan)
    # Tune recorded each trial that lost its node as failed (error.txt) and retried it; it then finished
    trial_dirs = list((cluster.state / "shared" / "kill" / "tune" / "study").glob("study_trainable_*"))
    retried = {d.name.split("_")[2]: d for d in trial_dirs if (d / "error.txt").exists()}
    assert retried, f"no trial failed with its node:\n{_log_tail(log)}"
    finished = {r.data.tags["trial_id"]: r for r in runs}
    for trial_id, d in retried.items():
        assert "Failure # 1" in (d / "error.txt").read_text()
        run = finished[trial_id]
        assert run.data.tags["stage"] == "finetune" and run.data.tags["node_id"] == head_id, run.data.tags
        epochs = [json.loads(line)["epoch"] for line in (d / "result.json").read_text().splitlines() if line]
        assert epochs and epochs[-1] == plan.finetune_epochs, epochs
    # the runs that finished on the worker before it died keep their node and their final metrics
    assert {r.data.tags["node_id"] for r in runs} <= {head_id, worker_id}


# --- the infra files -----------------------------------------------------------------------------------------
def test_cluster_yaml_validates_against_rays_own_schema() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` does: defaults filled in, then validated
    types = config["available_node_types"]
    assert config["head_node_type"] in types and config["provider"]["type"] == "aws"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5")) for t in workers)
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0  # the head runs no trials
    assert "." in config["file_mounts"].values()  # the repository
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e ~/pcs-study" in setup and "/shared" in setup
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_kuberay_manifest_has_a_raycluster_and_a_rayjob_that_runs_the_study_on_a_shared_volume() -> None:
    from study.launch import build_parser

    docs = [d for d in yaml.safe_load_all((INFRA / "kuberay.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(by_kind)
    assert by_kind["RayCluster"]["apiVersion"] == "ray.io/v1" and by_kind["RayJob"]["apiVersion"] == "ray.io/v1"
    cluster, job, pvc = by_kind["RayCluster"], by_kind["RayJob"], by_kind["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "study.launch"]
    args = build_parser().parse_args(argv[3:])  # every flag exists in the launcher
    assert args.grid == "full" and args.address == "auto" and args.storage.startswith("/shared/")
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert claims.get(mounts.get("/shared")) == pvc["metadata"]["name"]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in gpu


def test_dockerfile_builds_on_cuda_and_installs_the_project() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert "nvidia/cuda:" in text and "pip install -e ." in text and "ray[default" in text


@pytest.mark.parametrize("script", sorted(p.name for p in INFRA.glob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", INFRA / script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_mlflow_server_script_binds_localhost_unless_told_otherwise(tmp_path) -> None:
    help_text = subprocess.run(["bash", MLFLOW_SERVER, "--help"], capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: infra/mlflow-server.sh") and "default: 127.0.0.1" in help_text
    assert "basic-auth" in help_text and "reverse proxy" in help_text
    dry = subprocess.run(["bash", MLFLOW_SERVER, "--root", tmp_path, "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    assert "--host 127.0.0.1" in dry and f"sqlite:///{tmp_path}/mlflow.db" in dry
    assert f"--artifacts-destination {tmp_path}/artifacts" in dry
    secret = subprocess.run(["bash", MLFLOW_SERVER, "--root", tmp_path, "--backend-store-uri",
                             "postgresql://mlflow:hunter2@db:5432/mlflow", "--dry-run"],
                            capture_output=True, text=True, check=True).stdout
    assert "hunter2" not in secret and "postgresql://mlflow:***@db:5432/mlflow" in secret
    wide = subprocess.run(["bash", MLFLOW_SERVER, "--root", tmp_path, "--host", "0.0.0.0", "--dry-run"],
                          capture_output=True, text=True, check=True)
    assert "--host 0.0.0.0" in wide.stdout and "--host 127.0.0.1" not in wide.stdout
    assert "binding 0.0.0.0 without --auth" in wide.stderr  # a wider bind is said out loud


def test_local_cluster_script_usage() -> None:
    proc = subprocess.run(["bash", LOCAL_CLUSTER, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "start N" in proc.stdout and "worker_node" in proc.stdout
    assert subprocess.run(["bash", LOCAL_CLUSTER, "bogus"], capture_output=True).returncode == 2
