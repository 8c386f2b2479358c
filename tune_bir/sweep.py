"""`python -m tune_bir.sweep`: tune the exaggeration hyper-parameters of BI-R+SI with Ray Tune.

Optuna (TPE, seeded by --seed) proposes configs from a search space, ASHA stops the weak ones early
on `val_acc_avg`, trials spread over the CPUs/GPUs of this machine or a Ray cluster (--address), and
every trial is logged to MLflow. The first trial is the baseline: the base config with every
exaggeration off. With no arguments: a small real sweep on the offline splitMNIST5k data.

Examples:
  python -m tune_bir.sweep
  python -m tune_bir.sweep --space recon --num-samples 20 --iters 500
  python -m tune_bir.sweep --space my_space.yaml --experiment CIFAR100 --c 1e8 --dg-prop 0.6 \\
      --num-samples 64 --gpus-per-trial 0.25 --address auto --storage-path /shared/ray_results
  python -m tune_bir.sweep --resume --name NAME      # continue an interrupted sweep
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.status import SELECTION_METRIC
from search_spaces import EXAGGERATION_OFF, NAMED_SPACES, SearchSpace, load_space
from tune_bir.cli import OneLineArgumentParser, add_config_flags, config_overrides, run_main
from tune_bir.config import RUN_OUTPUT_FIELDS, BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.record import git_commit, package_versions
from tune_bir.tracking import default_tracking_uri
from tune_bir.train import PROG as TRAIN_PROG

log = logging.getLogger(__name__)

PROG = "python -m tune_bir.sweep"
METRIC, MODE = SELECTION_METRIC, "max"   # what Optuna is told and the best config is chosen by
# what ASHA ranks trials by at a rung: METRIC with ties broken (trainables.bir computes it)
SCHEDULER_METRIC = "val_score"
SWEEP_FILE, RESULTS_FILE, BEST_FILE = "sweep.json", "results.csv", "best_config.json"
# Every trial is BI-R+SI unless the user says otherwise (--no-brain-inspired, --no-si, --config).
SWEEP_BASE: dict[str, Any] = {"replay": "generative", "brain_inspired": True, "si": True, "val_fraction": 0.1}
# The embedded default (no --experiment, --iters or --config): a few minutes on a laptop CPU.
DEMO_ITERS = 150
# train flags that make no sense per trial (outputs of a single run)
EXCLUDED_FLAGS = RUN_OUTPUT_FIELDS


def is_uri(location: str) -> bool:
    """A remote storage URI (s3://, gs://, ...) rather than a local path."""
    return "://" in location


class SweepFolder:
    """The folder of one sweep, `<storage-path>/<name>`: a local path, or a URI (s3://, gs://) on a cluster."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.location = f"{root}/{name}"

    @classmethod
    def at(cls, storage_path: str, name: str) -> SweepFolder:
        root = storage_path.rstrip("/") if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
        return cls(root, name)

    def __str__(self) -> str:
        return self.location

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    def _fs(self, location: str):
        import pyarrow.fs

        try:
            if self.is_local:
                return pyarrow.fs.LocalFileSystem(), location
            return pyarrow.fs.FileSystem.from_uri(location)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot use --storage-path {self.root}: {err}") from err

    def exists(self, file: str) -> bool:
        import pyarrow.fs

        fs, path = self._fs(f"{self.location}/{file}")
        try:
            return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
        except OSError as err:
            raise ConfigError(f"cannot read --storage-path {self.root}: {err}") from err

    def read_text(self, file: str) -> str:
        fs, path = self._fs(f"{self.location}/{file}")
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, file: str, text: str) -> None:
        fs, path = self._fs(self.location)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{file}") as f:
            f.write(text.encode())

    def latest_sibling(self) -> SweepFolder | None:
        """The sweep under the same storage path whose sweep.json changed last."""
        import pyarrow.fs

        fs, path = self._fs(self.root)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False))
        except OSError as err:
            raise ConfigError(f"cannot read --storage-path {self.root}: {err}") from err
        found = []
        for info in infos:
            if info.type == pyarrow.fs.FileType.Directory:
                marker = fs.get_file_info(f"{info.path}/{SWEEP_FILE}")
                if marker.type == pyarrow.fs.FileType.File:
                    found.append((marker.mtime, info.base_name))
        return SweepFolder(self.root, max(found)[1]) if found else None


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Tune the exaggeration hyper-parameters of BI-R+SI "
                                   "with Ray Tune (Optuna search, ASHA early stopping); log every trial to MLflow.",
                                   epilog="Examples:" + __doc__.split("Examples:")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    s = parser.add_argument_group("sweep options")
    s.add_argument("--space", default="repulsion",
                   help=f"named search space ({', '.join(NAMED_SPACES)}) or a YAML file (default: repulsion)")
    s.add_argument("--num-samples", type=int, default=6, help="trials, the baseline included (default: 6)")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials running at once (default: 2)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default: 1)")
    s.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial; fractions share a GPU, e.g. 0.25 (default: 0)")
    s.add_argument("--grace-period", type=int, default=2,
                   help="tasks every trial trains before ASHA may stop it (default: 2; exaggeration acts "
                        "from task 2 on, so task 1 says nothing about a config)")
    s.add_argument("--reduction-factor", type=float, default=4.0,
                   help="ASHA keeps 1/reduction-factor of the trials at each rung (default: 4)")
    s.add_argument("--seeds-per-trial", type=int, default=1,
                   help="train N seeds (seed..seed+N-1) per trial and report their mean (default: 1)")
    s.add_argument("--share-first-task", action=argparse.BooleanOptionalAction, default=True,
                   help="train task 1 once per node and let the other trials adopt it: exaggeration acts from "
                        "task 2 on, so every trial's task 1 is the same (bit-identical; default: on)")
    s.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop the sweep after this many seconds")
    s.add_argument("--max-failures", type=int, default=2,
                   help="restore a failed trial from its last checkpoint up to N times (default: 2)")
    s.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: start Ray here")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    s.add_argument("--storage-path", default="./ray_results",
                   help="where sweeps are stored, shared by every node of a cluster (default: ./ray_results)")
    s.add_argument("--name", default=None, help="sweep name (default: <space>-<experiment>-<time>)")
    s.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name (default: the latest) with its own settings")
    s.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db here)")
    s.add_argument("--mlflow-experiment", default="tune_bir-sweep", help="MLflow experiment name")
    s.add_argument("--config", metavar="FILE", help="JSON object of base config fields; flags override it")
    for name, value in SWEEP_BASE.items():
        if value is True:
            s.add_argument(f"--no-{name.replace('_', '-')}", dest=f"no_{name}", action="store_true",
                           help=f"sweep without --{name.replace('_', '-')} (on by default in sweeps)")
    add_config_flags(parser, exclude=EXCLUDED_FLAGS)
    return parser


# ---------------------------------------------------------------------------------------------
@dataclass
class SweepPlan:
    """Everything decided (and validated) before Ray starts; written to sweep.json."""

    name: str
    folder: SweepFolder
    space: SearchSpace
    user_base: dict[str, Any]          # the base config as the user gave it (flags, --config, sweep defaults)
    trial_base: dict[str, Any]         # the same with paths made absolute, as every trial receives it
    resolved: BIRConfig
    segments_per_task: int
    args: dict[str, Any]
    argv: list[str]
    sweep_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def n_tasks(self) -> int:
        return self.resolved.tasks

    @property
    def max_t(self) -> int:
        return self.n_tasks * self.segments_per_task

    @property
    def grace_t(self) -> int:
        return self.args["grace_period"] * self.segments_per_task

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sweep_id": self.sweep_id, "sweep_dir": self.folder.location,
                "created": dt.datetime.now().isoformat(timespec="seconds"),
                "space": self.space.to_dict(), "base_config": self.user_base,
                "resolved_base_config": self.resolved.to_dict(),
                "baseline_config": {**self.user_base, **EXAGGERATION_OFF},
                "metric": METRIC, "mode": MODE,
                "asha": {"metric": SCHEDULER_METRIC, "time_attr": "training_iteration", "max_t": self.max_t,
                         "grace_period": self.grace_t,
                         "reduction_factor": self.args["reduction_factor"],
                         "segments_per_task": self.segments_per_task},
                "cli": {"argv": self.argv, "args": self.args},
                "versions": package_versions(), "git_commit": git_commit()}


def _base_values(args: argparse.Namespace) -> dict[str, Any]:
    values = dict(SWEEP_BASE)
    for name, value in SWEEP_BASE.items():
        if value is True and getattr(args, f"no_{name}", False):
            values[name] = False
    overrides = config_overrides(args)
    if not args.config and "experiment" not in overrides and "iters" not in overrides:
        values["iters"] = DEMO_ITERS
    if args.config:
        values |= BIRConfig.from_json(args.config)
    return values | overrides


def _check_sweep_options(args: argparse.Namespace, n_tasks: int) -> None:
    checks = [
        (args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}"),
        (args.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {args.max_concurrent}"),
        (args.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}"),
        (args.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}"),
        (1 <= args.grace_period <= n_tasks, f"--grace-period must be 1..{n_tasks} tasks, got {args.grace_period}"),
        (args.reduction_factor > 1, f"--reduction-factor must be > 1, got {args.reduction_factor}"),
        (args.seeds_per_trial >= 1, f"--seeds-per-trial must be >= 1, got {args.seeds_per_trial}"),
        (args.time_budget is None or args.time_budget > 0, f"--time-budget must be > 0, got {args.time_budget}"),
        (args.max_failures >= 0, f"--max-failures must be >= 0, got {args.max_failures}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def plan_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> SweepPlan:
    """Validate flags, base config and space into a plan; raises ConfigError (exit 2, Ray not started)."""
    user_base = _base_values(args)
    resolved = BIRConfig.from_dict(user_base).resolved()
    if resolved.val_fraction <= 0:
        raise ConfigError(f"sweeps select on {METRIC}: --val-fraction must be > 0 (default 0.1 in sweeps)")
    _check_sweep_options(args, resolved.tasks)
    space = load_space(args.space)
    space.validate_against(user_base)
    try:
        BIRConfig.from_dict({**user_base, **EXAGGERATION_OFF}).resolved()
    except ConfigError as err:
        raise ConfigError(f"the baseline (base config, every exaggeration off) is invalid: {err}") from err
    trial_base = dict(user_base)
    trial_base["data_dir"] = str(Path(resolved.data_dir).expanduser().resolve())
    trial_base["pretrained_conv"] = str(Path(resolved.pretrained_conv).expanduser().resolve())
    seg = resolved.segment_iters
    segments_per_task = 1 if seg <= 0 else math.ceil(resolved.iters / seg)
    name = args.name or f"{space.name}-{resolved.experiment}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = SweepFolder.at(args.storage_path, name)
    if folder.exists(SWEEP_FILE):
        raise ConfigError(f"sweep folder {folder} exists: add --resume to continue it, or choose another --name")
    return SweepPlan(name=name, folder=folder, space=space, user_base=user_base, trial_base=trial_base,
                     resolved=resolved, segments_per_task=segments_per_task, args=_jsonable(vars(args)),
                     argv=list(sys.argv[1:] if argv is None else argv))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _resume_folder(args: argparse.Namespace) -> SweepFolder:
    if args.name:
        folder = SweepFolder.at(args.storage_path, args.name)
        if not folder.exists(SWEEP_FILE):
            raise ConfigError(f"no sweep to resume at {folder} (no {SWEEP_FILE})")
        return folder
    folder = SweepFolder.at(args.storage_path, "-").latest_sibling()
    if folder is None:
        raise ConfigError(f"no sweep to resume in {SweepFolder.at(args.storage_path, '-').root}")
    return folder


# ---------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    sweep_dir: str                     # the sweep folder: a local path or a storage URI
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_values: dict[str, Any] | None
    interrupted: bool
    tracking_uri: str
    parent_run_id: str
    searcher: Any
    result_grid: Any
    plan_json: dict[str, Any]


def _connect_ray(args: dict[str, Any]) -> bool:
    """Join --address or start a local Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if args.get("address"):
        ray.init(address=args["address"])
    else:
        ray.init(num_cpus=args.get("num_cpus") or os.cpu_count(), include_dashboard=False)
    return True


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse per-trial resources that no node of the connected cluster has (they would pend forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs over {len(nodes)} node(s)"
    if gpus > 0 and not any(r.get("GPU", 0) >= gpus for r in nodes):
        raise ConfigError(f"--gpus-per-trial={gpus:g}: no node of the Ray cluster has {gpus:g} GPU(s) ({have}); "
                          "use --gpus-per-trial 0 or join a cluster with GPUs (--address)")
    raise ConfigError(f"--cpus-per-trial={cpus:g} --gpus-per-trial={gpus:g}: no node of the Ray cluster has "
                      f"that much ({have})")


def _mlflow_parent(plan_json: dict[str, Any], tracking_uri: str, experiment_name: str) -> tuple[str, str]:
    """(experiment id, parent run id) of a sweep: created on a new sweep, reopened on --resume."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from tune_bir.sweep_logging import ROLE_TAG, SWEEP_TAG, experiment_id

    client = MlflowClient(tracking_uri)
    known = plan_json.get("mlflow") or {}
    if known.get("parent_run_id"):
        client.update_run(known["parent_run_id"], status="RUNNING")
        return known["experiment_id"], known["parent_run_id"]
    exp_id = experiment_id(client, experiment_name)
    run = client.create_run(exp_id, run_name=plan_json["name"], tags={
        SWEEP_TAG: plan_json["sweep_id"], ROLE_TAG: "parent", "space": plan_json["space"]["name"],
        "sweep_dir": plan_json["sweep_dir"]})
    args = plan_json["cli"]["args"]
    settings = {k: args[k] for k in ("space", "num_samples", "max_concurrent", "cpus_per_trial", "gpus_per_trial",
                                     "grace_period", "reduction_factor", "seeds_per_trial", "share_first_task")}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in settings.items()])
    return exp_id, run.info.run_id


def run_sweep(argv: list[str] | None = None) -> SweepOutcome:
    """Validate, run (or resume) a sweep, rank it, and log the summary; raises ConfigError on bad input."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a checkpoint per task and num_to_keep=2 force a (cheap, local) state snapshot per result: no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if args.resume:
        folder = _resume_folder(args)
        plan_json = json.loads(folder.read_text(SWEEP_FILE))
        connection = {"address": args.address, "num_cpus": args.num_cpus}
    else:
        plan = plan_from_args(args, argv)
        plan_json = plan.to_json()
        folder = plan.folder
        connection = plan.args
    settings = plan_json["cli"]["args"]
    started_ray = _connect_ray(connection)
    try:
        check_resources(settings["cpus_per_trial"], settings["gpus_per_trial"])
        tracking_uri = (plan_json.get("mlflow") or {}).get("tracking_uri") or default_tracking_uri(
            settings.get("mlflow_uri"))
        exp_id, parent_run_id = _mlflow_parent(plan_json, tracking_uri, settings["mlflow_experiment"])
        if not args.resume:
            plan_json["mlflow"] = {"tracking_uri": tracking_uri, "experiment_id": exp_id,
                                   "experiment_name": settings["mlflow_experiment"], "parent_run_id": parent_run_id}
            _save(folder, SWEEP_FILE, json.dumps(plan_json, indent=2), tracking_uri, parent_run_id)
            tuner = _new_tuner(plan, exp_id, parent_run_id, tracking_uri)
        else:
            tuner = _restored_tuner(folder, plan_json)
        start = time.monotonic()
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            _set_parent_status(tracking_uri, parent_run_id, "KILLED")
            raise
        budget = settings.get("time_budget")
        budget_spent = budget is not None and time.monotonic() - start >= budget
        outcome = _summarise(plan_json, folder, grid, tracking_uri, parent_run_id, tuner, budget_spent)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return outcome


def _new_tuner(plan: SweepPlan, exp_id: str, parent_run_id: str, tracking_uri: str):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from trainables import BIRTrainable
    from tune_bir.sweep_logging import MlflowSweepCallback
    from tune_bir.sweep_search import TruthfulOptunaSearch

    a = plan.args
    searcher = TruthfulOptunaSearch(plan.space, metric=METRIC, mode=MODE, n_tasks=plan.n_tasks,
                                    sampler=optuna.samplers.TPESampler(seed=plan.resolved.seed))
    searcher.enqueue_baseline()
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode=MODE, max_t=plan.max_t,
                              grace_period=plan.grace_t, reduction_factor=a["reduction_factor"])
    callback = MlflowSweepCallback(tracking_uri, exp_id, parent_run_id, plan.sweep_id, plan.n_tasks)
    trainable = tune.with_resources(BIRTrainable, {"cpu": a["cpus_per_trial"], "gpu": a["gpus_per_trial"]})
    return tune.Tuner(
        trainable,
        param_space={**plan.trial_base, "seeds_per_trial": a["seeds_per_trial"],
                     "share_first_task": a["share_first_task"]},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=a["max_concurrent"]),
            scheduler=scheduler, num_samples=a["num_samples"], reuse_actors=True,
            time_budget_s=a["time_budget"], trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.folder.root, callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True, num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=a["max_failures"])))


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Ray's default spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def _restored_tuner(folder: SweepFolder, plan_json: dict[str, Any]):
    from ray import tune

    from trainables import BIRTrainable

    settings = plan_json["cli"]["args"]
    trainable = tune.with_resources(BIRTrainable, {"cpu": settings["cpus_per_trial"],
                                                   "gpu": settings["gpus_per_trial"]})
    if not tune.Tuner.can_restore(folder.location):
        raise ConfigError(f"{folder} holds no Ray Tune experiment state to resume (it never started)")
    return tune.Tuner.restore(folder.location, trainable=trainable, resume_unfinished=True, resume_errored=False)


