"""The sweep's command line and its plan: everything decided and validated before Ray starts.

`SweepOptions` holds the sweep's own options (typed, with their defaults); `SweepPlan` is the whole
plan of one sweep (options, search space, base config, folder, MLflow location) and is what
`sweep.json` holds, so `--resume` reads back the same object it began with.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import EXAGGERATION_OFF, NAMED_SPACES, SearchSpace, load_space
from tune_bir.cli import OneLineArgumentParser, add_config_flags, config_overrides
from tune_bir.config import RUN_OUTPUT_FIELDS, BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.fields import flag_name
from tune_bir.record import git_commit, package_versions
from tune_bir.sweep.preflight import check_storage
from tune_bir.sweep.status import SELECTION_METRIC
from tune_bir.sweep.storage import SWEEP_FILE, SweepFolder
from tune_bir.terms import idle_fields

PROG = "python -m tune_bir.sweep"
METRIC, MODE = SELECTION_METRIC, "max"   # what Optuna is told and the best config is chosen by
# Every trial is BI-R+SI unless the user says otherwise (--no-brain-inspired, --no-si, --config).
SWEEP_BASE: dict[str, Any] = {"replay": "generative", "brain_inspired": True, "si": True, "val_fraction": 0.1}
# The embedded default (no --experiment, --iters or --config): a few minutes on a laptop CPU.
DEMO_ITERS = 150
# train flags that make no sense per trial (outputs of a single run)
EXCLUDED_FLAGS = RUN_OUTPUT_FIELDS
# the sweep's Optuna study (docs/sweep.md "Optuna reporting"): an SQLite file unless --optuna-storage says otherwise
OPTUNA_FILE = "optuna.db"

EXAMPLES = """Examples:
  python -m tune_bir.sweep
  python -m tune_bir.sweep --space recon --num-samples 20 --iters 500
  python -m tune_bir.sweep --space my_space.yaml --experiment CIFAR100 --c 1e8 --dg-prop 0.6 \\
      --num-samples 64 --gpus-per-trial 0.25 --address auto --storage-path /shared/ray_results
  python -m tune_bir.sweep --resume --name NAME      # continue an interrupted sweep
  python -m tune_bir.sweep --confirm ray_results/NAME --top-k 3 --seeds 8   # re-run the winners on fresh seeds
"""


@dataclass
class SweepOptions:
    """The sweep's own options (not the learner's); the parser's defaults come from here."""

    space: str = "repulsion"
    num_samples: int = 6
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    grace_period: int = 2
    reduction_factor: float = 4.0
    seeds_per_trial: int = 1
    n_startup_trials: int | None = None       # None: startup_trials(num_samples)
    share_first_task: bool = True
    time_budget: float | None = None
    max_failures: int = 2
    address: str | None = None
    dashboard: bool = False
    num_cpus: int | None = None
    storage_path: str = "./ray_results"
    name: str | None = None
    resume: bool = False
    mlflow_uri: str | None = None
    mlflow_experiment: str = "tune_bir-sweep"
    optuna_storage: str | None = None         # None: default_optuna_storage(folder)
    config: str | None = None
    no_brain_inspired: bool = False
    no_si: bool = False
    confirm: str | None = None
    top_k: int = 3
    seeds: int = 8
    configs: str | None = None                # labels of the sweep's validation ranking, e.g. "top2,top5"
    config_file: str | None = None            # a JSON list of configs written by hand (confirmation/plan.py)
    label: str | None = None
    first_seed: int | None = None
    reuse_seeds: bool = False
    sequential: bool = False
    max_seeds: int = 48
    looks: int = 6
    margin: float | None = None
    alpha: float = 0.05
    spending: str = "obrien-fleming"
    then_confirm: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> SweepOptions:
        """Options from parsed flags; a flag whose parser default is None (left out) takes the field's default."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepOptions:
        """Options as sweep.json stored them; options added since then take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def startup_trials(self) -> int:
        return self.n_startup_trials if self.n_startup_trials is not None else startup_trials(self.num_samples)


