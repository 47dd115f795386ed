"""``python -m study.launch``: run a pre-training x fine-tuning study on Ray Tune, tracked in MLflow.

Examples::

    python -m study.launch --grid smoke --output runs/smoke
    python -m study.launch --grid full                      # the main job (`make study`)
    python -m study.launch --resume runs/full               # continue an interrupted study
    python -m study.launch --grid full --address auto       # on an existing Ray cluster
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from study.evidence.racing import CONFIRM_FILE, RACE_FILE, read_confirmation, read_race
from study.evidence.racing import FINAL as RACE_FINAL
from study.plan.grid import BUDGETS, GRIDS, Cell, StudyPlan, labelled_count, pretrain_id, select_plan
from trainables import shared_storage
from trainables.atomic import atomic_write_text
from trainables.errors import StudyInputError
from trainables.registration import ROI_MODES
from trainables.task import TaskSpec, as_task, default_task, load_task

STUDY_FILE = "study.json"


@dataclass
class TrialFactory:
    """Builds the plain-dict trial configs Tune carries (picklable: Tune saves it with the searcher)."""

    plan: StudyPlan
    data: dict
    data_id: str
    output: str
    pretrain_cache: str
    checkpoint_every_s: float = 30.0
    external: dict = field(default_factory=dict)  # "NAME__BACKBONE" -> converted external checkpoint (study.run.checkpoints)
    train_subjects: int = 0  # labelled training subjects of the cohort (a label fraction keeps part of them)

    def backbone(self, name: str) -> dict:
        return {"name": name, "width": self.plan.backbone_width(name)}

    def pretrain(self, method: str, backbone: str) -> dict:
        """A pre-training trial's config (:class:`trainables.trials.PretrainTrial`, as a plain dict)."""
        from trainables.backbones import BackboneConfig
        from trainables.pretrain.loop import PretrainConfig
        from trainables.trials import CellRef, PretrainTrial, _data_config

        return PretrainTrial(
            backbone=BackboneConfig(**self.backbone(backbone)),
            pretrain=PretrainConfig(method=method, epochs=self.plan.pretrain_epochs, batch_size=self.plan.batch_size,
                                    seed=self.plan.seed, **self.plan.pretrain_settings(method)),
            data=_data_config(self.data),
            cache_dir=self.pretrain_cache,
            data_id=self.data_id,
            cell=CellRef(pretrain_id(method, backbone), method, backbone),
        ).to_dict()

    def finetune(self, cell: Cell, checkpoint: str | None, train: dict, params: dict, seed: int,
                 phase: str = "search") -> dict:
        """A fine-tuning trial's config (:class:`trainables.trials.FinetuneTrial`, as a plain dict)."""
        from trainables.backbones import BackboneConfig
        from trainables.engine import TrainConfig
        from trainables.trials import CellRef, FinetuneTrial, _data_config

        return FinetuneTrial(
            backbone=BackboneConfig(**self.backbone(cell.backbone)),
            strategy=cell.strategy,
            strategy_params=params,
            train=TrainConfig(**{**train, "epochs": self.plan.finetune_epochs, "batch_size": self.plan.batch_size,
                                 "seed": seed}),
            data=_data_config({**self.data, "train_fraction": cell.fraction, "subset_seed": self.plan.seed}),
            pretrain_checkpoint=checkpoint or None,
            output_dir=shared_storage.join(self.output, "models", f"{cell.id}__{seed}"),
            cell=CellRef(cell.id, cell.pretrain, cell.backbone, cell.strategy, cell.fraction),
            phase=phase,
            labelled_subjects=labelled_count(self.train_subjects, cell.fraction) if self.train_subjects else None,
            checkpoint_every_s=self.checkpoint_every_s,
            pretrained=self._external(cell),
        ).to_dict()

    def _external(self, cell: Cell) -> dict | None:
        """An external checkpoint's identity for the run's params and tags (none for other cells)."""
        found = self.external.get(cell.pretrain_id)
        if not found:
            return None
        keys = ("name", "file", "sha256", "loaded_fraction", "encoder_loaded_fraction")
        return {k: found[k] for k in keys}


