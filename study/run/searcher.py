"""One Ray Tune searcher for the whole study: pre-training jobs first, then one Optuna study per cell.

Ray's ``OptunaSearch`` cannot expand a grid, so the study expands the cells itself and gives each its
own Optuna study (TPE), stored on disk (a journal file in the output folder by default, or an RDB URL)
so that a resumed study continues the same Optuna studies. A cell's fine-tuning trials are suggested
as soon as its pre-training checkpoint exists, without waiting for the other pre-training jobs.
"""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import optuna
from ray.tune.search import Searcher

from search_spaces.finetune import first_trial, train_space
from study.evidence.racing import Race
from study.plan.grid import Cell, StudyPlan, pretrain_id
from study.run.tracking import split_rows
from trainables.atomic import atomic_write, atomic_write_text, strict_json
from trainables.errors import StudyInputError
from trainables.finetune import STRATEGIES
from trainables.trials import ran_all_epochs

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Where this driver writes the race's record (set by the launcher for a new and a resumed study alike: the
# searcher restored by ``--resume`` carries the path of the folder where the study started).
RACE_RECORD: dict[str, str] = {}


def optuna_storage(url: str | None, output: str | Path) -> optuna.storages.BaseStorage | str:
    """The per-cell studies' storage: an RDB URL as given, else a journal file in the output folder.

    The journal uses a lock file next to it, which is safe for writers on several nodes of a shared
    filesystem; an RDB URL (``--optuna-storage postgresql://...``) is the other multi-node choice.
    """
    if url:
        return url
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(output) / "optuna.journal")
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def sample_finetune_params(trial: optuna.Trial, strategy: str) -> tuple[dict, dict]:
    """(train params, strategy params) for one trial: the shared training space + the strategy's space."""
    train = train_space(trial, strategy)
    params = STRATEGIES.get(strategy).space(trial)
    clash = set(train) & set(params)
    if clash:
        raise StudyInputError(f"search space of {strategy!r} reuses training parameter names {sorted(clash)}")
    return train, params


@dataclass
class _Live:
    kind: str  # "pretrain" | "finetune" | "seeds" | "race" | "confirm"
    key: str  # pre-training job key or cell id
    number: int = -1  # Optuna trial number (-1: fixed parameters, nothing to tell Optuna); a race's round


@dataclass
class _State:
    pretrain_pending: list[str] = field(default_factory=list)
    pretrain_running: set[str] = field(default_factory=set)
    checkpoints: dict[str, str] = field(default_factory=dict)
    pretrain_failed: dict[str, str] = field(default_factory=dict)
    suggested: dict[str, int] = field(default_factory=dict)  # cell id -> search trials suggested
    completed: dict[str, int] = field(default_factory=dict)  # cell id -> search trials ended (any outcome)
    best: dict[str, tuple[float, dict, dict]] = field(default_factory=dict)  # cell id -> (score, train, params)
    best_rows: dict[str, dict | None] = field(default_factory=dict)  # cell id -> {"val", "test"} rows of its best
    best_model: dict[str, str] = field(default_factory=dict)  # cell id -> model.pt of its best trial
    skipped: dict[str, str] = field(default_factory=dict)  # cell id -> why it cannot run (a teacher without a model)
    reruns: dict[str, int] = field(default_factory=dict)  # cell id -> seed re-runs suggested
    asked: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # trial id -> (train, params)
    live: dict[str, _Live] = field(default_factory=dict)
    cursor: int = 0
    race: Race | None = None  # the race after the search (None: no race)
    # the confirmation runs after the choice: {best, reference, chosen_from, queue, trials_used, ended, finished}
    confirm: dict | None = None