def _save(folder: SweepFolder, file: str, text: str, tracking_uri: str, run_id: str) -> None:
    """Write a summary file into the sweep folder and attach it to the sweep's MLflow parent run."""
    from mlflow.tracking import MlflowClient

    folder.write_text(file, text)
    MlflowClient(tracking_uri).log_text(run_id, text, file)


def _set_parent_status(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------
def _trial_rows(grid: Any, plan_json: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """One row per trial (status, parameters, final metrics) and whether some trial is unfinished."""
    from analysis.status import trial_status

    n_tasks = plan_json["resolved_base_config"]["tasks"]
    names = list(plan_json["space"]["fixed"]) + list(plan_json["space"]["params"])
    trials = grid._experiment_analysis.trials   # Trial objects carry Tune's status; no public accessor
    saved = _saved_statuses(plan_json["sweep_dir"])
    rows, unfinished = [], False
    for trial in trials:
        if saved.get(trial.trial_id, trial.status) not in ("TERMINATED", "ERROR"):
            unfinished = True
            continue
        metrics = dict(trial.last_result or {})
        config = trial.config or {}
        row: dict[str, Any] = {"trial_id": trial.trial_id, "trial_name": str(trial),
                               "status": trial_status(metrics, trial.status == "ERROR", n_tasks),
                               "baseline": bool(config.get("baseline"))}
        row |= {k: config.get(k) for k in names}
        row |= {k: v for k, v in metrics.items()
                if k in ("task", "training_iteration", "time_total_s", "bwt", "forgetting_avg", "iters_done")
                or k.startswith(("acc_", "val_"))}
        row["path"] = trial.path
        rows.append(row)
    return rows, unfinished


def _saved_statuses(sweep_dir: str) -> dict[str, str]:
    """Trial statuses in the experiment state Tune saved last.

    After Ctrl+C Tune saves the state (trials still RUNNING, to be resumed) and then stops every trial
    in memory, so the in-memory statuses no longer tell an interrupted trial from a finished one.
    """
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(sweep_dir).trials}
    except Exception:   # no readable state: fall back to the in-memory statuses
        log.warning("could not read the saved experiment state of %s", sweep_dir, exc_info=True)
        return {}


def best_values(plan_json: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The winner's config as the user would type it: non-default fields only."""
    values = dict(plan_json["base_config"])
    if row["baseline"]:
        values |= EXAGGERATION_OFF
    else:
        values |= {k: v for k, v in row.items()
                   if k in plan_json["space"]["fixed"] or k in plan_json["space"]["params"]}
    defaults = BIRConfig().to_dict()
    return {k: values[k] for k in BIRConfig.field_names()
            if k in values and values[k] is not None and values[k] != defaults[k]}


def train_command(values: dict[str, Any]) -> str:
    """A runnable `python -m tune_bir.train` line for a config dict."""
    parts = TRAIN_PROG.split()
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        else:
            parts.append(f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}")
    return " ".join(shlex.quote(p) for p in parts)


def _summarise(plan_json, folder: SweepFolder, grid, tracking_uri, parent_run_id, tuner,
               budget_spent: bool) -> SweepOutcome:
    import csv
    import io

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from analysis.status import COMPLETED, is_finite_number, rank_trials, status_counts

    rows, unfinished = _trial_rows(grid, plan_json)
    # Ctrl+C stops Tune quietly: trials still running, or fewer trials than asked for within the budget
    unfinished = unfinished or (len(rows) < plan_json["cli"]["args"]["num_samples"] and not budget_spent)
    ranked = rank_trials(rows)
    best = ranked[0] if ranked else None
    values = best_values(plan_json, best) if best else None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _save(folder, RESULTS_FILE, table.getvalue(), tracking_uri, parent_run_id)
    client = MlflowClient(tracking_uri)
    if best is not None:
        _save(folder, BEST_FILE, json.dumps(values, indent=2), tracking_uri, parent_run_id)
        baseline = next((r for r in rows if r["baseline"]), None)
        now = int(dt.datetime.now().timestamp() * 1000)
        metrics = [Metric(f"best_{k}", float(best[k]), now, 0) for k in (METRIC, "acc_avg")
                   if is_finite_number(best.get(k))]
        if baseline and is_finite_number(baseline.get(METRIC)) and baseline["status"] == COMPLETED:
            metrics.append(Metric(f"baseline_{METRIC}", float(baseline[METRIC]), now, 0))
        client.log_batch(parent_run_id, metrics=metrics, tags=[
            RunTag("best_trial_id", best["trial_id"]), RunTag("best_config", json.dumps(values))])
    client.log_batch(parent_run_id, tags=[RunTag(f"trials_{k}", str(v)) for k, v in status_counts(rows).items()])
    client.set_terminated(parent_run_id, status="KILLED" if unfinished else "FINISHED")
    searcher = tune_search_alg(tuner)
    return SweepOutcome(sweep_dir=folder.location, rows=rows, best=best, best_values=values, interrupted=unfinished,
                        tracking_uri=tracking_uri, parent_run_id=parent_run_id, searcher=searcher,
                        result_grid=grid, plan_json=plan_json)


def tune_search_alg(tuner: Any) -> Any:
    """The TruthfulOptunaSearch behind a Tuner's ConcurrencyLimiter (for tests and inspection)."""
    search_alg = tuner._local_tuner._tune_config.search_alg   # no public accessor
    return getattr(search_alg, "searcher", search_alg)


# ---------------------------------------------------------------------------------------------
def _print_summary(outcome: SweepOutcome) -> None:
    plan = outcome.plan_json
    n_tasks = plan["resolved_base_config"]["tasks"]
    from analysis.status import COMPLETED, status_counts

    counts = status_counts(outcome.rows)
    print()
    print(f"sweep {plan['name']}: {len(outcome.rows)} finished trials ("
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")
    if outcome.interrupted:
        print(f"the sweep was interrupted; continue it with: {PROG} --resume --name {plan['name']} "
              f"--storage-path {shlex.quote(outcome.sweep_dir.rsplit('/', 1)[0])}")
    best = outcome.best
    if best is None:
        print(f"no trial trained all {n_tasks} tasks: no best config")
    else:
        label = "the baseline (every exaggeration off)" if best["baseline"] else best["trial_name"]
        print(f"best config: {label}, {METRIC} {best['val_acc_avg']:.4f} (test acc_avg {best['acc_avg']:.4f})")
        for name in [*plan["space"]["fixed"], *plan["space"]["params"]]:
            if best.get(name) is not None:
                print(f"  {name} = {best[name]}")
        print("  per-task accuracy after the last task (test / validation):")
        for k in range(1, n_tasks + 1):
            print(f"    task {k}: {best.get(f'acc_task_{k}', float('nan')):.4f} / "
                  f"{best.get(f'val_acc_task_{k}', float('nan')):.4f}")
        baseline = next((r for r in outcome.rows if r["baseline"]), None)
        if baseline is not None and baseline["status"] == COMPLETED and not best["baseline"]:
            print(f"  baseline: {METRIC} {baseline['val_acc_avg']:.4f} (test acc_avg {baseline['acc_avg']:.4f})")
        print("run it alone:")
        print(f"  {train_command(outcome.best_values)}")
        best_file = f"{outcome.sweep_dir}/{BEST_FILE}"
        if is_uri(best_file):
            print(f"  or: copy {best_file} here and run {TRAIN_PROG} --config {BEST_FILE}")
        else:
            print(f"  or: {TRAIN_PROG} --config {shlex.quote(best_file)}")
    print(f"results: {outcome.sweep_dir} ({RESULTS_FILE}, {SWEEP_FILE}); MLflow parent run "
          f"{outcome.parent_run_id} in experiment '{plan['cli']['args']['mlflow_experiment']}'")
    print(f"browse: mlflow ui --backend-store-uri {shlex.quote(outcome.tracking_uri)}")


def main(argv: list[str] | None = None) -> int:
    outcome = run_sweep(argv)
    _print_summary(outcome)
    return 130 if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