def _comma(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def build_parser() -> argparse.ArgumentParser:
    from study.cli import OneLineParser

    p = OneLineParser(prog="python -m study.launch", description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="full", help=f"grid preset ({', '.join(GRIDS)}) or a grid FILE.yaml")
    p.add_argument("--budget", choices=None, help="smoke | laptop | paper: sizes, epochs and trials "
                   "(default: smoke for --grid smoke; else laptop without a GPU, paper with one)")
    p.add_argument("--output", help="study folder (default runs/<study name>: the grid's name)")
    p.add_argument("--resume", metavar="DIR", help="continue the study in DIR")
    p.add_argument("--cohort", help="manifest.csv of your own cohort (default: the embedded synthetic cohort)")
    p.add_argument("--task", default=None, metavar="NAME|FILE.yaml",
                   help="the task: a built-in name (pcs: PCS presence per hemisphere, the default; pcs3: absent / "
                   "present / prominent) or a task spec file; default: task.yaml beside the --cohort manifest, "
                   "else pcs (docs: How-to, 'Your own task')")
    p.add_argument("--roi", choices=ROI_MODES, default=None,
                   help="how images reach the study's MNI box: register (affine registration to the ICBM152 "
                   "template; whole-head scans in any orientation; the default with --cohort), template "
                   "(already in MNI space; the default for the embedded cohort, which is written there), none "
                   "(already cropped to the box: reorient, resample, centred crop); a manifest's roi column "
                   "overrides it per subject")
    p.add_argument("--pretrained", action="append", metavar="NAME=PATH",
                   help="an external checkpoint as a pre-training method NAME (repeatable): a .pt/.pth/.ckpt file "
                   "(MONAI SwinUNETR/SegResNet/UNet weights, SuPreM, a DataParallel or nested state dict) or a "
                   "pre-training cache folder; every strategy is applied to it; nothing is downloaded")
    p.add_argument("--pretrained-min-fraction", type=float, default=None,
                   help="refuse an external checkpoint that loads less than this share of the backbone's encoder "
                   "parameters (default 0.5)")
    p.add_argument("--label-fractions", metavar="F,F,...",
                   help="run every cell at each share of the labelled training subjects, e.g. 0.1,0.25,1.0 "
                   "(nested subsets, the same subjects for every cell at a study seed)")
    p.add_argument("--num-samples", type=int, help="Optuna trials per cell")
    p.add_argument("--methods", help="comma list of pre-training methods to keep")
    p.add_argument("--strategies", help="comma list of fine-tuning strategies to keep")
    p.add_argument("--backbones", help="comma list of backbones")
    p.add_argument("--seed", type=int, help="study seed")
    p.add_argument("--seeds", type=int, help="re-run every cell's best configuration with N new seeds (uniform "
                   "repeats instead of a race; implies --race off)")
    p.add_argument("--race", choices=["on", "off"], default=None,
                   help="after the search, race the cells that can still be the best: re-run their best "
                   "configurations a seed at a time and drop each as soon as it is shown worse (default: on "
                   "where the budget has a race budget: laptop, paper)")
    p.add_argument("--race-budget", metavar="N|Mmin", default=None,
                   help="the race's budget: N repeats (e.g. 16) or M minutes (e.g. 10min); "
                   "default: the budget's ("
                   + ", ".join(f"{n} {b['race_trials']} repeats" for n, b in BUDGETS.items() if b.get("race_trials"))
                   + ")")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001); default: start a local Ray")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPU share per trial (0.25 = four per GPU); default: measured per cell on a GPU cluster, 0 without")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU cores per trial (torch threads follow)")
    p.add_argument("--max-concurrent", type=int, default=0, help="most trials at once (0 = as resources allow)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<output>/mlflow.db)")
    p.add_argument("--optuna-storage", help="Optuna RDB URL for the per-cell studies (default: journal file)")
    p.add_argument("--early-stopping", choices=["asha", "none"], default="asha",
                   help="asha: per-cell ASHA on the selection score (default); none: every trial runs all epochs")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0,
                   help="seconds between a fine-tuning trial's checkpoints (0 = every epoch); a retried or "
                   "resumed trial continues from its last one")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial before it counts failed")
    p.add_argument("--storage", help="shared storage for Tune's state, trial checkpoints, pre-training checkpoints, "
                   "the cohort and models: a folder every node mounts or an object-store URI such as "
                   "s3://bucket/prefix (default: the output folder)")
    p.add_argument("--pretrain-cache", help="folder or URI of cached pre-training checkpoints, shared by studies "
                   "(default: pretrain_cache beside the output folder, or under an object-store --storage)")
    p.add_argument("--confirm-runs", type=int, default=None, metavar="N",
                   help="after the choice on validation (the race's, else the search's), N fresh runs of the chosen "
                   "cell and of the reference whose test results confirm it (default: the budget's; laptop 3, smoke "
                   "0); a resolved difference needs 3 on each side")
    p.add_argument("--margin", type=float, default=None, metavar="M",
                   help="the non-inferiority margin of the report's 'as good at lower cost' claims, in the compared "
                   "metric's units (default 0.02)")
    p.add_argument("--reference", default=None, metavar="CELL",
                   help="the cell the report compares every other with (default none__full__<backbone>, "
                   "training from scratch), e.g. reconstruction__full__segresnet")
    p.add_argument("--trial-resources", default=None,
                   help='extra custom Ray resources each fine-tuning trial needs, as JSON, e.g. \'{"gpu_node": 0.1}\'')
    return p