class StudySearcher(Searcher):
    """Suggests pre-training trials, then fine-tuning trials from each cell's Optuna study.

    Args:
        plan: the grid.
        make_pretrain: ``(method, backbone) -> trial config`` for a pre-training job.
        make_finetune: ``(cell, checkpoint, train params, strategy params, seed, phase) -> trial config``;
            ``phase`` is ``search``, ``seeds`` (a re-run of the cell's best configuration) or ``race`` (a
            repeat of a race round, :mod:`study.evidence.racing`; its config also carries ``race_round``).
        output: the study's output folder (holds the Optuna journal unless ``storage_url`` is given).
        storage_url: an Optuna RDB URL for the per-cell studies.
        study_name: prefix of the Optuna study names.
        race_file: where the race's record is written as it goes (``race.json`` in the study folder).
        external: ``"NAME__BACKBONE" -> body.pt`` of the plan's external checkpoints (:mod:`study.run.checkpoints`).
        task: the study's task spec (its dict form; None: the PCS task): how the race reads per-case rows.
        confirm_file: where the confirmation runs' record is written (``confirm.json`` in the study folder).
    """

    def __init__(
        self,
        plan: StudyPlan,
        make_pretrain: Callable[[str, str], dict],
        make_finetune: Callable[[Cell, str | None, dict, dict, int, str], dict],
        output: str,
        study_name: str,
        storage_url: str | None = None,
        metric: str = "score",
        mode: str = "max",
        race_file: str | None = None,
        external: dict[str, str] | None = None,
        task: dict | None = None,
        confirm_file: str | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)  # see PerCellASHA: no study-wide metric for Tune's check
        self.score_metric = metric
        self.plan, self.make_pretrain, self.make_finetune = plan, make_pretrain, make_finetune
        self.output, self.storage_url, self.study_name = output, storage_url, study_name
        self._storage: optuna.storages.BaseStorage | str | None = None
        self.cells = {c.id: c for c in plan.cells}
        jobs = [pretrain_id(*k) for k in plan.pretrain_jobs()]
        self.state = _State(pretrain_pending=jobs)
        if plan.racing:
            self.state.race = Race(max_trials=plan.race_trials, max_minutes=plan.race_minutes, seed=plan.seed,
                                   task=task)
        self.race_file = race_file
        self.confirm_file = confirm_file
        for cell in plan.cells:  # no pre-training job (random initialisation, an external checkpoint): ready now
            key = cell.pretrain_id
            if key not in jobs:
                self.state.checkpoints[key] = (external or {}).get(key, "")
        self._studies: dict[str, optuna.Study] = {}

    def study(self, cell_id: str) -> optuna.Study:
        if self._storage is None:
            self._storage = optuna_storage(self.storage_url, self.output)
        if cell_id not in self._studies:
            # each cell its own sampler seed, so that cells do not all start from the same first trial
            cell_seed = (self.plan.seed * 1_000_003 + zlib.crc32(cell_id.encode())) % 2**31
            sampler = optuna.samplers.TPESampler(seed=cell_seed, n_startup_trials=max(2, self.plan.num_samples // 3))
            study = optuna.create_study(
                study_name=f"{self.study_name}/{cell_id}", storage=self._storage, sampler=sampler,
                direction="maximize", load_if_exists=True,
            )
            if not study.trials:  # a new study starts from its strategy's starting point (not on --resume)
                study.enqueue_trial(first_trial(self.cells[cell_id].strategy), skip_if_exists=True)
            self._studies[cell_id] = study
        return self._studies[cell_id]

    # -- Searcher API -----------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        st = self.state
        if st.pretrain_pending:
            key = st.pretrain_pending.pop(0)
            st.pretrain_running.add(key)
            st.live[trial_id] = _Live("pretrain", key)
            return self.make_pretrain(*key.split("__"))
        ids = list(self.cells)
        for i in range(len(ids)):  # round robin over ready cells
            cell = self.cells[ids[(st.cursor + i) % len(ids)]]
            key = cell.pretrain_id
            if key not in st.checkpoints:
                continue
            config = self._suggest_search(trial_id, cell, key) or self._suggest_rerun(trial_id, cell, key)
            if config is not None:
                st.cursor = (st.cursor + i + 1) % len(ids)
                return config
        config = self._suggest_race(trial_id) or self._suggest_confirm(trial_id)
        if config is not None:
            return config
        if self._finished():
            return Searcher.FINISHED
        return None

    def _teacher_model(self, cell: Cell) -> str | None:
        """A distillation cell's teacher model: ``""`` for a cell without a teacher, its teacher cell's best
        model once that cell's search has ended, else None (wait); a teacher that can never have a model
        (its pre-training or every search trial failed) marks the cell skipped."""
        teacher = cell.teacher_id
        if teacher is None:
            return ""
        st, source = self.state, self.cells[teacher]
        if source.pretrain_id in st.pretrain_failed or (
                st.completed.get(teacher, 0) >= self.plan.samples(source) and not st.best_model.get(teacher)):
            st.skipped[cell.id] = f"its teacher cell {teacher} has no fine-tuned model"
            return None
        if st.completed.get(teacher, 0) < self.plan.samples(source):
            return None
        return st.best_model[teacher]

    def _suggest_search(self, trial_id: str, cell: Cell, key: str) -> dict | None:
        st = self.state
        n = st.suggested.get(cell.id, 0)
        if n >= self.plan.samples(cell) or cell.id in st.skipped:
            return None
        teacher = self._teacher_model(cell)
        if teacher is None:  # a distillation cell waits for its teacher cell's search
            return None
        if cell.params is not None:  # fixed configuration: no search
            train, params, number = dict(cell.params.get("train", {})), dict(cell.params.get("strategy_params", {})), -1
        else:
            trial = self.study(cell.id).ask()
            train, params = sample_finetune_params(trial, cell.strategy)
            number = trial.number
        if teacher:
            params = {**params, "teacher": teacher}
        st.suggested[cell.id] = n + 1
        st.live[trial_id] = _Live("finetune", cell.id, number)
        st.asked[trial_id] = (train, params)
        seed = self.plan.seed * 100003 + n + 1
        return self.make_finetune(cell, st.checkpoints[key] or None, train, params, seed, "search")

    def _suggest_rerun(self, trial_id: str, cell: Cell, key: str) -> dict | None:
        """Once a cell's search has ended, its best configuration again with ``plan.seeds`` new seeds."""
        st = self.state
        done = st.reruns.get(cell.id, 0)
        if done >= self.plan.seeds or st.completed.get(cell.id, 0) < self.plan.samples(cell) or cell.id not in st.best:
            return None
        _, train, params = st.best[cell.id]
        st.reruns[cell.id] = done + 1
        st.live[trial_id] = _Live("seeds", cell.id)
        seed = self.plan.seed * 100003 + 50000 + done + 1
        return self.make_finetune(cell, st.checkpoints[key] or None, train, params, seed, "seeds")

    def _search_done(self) -> bool:
        """Every pre-training job and every search trial has ended."""
        st = self.state
        if st.pretrain_pending or st.pretrain_running:
            return False
        for cell in self.cells.values():
            self._teacher_model(cell)  # marks a distillation cell whose teacher can never have a model
        return all(st.completed.get(c.id, 0) >= self.plan.samples(c) for c in self.cells.values()
                   if c.pretrain_id not in st.pretrain_failed and c.id not in st.skipped)

    def _suggest_race(self, trial_id: str) -> dict | None:
        """Once the search has ended: the race's next repeat (a cell's best configuration, the round's seed)."""
        st, race = self.state, self.state.race
        if race is None:
            return None
        race.tick()
        if race.status == "waiting":
            if not self._search_done():
                return None
            race.start({c.id: st.best_rows.get(c.id) for c in self.cells.values()
                        if c.pretrain_id not in st.pretrain_failed and c.id not in st.skipped})
            self._write_race()
        cell_id = race.suggest()
        if cell_id is None:
            return None
        cell = self.cells[cell_id]
        _, train, params = st.best[cell_id]
        st.live[trial_id] = _Live("race", cell_id, race.round)
        seed = self.plan.seed * 100003 + 70000 + race.round  # one seed per round: repeats are paired by seed
        config = self.make_finetune(cell, st.checkpoints[cell.pretrain_id] or None, train, params,
                                    seed, "race")
        return {**config, "race_round": race.round}

    def _repeats_done(self) -> bool:
        """The search, every seed re-run and the race have ended: the choice on validation can be made."""
        st = self.state
        if not self._search_done() or any(live.kind in ("finetune", "seeds", "race") for live in st.live.values()):
            return False
        if any(c.id in st.best and st.reruns.get(c.id, 0) < self.plan.seeds for c in self.cells.values()):
            return False
        return st.race is None or st.race.finished

    def _suggest_confirm(self, trial_id: str) -> dict | None:
        """Once the choice is made (the race's best, else the best search run on validation): fresh runs of the
        chosen cell and of the reference, ``plan.confirm_runs`` each, the i-th of both with the same seed."""
        st, k = self.state, self.plan.confirm_runs
        if k <= 0 or st.confirm is not None and not st.confirm["queue"]:
            return None
        if st.confirm is None:
            if not self._repeats_done():
                return None
            race_best = st.race.best if st.race is not None else None
            best = race_best if race_best in st.best else max(st.best, key=lambda c: st.best[c][0], default=None)
            reference = self.plan.reference_cell()
            cells = [c for c in dict.fromkeys((best, reference)) if c is not None and c in st.best]
            st.confirm = {"best": best, "reference": reference, "chosen_from": "race" if race_best else "search",
                          "queue": [[c, i] for i in range(k) for c in cells], "trials_used": 0, "ended": 0,
                          "finished": not cells}
            self._write_confirm()
            if not cells:
                return None
        cell_id, i = st.confirm["queue"].pop(0)
        st.confirm["trials_used"] += 1
        cell = self.cells[cell_id]
        _, train, params = st.best[cell_id]
        st.live[trial_id] = _Live("confirm", cell_id, i)
        seed = self.plan.seed * 100003 + 90000 + i  # the i-th confirmation of both cells shares a seed
        return self.make_finetune(cell, st.checkpoints[cell.pretrain_id] or None, train, params, seed, "confirm")

    def _write_confirm(self) -> None:
        if self.state.confirm is not None and self.confirm_file:
            atomic_write_text(Path(self.confirm_file), strict_json(self.state.confirm))

    def _write_race(self) -> None:
        path = RACE_RECORD.get("path") or self.race_file  # the launcher's: a resumed study may have moved
        if self.state.race is not None and path:
            self.state.race.write(path)

    def _finished(self) -> bool:
        st = self.state
        if st.pretrain_pending or st.pretrain_running or st.live:
            return False
        for cell in self.cells.values():
            key = cell.pretrain_id
            self._teacher_model(cell)  # marks a distillation cell whose teacher can never have a model
            if key in st.pretrain_failed or cell.id in st.skipped:
                continue
            if st.suggested.get(cell.id, 0) < self.plan.samples(cell):
                return False
            if cell.id in st.best and st.reruns.get(cell.id, 0) < self.plan.seeds:
                return False
        if st.race is not None and not st.race.finished:
            return False
        return self.plan.confirm_runs <= 0 or (st.confirm is not None and st.confirm["finished"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self.state.live.pop(trial_id, None)
        if live is None:
            return
        if live.kind == "pretrain":
            self.state.pretrain_running.discard(live.key)
            if error or not result or "checkpoint_path" not in result:
                self.state.pretrain_failed[live.key] = "pre-training trial failed"
            else:
                self.state.checkpoints[live.key] = result["checkpoint_path"]
            return
        if live.kind == "seeds":
            return
        if live.kind == "confirm":
            confirm = self.state.confirm
            confirm["ended"] += 1
            confirm["finished"] = not confirm["queue"] and confirm["ended"] >= confirm["trials_used"]
            self._write_confirm()
            return
        st = self.state
        if live.kind == "race":
            self._race_result(live, result, error)
            return
        st.completed[live.key] = st.completed.get(live.key, 0) + 1
        asked = st.asked.pop(trial_id, ({}, {}))
        if error or not result or self.score_metric not in result:
            state, value = optuna.trial.TrialState.FAIL, None
        elif not ran_all_epochs({"epoch": 0, **result}, self.plan.finetune_epochs):  # stopped early by ASHA
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state, value = optuna.trial.TrialState.COMPLETE, float(result[self.score_metric])
            if live.key not in st.best or value > st.best[live.key][0]:
                st.best[live.key] = (value, *asked)
                st.best_rows[live.key] = split_rows(result)
                st.best_model[live.key] = str(result.get("model_path") or "")
        if live.number >= 0:
            study = self.study(live.key)
            if value is None:
                study.tell(live.number, state=state)
            else:
                study.tell(live.number, value)

    def _race_result(self, live: _Live, result: dict | None, error: bool) -> None:
        race = self.state.race
        if race is None or live.number != race.round:  # a repeat of a round already evaluated
            return
        rows = None if error or not result else split_rows(result)
        reason = ("the repeat failed after its retries (its reason: the failure_reason tag of its MLflow run)"
                  if error or not result else "" if rows else "the repeat reported no per-case test results")
        race.record(live.key, rows, reason)
        self._write_race()

    def __getstate__(self) -> dict:  # Tune pickles the searcher with the experiment; storage reopens lazily
        d = dict(self.__dict__)
        d["_studies"], d["_storage"] = {}, None
        return d

    # -- resume -----------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        if self.state.race is not None:
            self.state.race.tick()  # the race's clock up to now: time after an interruption does not count
        atomic_write(Path(checkpoint_path), lambda tmp: tmp.write_bytes(pickle.dumps(self.state)))

    def restore(self, checkpoint_path: str) -> None:
        state = pickle.loads(Path(checkpoint_path).read_bytes())
        for f in fields(_State):  # a state saved by an earlier version lacks the fields added since
            if not hasattr(state, f.name):
                setattr(state, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)
        self.state = state

    def summary(self) -> str:
        st = self.state
        return json.dumps({"checkpoints": len(st.checkpoints), "failed_pretrain": list(st.pretrain_failed),
                           "suggested": sum(st.suggested.values()), "skipped": st.skipped})
