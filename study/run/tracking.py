"""MLflow tracking: one experiment per study, a parent run, one nested child run per Tune trial.

A Ray Tune callback on the driver writes every trial's run, so the workers need no access to the
tracking store. Ray's own ``MLflowLoggerCallback`` logs one flat run per trial; this one adds what the
study needs: nesting under the study's parent run, the cell as tags, the same param and metric names
in every run, failure and early-stop status, and idempotence on resume (a trial already in MLflow is
updated, never re-created).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from study.run.provenance import code_version
from trainables import metric_names
from trainables.trials import parse_trial

log = logging.getLogger("study")
# MLflow prints a full traceback for every failed SQL statement; the retries and the queue below say it in a line
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# Final metrics every fine-tuning run carries (so the compare view lines trials up).
FINAL_METRICS = (*metric_names.FINAL_METRICS, *metric_names.EXTRA_FINAL_METRICS)
_SECRET = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
_URL_AUTH = re.compile(r"(\w+://)[^/@\s]+@")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``a.b`` keys with string values; secrets and URL credentials are never logged."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif _SECRET.search(str(k)):
            continue
        else:
            out[key] = _URL_AUTH.sub(r"\1***@", str(v))[:500]
    return out


def numeric_metrics(result: dict) -> dict[str, float]:
    """The finite numeric entries of a Tune result that are ours, plus Tune's ``time_total_s``.

    ``time_total_s`` is the trial's wall time as Tune measures it (model building, data, training and
    evaluation, summed over restores); ``time_per_epoch_s`` is the training loop's own time per epoch.
    """
    skip = {"timestamp", "time_this_iter_s", "time_since_restore", "timesteps_total", "iterations_since_restore",
            "training_iteration", "pid", "done", "timesteps_since_restore", "episodes_total"}
    out = {}
    for k, v in result.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried with back-off, so that a tracking store that is briefly
    unavailable (a locked SQLite file, a restarting server) delays the study instead of failing it."""

    def __init__(self, client: MlflowClient, attempts: int = 7, first_wait_s: float = 0.25) -> None:
        self._client, self._attempts, self._wait = client, attempts, first_wait_s

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            wait = self._wait
            for attempt in range(self._attempts):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - MLflow wraps store errors in several types
                    if attempt == self._attempts - 1 or not _transient(exc):
                        raise
                    log.warning(f"MLflow {name} failed ({type(exc).__name__}: {str(exc)[:120]}); retrying in {wait:.1f}s")
                    time.sleep(wait)
                    wait *= 2

        return call


def _transient(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("locked", "busy", "connection", "timeout", "timed out", "unavailable",
                                   "temporarily", "503", "502", "504", "operationalerror", "max retries"))


class StudyTracker:
    """The study's experiment and parent run; created once, found again on resume."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str | None = None,
                 artifact_location: str | None = None) -> None:
        self.uri = tracking_uri
        self._client: MlflowClient | None = None
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        if exp is not None and exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        if parent_run_id is None:
            parent = self.client.create_run(self.experiment_id, run_name=experiment, tags={"stage": "study"})
            parent_run_id = parent.info.run_id
        self.parent_run_id = parent_run_id

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = RetryingClient(MlflowClient(self.uri))
        return self._client

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment; the client reconnects lazily
        return {**self.__dict__, "_client": None}

    def log_study_params(self, params: dict) -> None:
        flat = flatten(params)
        existing = self.client.get_run(self.parent_run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.parent_run_id, params=new[i : i + 100])

    def log_pretrained_reports(self, external: dict[str, dict]) -> None:
        """Each external checkpoint's loading report (per backbone) as ``pretrained/NAME__BACKBONE.json`` on
        the study's parent run."""
        for key, found in external.items():
            self.client.log_dict(self.parent_run_id, found["report"], f"pretrained/{key}.json")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    def child_runs(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'", max_results=10000
        )