def race_settings(args: argparse.Namespace) -> dict:
    """StudyPlan fields from ``--race`` and ``--race-budget`` (validated), and ``--seeds``' choice of no race."""
    race, budget = getattr(args, "race", None), getattr(args, "race_budget", None)
    if race == "on" and args.seeds:
        raise StudyInputError(f"--race on and --seeds {args.seeds} both add repeats after the search: --seeds "
                              "re-runs every cell, a race only the contenders; choose one")
    out: dict = {}
    if race is not None:
        out["race"] = race == "on"
    elif args.seeds:
        out["race"] = False
    if budget is not None:
        if race == "off":
            raise StudyInputError("--race-budget sets the budget of a race, and --race off turns racing off; "
                                  "drop one of them")
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(min|m|minutes?)?\s*", str(budget))
        if not m or float(m.group(1)) <= 0 or (not m.group(2) and not m.group(1).isdigit()):
            raise StudyInputError(f"--race-budget {budget!r}: give a number of repeats (e.g. 16) or of minutes "
                                  "(e.g. 10min), greater than 0")
        if m.group(2):
            out.update(race_minutes=float(m.group(1)), race_trials=0)
        else:
            out.update(race_trials=int(m.group(1)), race_minutes=0.0)
        out.setdefault("race", True)
    return out


def _plan_from_args(args: argparse.Namespace) -> StudyPlan:
    return select_plan(
        args.grid,
        budget=args.budget,
        methods=_comma(args.methods),
        strategies=_comma(args.strategies),
        backbones=_comma(args.backbones),
        num_samples=args.num_samples,
        seed=args.seed,
        seeds=args.seeds,
        pretrained=pretrained_args(getattr(args, "pretrained", None)),
        label_fractions=fractions_arg(getattr(args, "label_fractions", None)),
        confirm_runs=getattr(args, "confirm_runs", None),
        **race_settings(args),
    )