def startup_trials(num_samples: int) -> int:
    """Random proposals before TPE models the results: Optuna's 10, fewer in small sweeps.

    With Optuna's default every sweep of up to 10 trials is a random search; a quarter of the sweep
    (at least 3, the baseline being one of them) leaves TPE most of a small sweep to work with.
    """
    return min(10, max(3, num_samples // 4))


DEFAULTS = SweepOptions()


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Tune the exaggeration hyper-parameters of BI-R+SI "
                                   "with Ray Tune (Optuna search, ASHA early stopping); log every trial to MLflow.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    s = parser.add_argument_group("sweep options")
    s.add_argument("--space", default=d.space,
                   help=f"named search space ({', '.join(NAMED_SPACES)}) or a YAML file (default: {d.space})")
    s.add_argument("--num-samples", type=int, default=d.num_samples,
                   help=f"trials, the baseline included (default: {d.num_samples})")
    s.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help=f"trials running at once (default: {d.max_concurrent})")
    s.add_argument("--cpus-per-trial", type=float, default=d.cpus_per_trial,
                   help=f"CPUs per trial (default: {d.cpus_per_trial:g})")
    s.add_argument("--gpus-per-trial", type=float, default=d.gpus_per_trial,
                   help=f"GPUs per trial; fractions share a GPU, e.g. 0.25 (default: {d.gpus_per_trial:g})")
    s.add_argument("--grace-period", type=int, default=d.grace_period,
                   help=f"tasks every trial trains before ASHA may stop it (default: {d.grace_period}; exaggeration "
                        "acts from task 2 on, so task 1 says nothing about a config)")
    s.add_argument("--reduction-factor", type=float, default=d.reduction_factor,
                   help=f"ASHA keeps 1/reduction-factor of the trials at each rung (default: {d.reduction_factor:g})")
    s.add_argument("--seeds-per-trial", type=int, default=d.seeds_per_trial,
                   help="train N seeds (seed..seed+N-1) per trial and report their mean "
                        f"(default: {d.seeds_per_trial})")
    s.add_argument("--n-startup-trials", type=int, default=d.n_startup_trials, metavar="N",
                   help="trials Optuna's TPE proposes at random before it models the results, the baseline "
                        "included (default: a quarter of --num-samples, between 3 and 10)")
    s.add_argument("--share-first-task", action=argparse.BooleanOptionalAction, default=None,
                   help="train task 1 once per node and let the other trials adopt it: exaggeration acts from "
                        "task 2 on, so every trial's task 1 is the same (bit-identical; default: on, off with "
                        "--segment-iters below --iters, whose steps train part of a task)")
    s.add_argument("--time-budget", type=float, default=d.time_budget, metavar="SECONDS",
                   help="stop the sweep after this many seconds")
    s.add_argument("--max-failures", type=int, default=d.max_failures,
                   help=f"restore a failed trial from its last checkpoint up to N times (default: {d.max_failures})")
    s.add_argument("--address", default=d.address, help="Ray cluster to join (e.g. auto); default: start Ray here")
    s.add_argument("--dashboard", action="store_true", default=d.dashboard,
                   help="start the Ray dashboard of a local Ray, bound to 127.0.0.1 (default: off; a cluster's "
                        "dashboard is its head's)")
    s.add_argument("--num-cpus", type=int, default=d.num_cpus, help="CPUs of a local Ray (default: all)")
    s.add_argument("--storage-path", default=d.storage_path,
                   help=f"where sweeps are stored, shared by every node of a cluster (default: {d.storage_path})")
    s.add_argument("--name", default=d.name, help="sweep name (default: <space>-<experiment>-<time>)")
    s.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name (default: the latest) with its own settings")
    s.add_argument("--mlflow-uri", default=d.mlflow_uri,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db here)")
    s.add_argument("--mlflow-experiment", default=d.mlflow_experiment,
                   help=f"MLflow experiment name (default: {d.mlflow_experiment})")
    s.add_argument("--optuna-storage", metavar="URL", default=d.optuna_storage,
                   help=f"Optuna storage (an SQLAlchemy URL, e.g. postgresql://HOST/DB) holding the sweep's study, "
                        f"named after the sweep (default: sqlite {OPTUNA_FILE} in the sweep folder when it is local, "
                        f"else {OPTUNA_FILE} in the driver's working directory)")
    s.add_argument("--config", metavar="FILE", help="JSON object of base config fields; flags override it")
    for name, value in SWEEP_BASE.items():
        if value is True:
            s.add_argument(flag_name(f"no_{name}"), dest=f"no_{name}", action="store_true",
                           help=f"sweep without {flag_name(name)} (on by default in sweeps)")
    c = parser.add_argument_group("confirmation of a finished sweep (--confirm)")
    c.add_argument("--confirm", metavar="SWEEP", default=d.confirm,
                   help="re-run the top configs of the finished sweep SWEEP (<storage-path>/<name>) and its baseline "
                        "on fresh seeds, every task, no early stopping; stored in SWEEP/confirm (add --resume to "
                        "continue an interrupted confirmation)")
    c.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"completed configs to confirm, best validation accuracy first (default: {d.top_k})")
    c.add_argument("--seeds", type=int, default=d.seeds,
                   help=f"fresh seeds per confirmed config, the same for each (default: {d.seeds})")
    c.add_argument("--configs", metavar="LABELS", default=d.configs,
                   help="confirm these labels of the sweep's validation ranking, e.g. top2,top5 (instead of --top-k)")
    c.add_argument("--config-file", metavar="FILE", default=d.config_file,
                   help="confirm the configs of FILE, a JSON list of {label, values, source} written by hand; with a "
                        "folder that is not a sweep as --confirm, the base config comes from this command line's "
                        "flags, as a sweep's does (docs/sweep.md \"Sequential confirmation\")")
    c.add_argument("--label", metavar="NAME", default=d.label,
                   help="keep this confirmation in SWEEP/confirm-NAME (default: SWEEP/confirm)")
    c.add_argument("--first-seed", type=int, metavar="N", default=d.first_seed,
                   help="use the seeds N, N+1, ... (default: the first seed after every seed the seed ledger knows)")
    c.add_argument("--reuse-seeds", action="store_true", default=d.reuse_seeds,
                   help="allow seeds a sweep or confirmation already used (the plan and report say so)")
    c.add_argument("--sequential", action="store_true", default=d.sequential,
                   help="a group-sequential confirmation: --looks batches of seeds up to --max-seeds, a verdict per "
                        "config after each, decided configs stop")
    c.add_argument("--max-seeds", type=int, metavar="N", default=d.max_seeds,
                   help=f"most paired seeds per config of a sequential confirmation (default: {d.max_seeds})")
    c.add_argument("--looks", type=int, metavar="K", default=d.looks,
                   help=f"evenly spaced looks of a sequential confirmation (default: {d.looks})")
    c.add_argument("--margin", type=float, metavar="D", default=d.margin,
                   help="equivalence margin of a sequential confirmation, in units of test acc_avg (e.g. 0.005)")
    c.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"family-wise two-sided error rate over looks and configs (default: {d.alpha:g})")
    c.add_argument("--spending", default=d.spending, choices=("obrien-fleming", "pocock"),
                   help=f"alpha-spending function of a sequential confirmation (default: {d.spending})")
    c.add_argument("--then-confirm", action="store_true", default=d.then_confirm,
                   help="run the sweep, then pre-register its best config (top1) against the baseline, confirm it "
                        "sequentially on fresh seeds (--max-seeds, --looks, --margin, --alpha) in SWEEP/confirm, and "
                        "write the report (python -m analysis SWEEP/confirm)")
    add_config_flags(parser, exclude=EXCLUDED_FLAGS)
    return parser