class MLflowTrialCallback(Callback):
    """Tune callback: one nested MLflow run per trial, metrics per epoch, final status and reason.

    Tune's event loop only queues the writes; a background thread makes them, in order. A function
    trainable waits for the driver after every ``tune.report``, so a write made in the loop would add
    its latency to every epoch of every trial. When the tracking store is unavailable (a locked SQLite
    file, a restarting server) the writes wait in the queue and are made once it is back; at the end of
    the study (also after Ctrl-C) the queue is drained before the launcher exits. An epoch that a
    retried or resumed trial reports again is not logged twice.
    """

    def __init__(self, tracker: StudyTracker, study_tags: dict[str, str] | None = None,
                 final_flush_s: float = 300.0, retry_s: float = 2.0, study_params: dict | None = None) -> None:
        self.tracker = tracker
        self.study_tags = study_tags or {}
        self.study_params = study_params or {}  # logged on every trial's run too (e.g. the code version)
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.logged: dict[str, int] = {}  # trial id -> last epoch logged
        self.final_flush_s, self.retry_s = final_flush_s, retry_s
        self._init_writer()

    def _init_writer(self) -> None:
        self._pending: deque[tuple[str, Callable[[], None]]] = deque()
        self._client: RetryingClient | None = None
        self._thread: threading.Thread | None = None
        self._wake, self._closing, self._down = threading.Event(), False, False

    _WRITER = ("_pending", "_client", "_thread", "_wake", "_closing", "_down")  # made anew by _init_writer

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment: no thread, queue or client
        return {k: v for k, v in self.__dict__.items() if k not in self._WRITER}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_writer()

    @property
    def client(self) -> MlflowClient:
        # no retries of our own (MLflow already waits: 20 s on a locked SQLite file, several HTTP retries
        # for a server): a store that stays unavailable is handled by the queue
        if self._client is None:
            self._client = RetryingClient(MlflowClient(self.tracker.uri), attempts=1)
        return self._client

    # -- the write queue and its thread -----------------------------------------------------------------
    def _submit(self, what: str, op: Callable[[], None]) -> None:
        self._pending.append((what, op))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
            self._thread.start()
        self._wake.set()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if not self._flush():
                time.sleep(self.retry_s)
            elif self._closing:
                return

    def _flush(self) -> bool:
        """Make the queued writes in order; stop at the first that fails transiently. True when empty."""
        while self._pending:
            what, op = self._pending[0]
            try:
                op()
            except Exception as exc:  # noqa: BLE001 - the study must outlive its tracking store
                if _transient(exc):
                    if not self._down:
                        log.warning(f"MLflow unavailable ({type(exc).__name__}); writes are queued "
                                    f"({len(self._pending)} now) and made once it is back")
                    self._down = True
                    return False
                log.error(f"MLflow rejected {what}: {type(exc).__name__}: {str(exc)[:300]}")
            if self._down:
                log.warning("MLflow available again; making the queued writes")
                self._down = False
            self._pending.popleft()
        return True

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is made (or ``timeout_s`` passes); True when none is left."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.final_flush_s if timeout_s is None else timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._flush()
        return not self._pending

    def on_experiment_end(self, trials, **info) -> None:
        if not self.drain():
            log.error(f"{len(self._pending)} MLflow write(s) could not be made: the tracking store stayed "
                      f"unavailable for {self.final_flush_s:.0f}s; Tune's results in the output folder are complete")

    # -- runs ---------------------------------------------------------------------------------------
    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.tracker.parent_run_id}' and tags.trial_id = '{trial.trial_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "epoch")
            self.logged[trial.trial_id] = max((int(m.step) for m in history), default=0)
        else:
            from trainables.trials import parse_trial

            cfg = trial.config
            spec = parse_trial(cfg)
            cell = {k: v for k, v in asdict(spec.cell).items() if v != ""}
            tags = {
                "mlflow.parentRunId": self.tracker.parent_run_id,
                "trial_id": trial.trial_id,
                # Tune's running number of the trial (the prefix of its folder name): the order of suggestion
                "trial_number": str(getattr(trial, "experiment_tag", "") or "").split("_")[0],
                "stage": spec.stage,
                "phase": spec.phase,
                **({"race_round": str(spec.race_round)} if getattr(spec, "race_round", None) is not None else {}),
                **{("cell" if k == "id" else k): str(v) for k, v in cell.items()},
                **self.study_tags,
            }
            name = f"{spec.stage}-{spec.cell.id or trial.trial_id}-{trial.trial_id}"
            external = getattr(spec, "pretrained", None) or {}
            if external:  # an external checkpoint: which file (its sha256) and how much of it loaded
                tags["pretrained_sha256"] = str(external.get("sha256", ""))
            run_id = self.client.create_run(self.tracker.experiment_id, run_name=name, tags=tags).info.run_id
            params = [Param(k, str(v)) for k, v in {**self.study_params, **flatten(cfg)}.items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
            if external:
                now = int(time.time() * 1000)
                self.client.log_batch(run_id, metrics=[
                    Metric(f"pretrained_{k}", float(external[k]), now, 0)
                    for k in ("loaded_fraction", "encoder_loaded_fraction") if k in external])
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._submit(f"the run of trial {trial.trial_id}", lambda: self._run_for(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        tags = [RunTag("node_id", str(result.get("node_id", ""))), RunTag("node_ip", str(result.get("node_ip", "")))]
        tags += [RunTag(k, str(result[k])) for k in (*RESULT_TAGS, "hostname") if result.get(k) is not None]
        cases = case_rows(result)
        val_cases = case_rows(result, VAL_CASES)

        def op() -> None:
            run_id = self._run_for(trial)
            if 0 < step <= self.logged.get(trial.trial_id, 0):
                return  # an epoch a retried or resumed trial reports again (it restarted before it)
            for i in range(0, len(metrics), 500):
                self.client.log_batch(run_id, metrics=metrics[i : i + 500], tags=tags if i == 0 else [])
            if cases:  # the test evaluation, one row per (subject, target, region): an MLflow table artifact
                self.client.log_table(run_id, data=cases_to_columns(cases), artifact_file=TEST_CASES_FILE)
            if val_cases:  # the kept epoch's validation rows, beside them: what the choice of a cell reads
                self.client.log_table(run_id, data=cases_to_columns(val_cases), artifact_file=VAL_CASES_FILE)
            self.logged[trial.trial_id] = step

        self._submit(f"epoch {step} of trial {trial.trial_id}", op)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:

        early = not parse_trial(trial.config).ran_all_epochs(trial.last_result or {})
        self._submit(f"the end of trial {trial.trial_id}",
                     lambda: self._end(trial, "FINISHED", {"outcome": "stopped_early" if early else "completed"}))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A failed attempt that Tune retries (``--max-failures``): its reason is kept on the run."""
        failures = str(getattr(getattr(trial, "run_metadata", None), "num_failures", "") or "")
        tags = {"retried_failures": failures, "last_failure_reason": failure_reason(trial)}
        self._submit(f"the retry of trial {trial.trial_id}",
                     lambda: [self.client.set_tag(self._run_for(trial), k, v) for k, v in tags.items()])

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        tags = {"outcome": "failed", "failure_reason": failure_reason(trial)}
        self._submit(f"the failure of trial {trial.trial_id}", lambda: self._end(trial, "FAILED", tags))

    def _end(self, trial, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_for(trial)
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status=status)


# The per-case test results a fine-tuning trial reports with its last epoch, and the artifact they become.
TEST_CASES, VAL_CASES = "test_cases", "val_cases"
TEST_CASES_FILE, VAL_CASES_FILE = "test_cases.json", "val_cases.json"


def case_rows(result: dict, key: str = TEST_CASES) -> list | None:
    """The per-case rows a fine-tuning trial reports (a JSON text under ``test_cases``, or ``val_cases`` for the
    validation split), or None."""
    cases = result.get(key)
    if isinstance(cases, str):
        try:
            cases = json.loads(cases)
        except ValueError:
            return None
    return cases if isinstance(cases, list) and cases else None


def split_rows(result: dict) -> dict | None:
    """A finished trial's per-case rows of both splits, ``{"val": rows, "test": rows}``, or None without test rows."""
    test = case_rows(result)
    return {"val": case_rows(result, VAL_CASES), "test": test} if test else None


def cases_to_columns(rows: list[dict]) -> dict[str, list]:
    """Rows (dicts with the same keys) -> columns, the shape ``MlflowClient.log_table`` takes."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


# Text results a trial reports, kept as run tags: where its files are, which weights it started from and
# which labelled subjects it trained on.
RESULT_TAGS = ("model_path", "checkpoint_path", "initial_body_sha256", "train_subjects")


def failure_reason(trial) -> str:
    """The last error of a trial, one line: its exception's last line from Tune's error file."""
    path = getattr(trial, "error_file", None)
    if not path or not Path(path).exists():
        return "unknown error"
    text = Path(path).read_text().strip()
    attempt = text.rsplit("Failure # ", 1)[-1]  # Tune appends one block per failed attempt
    lines = [ln.strip() for ln in attempt.splitlines()[1:] if ln.strip()] or [ln.strip() for ln in text.splitlines()]
    reason = lines[-1] if lines else "unknown error"
    if "SIGKILL" in attempt or "died unexpectedly" in attempt or "ActorDiedError" in attempt:
        reason = "the trial's process died (killed, e.g. SIGKILL or the out-of-memory killer): " + reason
    return reason[:5000]


# MLflow 3 opens an experiment in its GenAI view unless the experiment says it holds model training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def runs_url(server: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (the model-training view, not the GenAI one)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def open_ui_command(tracking_uri: str, experiment_id: str | None = None) -> list[str]:
    """How to see the study in the MLflow UI: the command that serves a file store, then the runs page."""
    lines = []
    server = tracking_uri
    if tracking_uri.startswith("sqlite:"):
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
        server = UI_ADDRESS
    if experiment_id is None:
        return lines or [f"MLflow UI: {server}"]
    return [*lines, f"study runs: {runs_url(server, experiment_id)}"]


__all__ = ["MLflowTrialCallback", "StudyTracker", "code_version", "flatten", "mlflow", "open_ui_command", "runs_url"]