def fractions_arg(text: str | None) -> list[float] | None:
    """``--label-fractions 0.1,0.25,1.0`` -> ``[0.1, 0.25, 1.0]`` (checked by the plan)."""
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudyInputError(f"--label-fractions {text!r}: give shares of the labelled training subjects, "
                              "e.g. 0.1,0.25,1.0") from None


def pretrained_args(values: list[str] | None) -> dict[str, str] | None:
    """``--pretrained NAME=PATH`` (repeatable) -> ``{NAME: PATH}``."""
    if not values:
        return None
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise StudyInputError(f"--pretrained {value!r}: write NAME=PATH, e.g. --pretrained "
                                  "suprem=weights/supremseg_segresnet.pth")
        if name.strip() in out:
            raise StudyInputError(f"--pretrained names {name.strip()!r} twice; give each checkpoint its own name")
        out[name.strip()] = path.strip()
    return out


def default_roi(cohort: str | None) -> str:
    """``register`` for a user's cohort (whole-head scans in scanner space); ``template`` for the embedded
    cohort, whose generator writes every subject in the MNI box already. Registering the embedded cohort
    resamples its 4 mm voxels a second time, which blurs its one-voxel grooves and costs none x full much of
    its Dice and AUC (measured by ``bench/registration.py``; its figures are on the documentation's Results
    page)."""
    return "register" if cohort else "template"


def study_task(task: str | None, cohort: str | None) -> TaskSpec:
    """``--task`` (a built-in name or a spec file), else the cohort's ``task.yaml``, else the PCS task."""
    if task:
        return load_task(task)
    from trainables.data import manifest_task

    return manifest_task(cohort) if cohort else default_task()


def prepare_data(plan: StudyPlan, output: Path, cohort: str | None, roi: str | None = None,
                 cluster: bool = False, task: TaskSpec | None = None) -> tuple[dict, str]:
    """Generate or validate the cohort and preprocess every subject once (registration to the template in
    parallel, quality checks, labels leaving the box reported), before any trial starts. ``roi``: the
    study's region-of-interest mode (default :func:`default_roi`); ``task``: what the manifest's columns and
    labels are checked against (default :func:`study_task`)."""
    roi = roi or default_roi(cohort)
    import hashlib

    from study.plan.grid import labelled_count
    from study.run.prepare import describe, preprocess_cohort
    from study.run.progress import log
    from trainables.data import DataConfig, read_manifest, roi_mode, validate_cohort

    if cohort is None:
        from study.cohort import generate_cohort

        manifest = generate_cohort(output / "cohort", subjects=plan.subjects, seed=plan.seed, spacing=plan.spacing_mm,
                                   splits=plan.splits or None)
    else:
        manifest = Path(cohort).resolve()
    task = task or study_task(None, cohort)
    records = read_manifest(manifest, task)
    validate_cohort(records, task)
    cfg = DataConfig(manifest=str(manifest), spacing_mm=plan.spacing_mm, input_size=tuple(plan.input_size), roi=roi,
                     task=task.to_dict())
    for split in ("train", "val", "test"):
        count = sum(r.split == split for r in records)
        if count < plan.batch_size:
            raise StudyInputError(
                f"{manifest}: split {split!r} has {count} subjects, fewer than the batch size {plan.batch_size}"
            )
    train = sum(r.split == "train" for r in records)
    for fraction in plan.label_fractions:
        if labelled_count(train, fraction) < plan.batch_size:
            raise StudyInputError(f"--label-fractions {fraction:g} keeps {labelled_count(train, fraction)} of the "
                                  f"{train} labelled training subjects, fewer than the batch size {plan.batch_size}; "
                                  "use a larger fraction or cohort")
    for line in describe(preprocess_cohort(cfg, records, cluster=cluster), task.foreground):
        log.info(line)
    # The cohort's identity for the pre-training cache: the manifest's bytes and how it was preprocessed.
    modes = sorted({roi_mode(r, cfg) for r in records})
    identity = Path(manifest).read_bytes() + json.dumps([cfg.spacing_mm, list(cfg.input_size), modes]).encode()
    data_id = hashlib.sha256(identity).hexdigest()[:16]
    data = asdict(cfg)
    data["input_size"] = list(cfg.input_size)
    return data, data_id