# ---------------------------------------------------------------------------------------------
@dataclass
class MlflowLocation:
    """Where a sweep's runs are in MLflow (known once the parent run exists)."""

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str


@dataclass
class SweepPlan:
    """Everything decided (and validated) before Ray starts; `sweep.json` holds `to_json()`."""

    name: str
    folder: SweepFolder
    space: SearchSpace
    base_config: dict[str, Any]        # the base config as the user gave it (flags, --config, sweep defaults)
    trial_base: dict[str, Any]         # the same with paths made absolute, as every trial receives it
    resolved: BIRConfig
    segments_per_task: int
    options: SweepOptions
    argv: list[str]
    sweep_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: str = field(default_factory=lambda: dt.datetime.now().isoformat(timespec="seconds"))
    mlflow: MlflowLocation | None = None
    optuna_storage: str | None = None    # the study's storage URL (None: in memory, sweeps from before it existed)

    @property
    def study_name(self) -> str:
        return self.name

    @property
    def n_tasks(self) -> int:
        return self.resolved.tasks

    @property
    def max_t(self) -> int:
        return self.n_tasks * self.segments_per_task

    @property
    def grace_t(self) -> int:
        return self.options.grace_period * self.segments_per_task

    @property
    def baseline_config(self) -> dict[str, Any]:
        return {**self.base_config, **EXAGGERATION_OFF}

    @property
    def tuned_names(self) -> list[str]:
        """The config fields the space sets: fixed switches, then sampled parameters."""
        return [*self.space.fixed, *self.space.param_names]

    def to_json(self) -> dict[str, Any]:
        from trainables.bir import SCHEDULER_METRIC

        return {"name": self.name, "sweep_id": self.sweep_id, "sweep_dir": self.folder.location,
                "created": self.created, "space": self.space.to_dict(), "base_config": self.base_config,
                "trial_base_config": self.trial_base,
                "resolved_base_config": self.resolved.to_dict(), "baseline_config": self.baseline_config,
                "metric": METRIC, "mode": MODE,
                "asha": {"metric": SCHEDULER_METRIC, "time_attr": "training_iteration", "max_t": self.max_t,
                         "grace_period": self.grace_t, "reduction_factor": self.options.reduction_factor,
                         "segments_per_task": self.segments_per_task},
                "optuna": {"sampler": "TPESampler", "seed": self.resolved.seed,
                           "n_startup_trials": self.options.startup_trials, "storage": self.optuna_storage,
                           "study_name": self.study_name},
                "cli": {"argv": self.argv, "args": self.options.to_dict()},
                "mlflow": None if self.mlflow is None else dataclasses.asdict(self.mlflow),
                "versions": package_versions(), "git_commit": git_commit()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepPlan:
        """The plan a sweep.json holds (for --resume and --confirm)."""
        try:
            folder = SweepFolder.of(data["sweep_dir"])
            return cls(name=data["name"], folder=folder, space=SearchSpace.from_dict(data["space"]),
                       base_config=data["base_config"],
                       trial_base=data.get("trial_base_config", data["base_config"]),
                       resolved=BIRConfig.from_dict(data["resolved_base_config"]),
                       segments_per_task=data["asha"]["segments_per_task"],
                       options=SweepOptions.from_dict(data["cli"]["args"]), argv=data["cli"]["argv"],
                       sweep_id=data["sweep_id"], created=data["created"],
                       mlflow=MlflowLocation(**data["mlflow"]) if data.get("mlflow") else None,
                       optuna_storage=data.get("optuna", {}).get("storage"))
        except (KeyError, TypeError, ConfigError) as err:
            raise ConfigError(f"{SWEEP_FILE} of sweep {data.get('name', '?')!r} is not one this version wrote "
                              f"({type(err).__name__}: {err})") from err

    @classmethod
    def load(cls, folder: SweepFolder) -> SweepPlan:
        try:
            data = json.loads(folder.read_text(SWEEP_FILE))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{folder}/{SWEEP_FILE} is not valid JSON: {err.msg}") from err
        plan = cls.from_json(data)
        plan.folder = folder   # the folder may have moved (or been copied) since the sweep ran
        return plan


def _base_values(options: SweepOptions, args: argparse.Namespace) -> dict[str, Any]:
    values = dict(SWEEP_BASE)
    for name, value in SWEEP_BASE.items():
        if value is True and getattr(options, f"no_{name}", False):
            values[name] = False
    overrides = config_overrides(args)
    if not options.config and "experiment" not in overrides and "iters" not in overrides:
        values["iters"] = DEMO_ITERS
    if options.config:
        values |= BIRConfig.from_json(options.config)
    return values | overrides


def check_options(options: SweepOptions, n_tasks: int) -> None:
    """The sweep's own options are in range; raises ConfigError with the first that is not."""
    o = options
    checks = [
        (o.num_samples >= 1, f"--num-samples must be >= 1, got {o.num_samples}"),
        (o.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {o.max_concurrent}"),
        (o.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {o.cpus_per_trial}"),
        (o.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {o.gpus_per_trial}"),
        (1 <= o.grace_period <= n_tasks, f"--grace-period must be 1..{n_tasks} tasks, got {o.grace_period}"),
        (o.reduction_factor > 1, f"--reduction-factor must be > 1, got {o.reduction_factor}"),
        (o.seeds_per_trial >= 1, f"--seeds-per-trial must be >= 1, got {o.seeds_per_trial}"),
        (o.n_startup_trials is None or o.n_startup_trials >= 1,
         f"--n-startup-trials must be >= 1, got {o.n_startup_trials}"),
        (o.time_budget is None or o.time_budget > 0, f"--time-budget must be > 0, got {o.time_budget}"),
        (o.max_failures >= 0, f"--max-failures must be >= 0, got {o.max_failures}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_base_acts(base: dict[str, Any], space: SearchSpace) -> None:
    """A term weight or option of the base config acts in some trial: a term that declares it is on in the base,
    fixed on by the space, or one of the space's choices."""
    maybe_on = {p.name: True for p in space.params if p.distribution == "choice" and True in p.choices}
    cfg = BIRConfig.from_dict({**base, **space.fixed, **maybe_on})
    for name, switches in idle_fields(cfg):
        if name in base:
            raise ConfigError(f"{flag_name(name)} acts only with " + " or ".join(flag_name(s) for s in switches)
                              + f", which no trial of space {space.name} switches on: drop {flag_name(name)}, or "
                              "search a space with that term")


def plan_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> SweepPlan:
    """Validate flags, base config and space into a plan; raises ConfigError (exit 2, Ray not started)."""
    options = SweepOptions.from_namespace(args)
    user_base = _base_values(options, args)
    resolved = BIRConfig.from_dict(user_base).resolved()
    if resolved.val_fraction <= 0:
        raise ConfigError(f"sweeps select on {METRIC}: --val-fraction must be > 0 (default 0.1 in sweeps)")
    check_options(options, resolved.tasks)
    space = load_space(options.space)
    space.validate_against(user_base)
    check_base_acts(user_base, space)
    try:
        BIRConfig.from_dict({**user_base, **EXAGGERATION_OFF}).resolved()
    except ConfigError as err:
        raise ConfigError(f"the baseline (base config, every exaggeration off) is invalid: {err}") from err
    trial_base = dict(user_base)
    trial_base["data_dir"] = str(Path(resolved.data_dir).expanduser().resolve())
    if resolved.protocol_family == "CIFAR":   # elsewhere refused as changing nothing
        trial_base["pretrained_conv"] = str(Path(resolved.pretrained_conv).expanduser().resolve())
    seg = resolved.segment_iters
    segments_per_task = 1 if seg <= 0 else math.ceil(resolved.iters / seg)
    if segments_per_task > 1 and options.share_first_task:
        # a shared task 1 is adopted whole, while each step of a segmented trial trains part of a task
        if args.share_first_task is not None:   # given on the command line
            raise ConfigError(f"--share-first-task adopts task 1 whole, but --segment-iters={seg} splits each task "
                              f"into {segments_per_task} steps: drop one of them")
        options.share_first_task = False
    name = options.name or f"{space.name}-{resolved.experiment}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    options.name = name
    folder = SweepFolder.at(options.storage_path, name)
    check_storage(options.storage_path)   # bounded: an unreachable storage URI would hang the next call
    if folder.exists(SWEEP_FILE):
        raise ConfigError(f"sweep folder {folder} exists: add --resume to continue it, or choose another --name")
    storage = options.optuna_storage or default_optuna_storage(folder)
    check_optuna_storage(storage, name, given=options.optuna_storage is not None)
    return SweepPlan(name=name, folder=folder, space=space, base_config=user_base, trial_base=trial_base,
                     resolved=resolved, segments_per_task=segments_per_task, options=options,
                     argv=list(sys.argv[1:] if argv is None else argv), optuna_storage=storage)


def default_optuna_storage(folder: SweepFolder) -> str:
    """SQLite in the sweep folder when it is local; beside the driver (its working directory) when the folder is a
    URI, which SQLite cannot open."""
    where = Path(folder.location) if folder.is_local else Path.cwd()
    return f"sqlite:///{where / OPTUNA_FILE}"


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for another database)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def check_optuna_storage(url: str, study_name: str, given: bool) -> None:
    """The study's storage can hold a new study of this name: a well-formed URL, an SQLite file's folder present,
    and (for a storage that already exists) no study of that name in it yet."""
    from sqlalchemy.exc import ArgumentError

    try:
        file = sqlite_file(url)
    except ArgumentError:
        raise ConfigError(f"--optuna-storage {url} is not a database URL (e.g. sqlite:////abs/optuna.db, "
                          "postgresql://HOST/DB)") from None
    if file is not None:
        if not file.is_absolute():
            raise ConfigError(f"--optuna-storage {url}: give an absolute SQLite path (four slashes, "
                              "sqlite:////abs/optuna.db): a resumed sweep may run in another directory")
        if given and not file.parent.is_dir():
            raise ConfigError(f"--optuna-storage {url}: folder {file.parent} does not exist")
        if not file.is_file():
            return   # a new database: no study in it yet
    import optuna

    try:
        names = optuna.study.get_all_study_names(optuna_storage(url))
    except Exception as err:   # SQLAlchemy's errors differ by database and driver
        raise ConfigError(f"cannot open the Optuna storage {url}: {str(err).splitlines()[0]}") from None
    if study_name in names:
        raise ConfigError(f"the Optuna storage {url} already holds a study {study_name!r}: choose another --name, or "
                          "add --resume to continue that sweep")


def check_study_exists(plan: SweepPlan) -> None:
    """A resumed sweep's Optuna study is still where it began (checked before Ray starts)."""
    url = plan.optuna_storage
    if url is None:
        return   # a sweep from before the study had a storage: its searcher state holds it
    file = sqlite_file(url)
    if file is not None and not file.is_file():
        raise ConfigError(f"the Optuna study of sweep {plan.name} was in {file}, which is gone: resume where the "
                          "sweep's driver ran (the file is beside it, or in the sweep folder), or copy it back there")
    import optuna

    try:
        names = optuna.study.get_all_study_names(optuna_storage(url))
    except Exception as err:   # SQLAlchemy's errors differ by database and driver
        raise ConfigError(f"cannot open the Optuna storage {url} of sweep {plan.name}: "
                          f"{str(err).splitlines()[0]}") from None
    if plan.study_name not in names:
        raise ConfigError(f"the Optuna storage {url} holds no study {plan.study_name!r}: it is not the one sweep "
                          f"{plan.name} began with")


def optuna_storage(url: str):
    """The Optuna RDB storage at `url` (an SQLite file waits up to 30 s for a lock, not 5)."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


# What a confirmation and a resumed sweep take from this command line: where and how fast to run (the
# configs, budgets and resources are the sweep's own, from its sweep.json).
CONFIRM_OPTIONS = ("confirm", "top_k", "seeds", "resume", "max_concurrent", "address", "dashboard", "num_cpus")
RESUME_OPTIONS = ("resume", "name", "storage_path", "address", "dashboard", "num_cpus")


def given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options given on the command line (not those left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# Options of a confirmation only; with --then-confirm a sweep takes those of its sequential confirmation
CONFIRMATION_ONLY = ("top_k", "seeds", "configs", "config_file", "label", "first_seed", "reuse_seeds", "sequential",
                     "max_seeds", "looks", "margin", "alpha", "spending")
THEN_CONFIRM_OPTIONS = ("first_seed", "max_seeds", "looks", "margin", "alpha", "spending")


def check_confirm_options(given: set[str]) -> None:
    """The options of a confirmation only with --confirm (or, its sequential ones, with --then-confirm); with
    --confirm, no option it would ignore."""
    if "confirm" not in given:
        allowed = THEN_CONFIRM_OPTIONS if "then_confirm" in given else ()
        stray = sorted(given & set(CONFIRMATION_ONLY) - set(allowed))
        if stray:
            raise ConfigError(f"{flag_name(stray[0])} is an option of --confirm SWEEP (re-running a finished sweep's "
                              f"winners on fresh seeds); add --confirm SWEEP or drop {flag_name(stray[0])}")
        return
    ignored = sorted(given - set(CONFIRM_OPTIONS))
    if ignored:
        flag = flag_name(ignored[0])
        apply = ", ".join(flag_name(o) for o in CONFIRM_OPTIONS[1:])
        raise ConfigError(f"{flag} does not apply to --confirm: a confirmation re-runs the sweep's own configs with "
                          f"the sweep's own settings (only {apply} apply); drop {flag}")


def check_resume_options(args: argparse.Namespace, given: set[str], plan: SweepPlan) -> None:
    """A resumed sweep runs with the settings it began with: a setting given again must be the same."""
    options = SweepOptions.from_namespace(args)
    fields = set(BIRConfig.field_names())
    defaults = BIRConfig().to_dict()
    for dest in sorted(given - set(RESUME_OPTIONS)):
        if dest in fields:
            mine, theirs = getattr(args, dest), plan.base_config.get(dest, defaults.get(dest))
        elif hasattr(plan.options, dest):
            mine, theirs = getattr(options, dest), getattr(plan.options, dest)
        else:
            continue
        if mine != theirs:
            flag = flag_name(dest)
            raise ConfigError(f"{flag} {mine} contradicts sweep {plan.name}'s own {flag} {theirs}: a sweep resumes "
                              f"with the settings it began with (its sweep.json); drop {flag}, or start a new sweep "
                              "with another --name")


def resume_folder(options: SweepOptions) -> SweepFolder:
    """The sweep `--resume` continues: --name under --storage-path, else the latest one there."""
    check_storage(options.storage_path)
    if options.name:
        folder = SweepFolder.at(options.storage_path, options.name)
        if not folder.exists(SWEEP_FILE):
            raise ConfigError(f"no sweep to resume at {folder} (no {SWEEP_FILE})")
        return folder
    folder = SweepFolder.at(options.storage_path, "-").latest_sibling()
    if folder is None:
        raise ConfigError(f"no sweep to resume in {SweepFolder.at(options.storage_path, '-').root}")
    return folder