def saved_args(args: argparse.Namespace) -> dict:
    """The arguments ``study.json`` keeps for ``--resume`` and the report, with folders made absolute
    (a relative ``--storage`` must mean the same folder when the study is resumed from elsewhere)."""
    saved = {k: v for k, v in vars(args).items() if k != "resume"}
    for key in ("storage", "pretrain_cache", "cohort"):
        if saved.get(key):
            saved[key] = shared_storage.absolute(saved[key])
    if saved.get("task") and Path(saved["task"]).suffix in (".yaml", ".yml"):
        saved["task"] = str(Path(saved["task"]).resolve())
    if saved.get("pretrained"):  # NAME=PATH with the path made absolute, for the same reason
        saved["pretrained"] = [f"{name}={Path(path).resolve()}"
                               for name, path in (pretrained_args(saved["pretrained"]) or {}).items()]
    return saved


def publish_cohort(manifest: Path, storage: str, data_id: str) -> str:
    """Upload the cohort's folder (not its local preprocessing cache) to an object store, once per cohort.

    Trials download it once per node (:func:`trainables.shared_storage.fetch_tree`) and preprocess it there. The
    manifest goes last: its presence marks a complete upload. Returns the manifest's URI.
    """
    remote = shared_storage.join(storage, "cohort", data_id)
    target = shared_storage.join(remote, manifest.name)
    if not shared_storage.exists(target):
        shared_storage.put_tree(manifest.parent, remote, skip=(".cache", manifest.name))
        shared_storage.put_file(manifest, target)
    return target


def _custom_resources(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudyInputError(f"--trial-resources is not valid JSON ({exc.msg}); example: '{{\"gpu_node\": 0.1}}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise StudyInputError("--trial-resources must be a JSON object of resource name -> non-negative amount")
    return {str(k): float(v) for k, v in value.items()}


@dataclass
class StudyOutcome:
    """What a finished study hands back: Tune's results, the MLflow tracker, the plan and the folder."""

    results: object
    tracker: object
    plan: StudyPlan
    output: Path


def _join_cluster(address: str) -> None:
    """Join the Ray cluster at ``address`` (once); a failure is one line with the likely fix."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        hint = ""
        if address != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication (on wherever ~/.ray/auth_token exists), "
                    "set RAY_AUTH_MODE=token and provide the token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise StudyInputError(f"cannot join the Ray cluster at {address!r}: "
                              f"{str(exc).splitlines()[0]}{hint}") from None


def run_study(args: argparse.Namespace) -> StudyOutcome:
    """Validate everything, then run the study."""
    import ray
    from ray import tune

    from study.run.checks import check_mlflow_uri, check_numbers, check_ray_address
    from study.run.progress import ProgressCallback, log, ray_console_to_log, setup_logging
    from study.run.resources import measure_shares, trial_resources
    from study.run.searcher import StudySearcher
    from study.run.summary import print_summary
    from study.run.tracking import MLflowTrialCallback, StudyTracker, code_version
    from trainables.finetune import check_applicable
    from trainables.tune_trainable import study_trainable

    resume = args.resume is not None
    saved_task = None
    if args.resume or args.output:
        output = Path(args.resume or args.output).resolve()
    else:  # runs/<study name>: the preset's name, or the grid file's ``name``
        check_numbers(args)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", _plan_from_args(args).name).strip(".-") or "study"
        output = (Path("runs") / name).resolve()
    study_file = output / STUDY_FILE
    if resume:
        if output.is_file():
            raise StudyInputError(f"--resume {output} is a file, not a folder; give the study folder (the "
                                  f"--output of the study, which holds {STUDY_FILE})")
        if not study_file.exists():
            raise StudyInputError(f"--resume {output}: no {STUDY_FILE} there; is it a study folder?")
        saved = json.loads(study_file.read_text())
        started = saved.get("folder")  # absent in a study started before it was recorded
        if started and Path(started) != output:
            raise StudyInputError(
                f"--resume {output}: this study was started in {started} and has been moved or copied; its Tune "
                f"state, Optuna journal and trial configs name files there. Resume it where it started "
                f"(move it back to {started}, or mount it at that path), or start a new study")
        args.grid = saved["args"]["grid"]
        for key, value in saved["args"].items():
            setattr(args, key, value if key not in ("address",) else args.address)
        if "race" not in saved.get("plan", {}):  # a study started before racing existed has none
            args.race, args.race_budget = "off", None
        if "roi" not in saved["args"]:  # a study started before registration existed: its centred crop
            args.roi = "none"
        saved_task = saved.get("task")  # the task it started with, even if its spec file changed since
        args.resume = str(output)
    elif study_file.exists():
        raise StudyInputError(
            f"{output} already holds a study; continue it with --resume {output} or choose another --output"
        )
    check_numbers(args)
    task = as_task(saved_task) if resume and saved_task else study_task(getattr(args, "task", None), args.cohort)
    from trainables.faults import faults_from_env

    faults_from_env("")  # a malformed STUDY_INJECT_FAULTS (fault-injection testing) is refused up front
    custom_resources = _custom_resources(args.trial_resources)
    plan = _plan_from_args(args)
    if getattr(args, "race", None) == "on" and not plan.racing:
        raise StudyInputError("--race on: this study's budget has no race budget (the smoke budget has none); "
                              "give one with --race-budget N (repeats) or --race-budget Mmin")
    check_ray_address(args.address)
    check_mlflow_uri(args.mlflow_uri)
    for flag, value in (("--storage", args.storage), ("--pretrain-cache", args.pretrain_cache)):
        if value:
            shared_storage.check_storage(value, flag)  # an object store: write a probe before any work
    for strategy, backbone in dict.fromkeys((c.strategy, c.backbone) for c in plan.cells):
        check_applicable(strategy, backbone, tuple(plan.input_size), task)
    if args.reference and args.reference not in {c.id for c in plan.cells}:
        raise StudyInputError(f"--reference {args.reference!r} is not a cell of this study; its cells: "
                              + ", ".join(c.id for c in plan.cells[:20]) + ("…" if len(plan.cells) > 20 else ""))
    if args.reference:
        plan.reference = args.reference
    output.mkdir(parents=True, exist_ok=True)
    setup_logging(output)
    for why in dict.fromkeys(plan.left_out.values()):
        cells = [c for c, w in plan.left_out.items() if w == why]
        log.info(f"left out {len(cells)} cell(s) ({', '.join(cells)}): {why}")
    # What every node must see: a mounted folder, or an object-store URI (trainables/shared_storage.py).
    remote = shared_storage.is_remote(args.storage)
    shared = shared_storage.absolute(args.storage or output)
    if not remote:
        Path(shared).mkdir(parents=True, exist_ok=True)
    if args.address:  # the registrations run as Ray tasks on the cluster
        with ray_console_to_log(output / "study.log"):
            _join_cluster(args.address)
    data, data_id = prepare_data(plan, output if remote else Path(shared), args.cohort, roi=args.roi,
                                 cluster=bool(args.address), task=task)
    from trainables.data import read_manifest

    train_subjects = sum(r.split == "train" for r in read_manifest(data["manifest"], task))
    if remote:
        data["manifest"] = publish_cohort(Path(data["manifest"]), shared, data_id)
    # Pre-training checkpoints are cached by a hash of (method, backbone, config, cohort) in a folder that
    # studies side by side share (runs/pretrain_cache for runs/<study>), so a second study reuses them.
    if args.pretrain_cache:
        pretrain_cache = shared_storage.absolute(args.pretrain_cache)
    else:
        pretrain_cache = shared_storage.join(shared, "pretrain_cache") if remote else \
            str(Path(shared).parent / "pretrain_cache")
    external = {}
    if plan.pretrained:  # external checkpoints: matched, reported, converted; refused below the threshold
        from study.run.checkpoints import prepare_external
        from trainables.pretrained import MIN_FRACTION

        fraction = MIN_FRACTION if args.pretrained_min_fraction is None else args.pretrained_min_fraction
        external = prepare_external(plan, pretrain_cache, fraction, log=log.info)

    mlflow_uri = args.mlflow_uri or f"sqlite:///{output / 'mlflow.db'}"
    saved = json.loads(study_file.read_text()) if resume else {}
    artifacts = (output / "mlartifacts").as_uri() if mlflow_uri.startswith("sqlite:") else None
    tracker = StudyTracker(mlflow_uri, f"study-{plan.name}-{output.name}", saved.get("parent_run_id"),
                           artifact_location=artifacts)
    if not resume:
        study = {"args": saved_args(args), "parent_run_id": tracker.parent_run_id, "plan": asdict(plan),
                 "task": task.to_dict(), "folder": str(output)}
        atomic_write_text(study_file, json.dumps(study, indent=2, default=str))
    if external:
        tracker.log_pretrained_reports(external)
    version = code_version()
    tracker.log_study_params({"grid": args.grid, "cells": len(plan.cells), "num_samples": plan.num_samples,
                              "seed": plan.seed, "code_version": version,
                              "finetune_epochs": plan.finetune_epochs, "pretrain_epochs": plan.pretrain_epochs})

    # Ray's and Tune's own console output goes to study.log; the terminal shows the study's live table.
    with ray_console_to_log(output / "study.log"):
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if args.address:
            _join_cluster(args.address)
        elif not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

        # Tune keeps only one trial pending for a custom searcher by default, which serialises trial start-up
        # (a new worker imports torch and MONAI for seconds): keep one pending trial per slot instead.
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) / max(args.cpus_per_trial, 1e-3)))
        if args.max_concurrent:
            slots = min(slots, args.max_concurrent)
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(slots))  # an autoscaling cluster may want more
        from study.run import searcher as searcher_module

        searcher_module.RACE_RECORD["path"] = str(output / RACE_FILE)
        factory = TrialFactory(plan=plan, data=data, data_id=data_id, output=shared,
                               pretrain_cache=pretrain_cache, checkpoint_every_s=args.checkpoint_every_s,
                               external=external, train_subjects=train_subjects)
        shares = {} if args.gpus_per_trial is not None else measure_shares(plan, task.to_dict())
        if shares:
            log.info("GPU share per trial from measured memory: " + ", ".join(f"{k}={v:g}" for k, v in shares.items()))
        trainable = tune.with_resources(
            study_trainable,
            trial_resources(args.cpus_per_trial, args.gpus_per_trial, shares, custom_resources),
        )
        storage = shared_storage.join(shared, "tune")
        if resume and tune.Tuner.can_restore(shared_storage.join(storage, "study")):
            tuner = tune.Tuner.restore(shared_storage.join(storage, "study"), trainable, resume_unfinished=True)
        else:
            # Only this driver process writes the Optuna studies: with an object store they stay in the output folder.
            searcher = StudySearcher(plan, factory.pretrain, factory.finetune, output=str(output) if remote else shared,
                                     study_name=plan.name, storage_url=args.optuna_storage,
                                     race_file=str(output / RACE_FILE),
                                     external={k: v["path"] for k, v in external.items()},
                                     task=task.to_dict(), confirm_file=str(output / CONFIRM_FILE))
            # The score is known to the per-cell scheduler and the searcher only, not to TuneConfig: pre-training
            # trials report no selection score, and Tune's strict metric check would reject them.
            scheduler = make_scheduler(plan, args.early_stopping)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1, reuse_actors=True,
                                            max_concurrent_trials=args.max_concurrent or None),
                run_config=tune.RunConfig(
                    name="study",
                    storage_path=storage,
                    callbacks=[MLflowTrialCallback(tracker, {"study": plan.name}, study_params={"code_version": version}),
                               ProgressCallback({c.id: plan.samples(c) + plan.seeds for c in plan.cells},
                                                len(plan.pretrain_jobs()))],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=0,
                ),
            )
        results = tuner.fit()
    unfinished = len(results) - results.num_terminated - results.num_errors
    race = read_race(output) if plan.racing else None
    race_unfinished = plan.racing and (race is None or race.get("status") not in RACE_FINAL)
    confirmation = read_confirmation(output) if plan.confirm_runs else None
    confirm_unfinished = bool(plan.confirm_runs) and (confirmation is None or not confirmation.get("finished"))
    if unfinished or race_unfinished or confirm_unfinished or len(results) < _expected_trials(plan, results, race,
                                                                                             confirmation):
        log.info(f"study interrupted with {unfinished} trial(s) unfinished; its state is saved. "
                 f"Continue it with: python -m study.launch --resume {output}")
        raise StudyInterrupted(str(output))
    tracker.finish("FINISHED")
    print_summary(results, plan, tracker)
    from study.report import write_report

    try:
        log.info(f"report: {write_report(output) / 'report.html'}")
    except StudyInputError as exc:  # e.g. no finished fine-tuning trial
        log.info(f"no report: {exc}")
    return StudyOutcome(results=results, tracker=tracker, plan=plan, output=output)


def make_scheduler(plan: StudyPlan, early_stopping: str = "asha"):
    """Per-cell ASHA on the selection score with the plan's grace period, or FIFO (no early stopping)."""
    from ray.tune.schedulers import FIFOScheduler

    from study.run.scheduling import PerCellASHA

    if early_stopping == "none":
        return FIFOScheduler()
    return PerCellASHA(metric="score", mode="max", max_t=plan.finetune_epochs, grace_period=plan.grace_period)


class StudyInterrupted(Exception):
    """Ctrl-C (SIGINT): Tune saved the experiment; ``--resume`` continues it."""


def _expected_trials(plan: StudyPlan, results, race: dict | None = None, confirmation: dict | None = None) -> int:
    """Trials the finished study has: the plan's, less the cells whose pre-training failed and the
    distillation cells whose teacher cell has no finished trial, plus the race's repeats and the
    confirmation runs."""
    from trainables.trials import parse_trial

    specs = [(r, parse_trial(r.config)) for r in results if r.config]
    failed = {s.cell.id for r, s in specs if r.error and s.stage == "pretrain"}
    finished = {s.cell.id for r, s in specs if not r.error and s.stage == "finetune" and s.phase == "search"
                and s.ran_all_epochs(r.metrics or {})}
    skipped_cells = [c for c in plan.cells if c.pretrain_id in failed
                     or (c.teacher_id is not None and c.teacher_id not in finished)]
    skipped = sum(plan.samples(c) + plan.seeds for c in skipped_cells)
    if plan.seeds:  # a cell none of whose search trials finished has no best configuration to re-run
        skipped += sum(plan.seeds for c in plan.cells if c not in skipped_cells and c.id not in finished)
    return (plan.total_trials() - skipped + int((race or {}).get("trials_used", 0))
            + int((confirmation or {}).get("trials_used", 0)))


def main(argv: list[str] | None = None) -> int:
    try:
        run_study(build_parser().parse_args(argv))
        return 0
    except StudyInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyInterrupted as exc:
        print(f"interrupted: continue with python -m study.launch --resume {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: continue with python -m study.launch --resume <output>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
