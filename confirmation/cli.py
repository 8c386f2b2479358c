"""`python -m tune_bir.sweep --confirm DIR ...` for a chosen, pre-registered (and maybe sequential) confirmation.

DIR is a finished sweep (the confirmation lives in DIR/confirm or DIR/confirm-LABEL and takes the sweep's
base config, resources and MLflow parent run) or any other folder, which is then the confirmation's own
(its base config comes from this command line's flags, as a sweep's does, and it opens an MLflow parent run
of its own). Everything is checked before plan.json is written; plan.json is written before the first run.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confirmation.ledger import Ledger, overlap_message
from confirmation.looks import DONE, FAILED, INTERRUPTED, LooksOutcome, run_looks
from confirmation.plan import (
    BASELINE,
    PLAN_FILE,
    STATE_FILE,
    ConfigSpec,
    ConfirmationPlan,
    check_configs,
    check_design_options,
    design_dict,
    read_config_file,
    sha256_text,
)
from search_spaces import EXAGGERATION_OFF
from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.fields import flag_name
from tune_bir.record import git_commit
from tune_bir.sweep.plan import (
    PROG,
    MlflowLocation,
    SweepOptions,
    SweepPlan,
    _base_values,
    build_parser,
    check_options,
    given_options,
)
from tune_bir.sweep.storage import SWEEP_FILE, SweepFolder
from tune_bir.sweep.summary import run_alone_lines, typed_values

# Options of a new confirmation, besides the base config's flags (those only for one that is not a sweep's)
NEW_OPTIONS = {"confirm", "top_k", "seeds", "configs", "config_file", "label", "first_seed", "reuse_seeds",
               "sequential", "max_seeds", "looks", "margin", "alpha", "spending", "max_concurrent", "address",
               "dashboard", "num_cpus"}
OWN_FOLDER_OPTIONS = {"cpus_per_trial", "gpus_per_trial", "max_failures", "mlflow_uri", "mlflow_experiment",
                      "config", "no_brain_inspired", "no_si"}
# A resumed confirmation continues its own plan: only where and how fast to run it may be given again
RESUME_OPTIONS = {"confirm", "label", "resume", "max_concurrent", "address", "dashboard", "num_cpus"}
# Paths in a base config: where a run finds its files, not what it computes
PATH_FIELDS = ("data_dir", "pretrained_conv")
EXIT = {DONE: 0, INTERRUPTED: 130, FAILED: 1}


@dataclass
class Where:
    """Where a confirmation lives, and the sweep it belongs to (None: a folder of its own)."""

    folder: SweepFolder
    label: str
    sweep: SweepPlan | None
    ledger: Ledger


def is_chosen_confirmation(args: argparse.Namespace) -> bool:
    """`--confirm` with an option of a chosen or sequential confirmation, or of a folder holding one (a plan.json:
    DIR's own, or SWEEP/confirm's); else it is today's top-K `--confirm` (tune_bir.sweep.confirm)."""
    if not args.confirm:
        return False
    if any(getattr(args, name) not in (None, False) for name in ("configs", "config_file", "label", "first_seed",
                                                                   "reuse_seeds", "sequential", "margin")):
        return True
    target = SweepFolder.of(args.confirm)
    try:
        return target.exists(PLAN_FILE) or target.sub("confirm").exists(PLAN_FILE)
    except ConfigError:
        return False   # unreadable storage: the top-K path says so in its own words


def locate(options: SweepOptions) -> Where:
    target = SweepFolder.of(options.confirm)
    if target.exists(SWEEP_FILE):
        sweep = SweepPlan.load(target)
        label = options.label or "confirm"
        return Where(target.sub(f"confirm-{label}" if options.label else "confirm"), label, sweep,
                     Ledger(SweepFolder.of(target.root)))
    return Where(target, options.label or target.name, None, Ledger(SweepFolder.of(target.root)))


def _check_given(given: set[str], where: Where, resume: bool) -> None:
    fields = set(BIRConfig.field_names())
    if resume:
        allowed = RESUME_OPTIONS
        why = "a resumed confirmation continues its own plan.json"
    elif where.sweep is not None:
        allowed = NEW_OPTIONS
        why = f"a confirmation of sweep {where.sweep.name} runs on the sweep's own base config and settings"
    else:
        allowed = NEW_OPTIONS | OWN_FOLDER_OPTIONS | fields
        why = "it is an option of a sweep, not of a confirmation"
    stray = sorted(given - allowed)
    if stray:
        raise ConfigError(f"{flag_name(stray[0])} does not apply here: {why}; drop {flag_name(stray[0])}")


def _sweep_configs(where: Where, options: SweepOptions) -> list[ConfigSpec]:
    """--configs LABELS (or --top-k) of the sweep's validation ranking."""
    from tune_bir.sweep.confirm import select_configs, sweep_rows
    from tune_bir.sweep.status import rank_trials

    if where.sweep is None:
        raise ConfigError(f"--configs picks labels of a sweep's ranking, but {where.folder} holds no sweep "
                          f"({SWEEP_FILE}); give a sweep folder to --confirm, or a --config-file")
    wanted = [s.strip() for s in options.configs.split(",")] if options.configs else \
        [f"top{k}" for k in range(1, options.top_k + 1)]
    ranks = []
    for label in wanted:
        if not (label.startswith("top") and label[3:].isdigit() and int(label[3:]) >= 1):
            raise ConfigError(f"--configs {options.configs}: {label!r} is not a label of the ranking (top1, top2, ...)")
        ranks.append(int(label[3:]))
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--configs {options.configs} names a config twice")
    n_ranked = len([r for r in rank_trials(sweep_rows(where.sweep)) if not r["baseline"]])
    missing = [w for w, r in zip(wanted, ranks, strict=True) if r > n_ranked]
    if missing:
        raise ConfigError(f"--configs: {missing[0]} is not in sweep {where.sweep.name}'s ranking, which has "
                          f"{n_ranked} completed config(s) besides the baseline"
                          + (f" (top1..top{n_ranked})" if n_ranked else ""))
    ranked = select_configs(where.sweep, max(ranks))[1:]
    return [ConfigSpec(label, ranked[r - 1].values, {"sweep": where.sweep.folder.location,
                                                    "trial_id": ranked[r - 1].source_trial_id, "rank": label,
                                                    "sweep_val_acc_avg": ranked[r - 1].sweep_val_acc_avg})
            for label, r in zip(wanted, ranks, strict=True)]


def _without_paths(base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k not in PATH_FIELDS}


def _source_sweeps(configs: list[ConfigSpec], config_file: str | None, base: dict[str, Any]) -> list[str]:
    """The sweeps the configs' sources name (a "sweep" key: its folder or sweep.json, relative to the config
    file): each must have the confirmation's base config, and a named confirmation config the same values."""
    here = Path(config_file).expanduser().resolve().parent if config_file else Path.cwd()
    sweeps = []
    for c in configs:
        source = c.source if isinstance(c.source, dict) else {}
        if "sweep" not in source:
            continue
        location = str((here / source["sweep"]).resolve()) if "://" not in source["sweep"] else source["sweep"]
        path = Path(location)
        sweep_json = path if path.name == SWEEP_FILE else path / SWEEP_FILE
        try:
            sweep = json.loads(sweep_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"config {c.label}'s source names sweep {source['sweep']}, whose {SWEEP_FILE} cannot be "
                              f"read ({err})") from err
        theirs = _without_paths(sweep["base_config"])
        if theirs != _without_paths(base):
            raise ConfigError(f"config {c.label} comes from sweep {sweep.get('name')} whose base config {theirs} is "
                              f"not this confirmation's {_without_paths(base)}: configs of one confirmation share "
                              "one baseline, so their sweeps' base configs must be equal")
        if "confirmation" in source and "config" in source:
            found = json.loads((here / source["confirmation"]).read_text())
            named = next((x for x in found["configs"] if x["config"] == source["config"]), None)
            if named is None or named["values"] != c.values:
                raise ConfigError(f"config {c.label}'s values are not those of {source['config']} in "
                                  f"{source['confirmation']}: copy them exactly, or drop the source's \"config\"")
        sweeps.append(str(sweep_json.parent))
    return sweeps


def _trial_base(base: dict[str, Any]) -> dict[str, Any]:
    resolved = BIRConfig.from_dict(base).resolved()
    trial = dict(base)
    trial["data_dir"] = str(Path(resolved.data_dir).expanduser().resolve())
    if resolved.protocol_family == "CIFAR":
        trial["pretrained_conv"] = str(Path(resolved.pretrained_conv).expanduser().resolve())
    return trial


def new_plan(args: argparse.Namespace, options: SweepOptions, where: Where, argv: list[str]) -> ConfirmationPlan:
    """Every check of a new confirmation, then its plan (nothing written yet); raises ConfigError."""
    if options.config_file and options.configs:
        raise ConfigError("--config-file and --configs both choose the configs: give one of them")
    if where.sweep is not None:
        base, trial_base = where.sweep.base_config, where.sweep.trial_base
        resources = {k: getattr(where.sweep.options, k) for k in ("cpus_per_trial", "gpus_per_trial", "max_failures")}
    else:
        if not options.config_file:
            raise ConfigError(f"{where.folder} holds no sweep ({SWEEP_FILE}): a confirmation of configs chosen by hand "
                              "needs --config-file FILE (or give a sweep folder to --confirm)")
        base = _base_values(options, args)
        try:
            BIRConfig.from_dict(base).resolved()
        except ConfigError as err:
            raise ConfigError(f"the base config is invalid: {err}") from err
        trial_base = _trial_base(base)
        check_options(options, BIRConfig.from_dict(base).resolved().tasks)
        resources = {k: getattr(options, k) for k in ("cpus_per_trial", "gpus_per_trial", "max_failures")}
    configs = read_config_file(options.config_file) if options.config_file else _sweep_configs(where, options)
    check_configs(configs, base)
    sweeps = _source_sweeps(configs, options.config_file, base)
    if where.sweep is not None:
        sweeps.insert(0, where.sweep.folder.location)
    if options.sequential:
        if options.margin is None:
            raise ConfigError("--sequential needs --margin D, the equivalence margin in units of acc_avg (e.g. 0.005)")
        check_design_options(options.alpha, options.margin, options.max_seeds, options.looks)
        design = design_dict(options.alpha, options.margin, options.max_seeds, options.looks, len(configs),
                             options.spending)
        n_seeds = options.max_seeds
    else:
        for name in ("margin",):
            if getattr(options, name) is not None:
                raise ConfigError(f"{flag_name(name)} is an option of --sequential: add --sequential or drop it")
        if options.seeds < 2:
            raise ConfigError(f"--seeds must be >= 2 (a paired comparison needs at least two seeds), "
                              f"got {options.seeds}")
        design, n_seeds = None, options.seeds
    used = where.ledger.used(sweeps, skip_folder=where.folder.location)
    if options.first_seed is not None:
        if options.first_seed < 0:
            raise ConfigError(f"--first-seed must be >= 0, got {options.first_seed}")
        first = options.first_seed
    else:
        first = max(used) + 1 if used else 0
    seeds = list(range(first, first + n_seeds))
    clash = overlap_message(seeds, used)
    if clash and not options.reuse_seeds:
        raise ConfigError(clash)
    return ConfirmationPlan(label=where.label, folder=where.folder.location, base_config=base, trial_base=trial_base,
                            configs=configs, seeds=seeds, design=design, resources=resources, sweeps=sweeps,
                            reuse_seeds=[s for s in seeds if s in used], argv=list(argv), git_commit=git_commit())


def registered_plan(where: Where) -> tuple[ConfirmationPlan, dict[str, Any]]:
    """The plan of the confirmation at where.folder, after checking its bytes against the registered sha256."""
    folder = where.folder
    if not folder.exists(PLAN_FILE):
        raise ConfigError(f"no confirmation to resume at {folder} (no {PLAN_FILE})")
    text = folder.read_text(PLAN_FILE)
    state = json.loads(folder.read_text(STATE_FILE)) if folder.exists(STATE_FILE) else {}
    entry = where.ledger.entry(folder.location)
    registered = (entry or {}).get("plan_sha256") or state.get("plan_sha256")
    if registered is None:
        raise ConfigError(f"{folder}/{PLAN_FILE} has no registered sha256 (not in {where.ledger.root}'s seed ledger, "
                          f"no {STATE_FILE}): it was never pre-registered, so it cannot be continued")
    actual = sha256_text(text)
    if actual != registered or state.get("plan_sha256", registered) != registered:
        raise ConfigError(f"{folder}/{PLAN_FILE} no longer matches its registered sha256 {registered[:16]}... "
                          f"(its bytes hash to {actual[:16]}...): a confirmation continues only the plan it "
                          "registered; restore that plan.json, or start a new confirmation (another --label) on "
                          "fresh seeds")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{folder}/{PLAN_FILE} is not valid JSON: {err.msg}") from err
    return ConfirmationPlan.from_json(data), state


def _open_parent_run(plan: ConfirmationPlan, where: Where, options: SweepOptions, sha: str,
                     group_id: str) -> MlflowLocation:
    """The MLflow parent run the confirmation's runs go under, tagged with the plan's sha256, plan.json attached."""
    from mlflow.tracking import MlflowClient

    from tune_bir.sweep.mlflow_callback import ROLE_TAG, SWEEP_TAG, experiment_id
    from tune_bir.tracking import default_tracking_uri

    if where.sweep is not None:
        location = where.sweep.mlflow
        client = MlflowClient(location.tracking_uri)
        client.set_tag(location.parent_run_id, f"tune_bir.plan_sha256.{where.folder.name}", sha)
    else:
        uri = default_tracking_uri(options.mlflow_uri)
        client = MlflowClient(uri)
        exp_id = experiment_id(client, options.mlflow_experiment)
        run = client.create_run(exp_id, run_name=plan.label, tags={
            SWEEP_TAG: group_id, ROLE_TAG: "confirmation", "tune_bir.plan_sha256": sha,
            "confirmation_dir": where.folder.location})
        location = MlflowLocation(uri, exp_id, options.mlflow_experiment, run.info.run_id)
    client.log_text(location.parent_run_id, plan.text(), f"{where.folder.name}/{PLAN_FILE}")
    return location


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a chosen confirmation; the exit code says how it ended (EXIT)."""
    from tune_bir.sweep.preflight import check_mlflow
    from tune_bir.sweep.run import check_parent_run, check_resources, connect_ray, prepare_environment
    from tune_bir.tracking import default_tracking_uri

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    options = SweepOptions.from_namespace(args)
    where = locate(options)
    _check_given(given_options(argv), where, options.resume)
    if options.resume:
        plan, state = registered_plan(where)
        sha, group_id = state["plan_sha256"], state["group_id"]
        mlflow = MlflowLocation(**state["mlflow"])
        check_parent_run(mlflow)
    else:
        if where.folder.exists(PLAN_FILE):
            raise ConfigError(f"{where.folder} holds a confirmation ({PLAN_FILE}): add --resume to continue it, or "
                              "choose another folder or --label")
        plan = new_plan(args, options, where, argv)
        if where.sweep is not None:
            if where.sweep.mlflow is None:
                raise ConfigError(f"{where.sweep.folder}/{SWEEP_FILE} names no MLflow parent run: the sweep never "
                                  "started")
            check_parent_run(where.sweep.mlflow)
        else:
            check_mlflow(default_tracking_uri(options.mlflow_uri))
        text = plan.text()
        where.folder.write_text(PLAN_FILE, text)
        sha, group_id = sha256_text(text), uuid.uuid4().hex[:12]
        print(f"plan: {where.folder}/{PLAN_FILE} sha256 {sha}")
        where.ledger.register(plan.label, where.folder.location, plan.seeds, sha)
        mlflow = _open_parent_run(plan, where, options, sha, group_id)
        state = {"plan_sha256": sha, "group_id": group_id, "mlflow": asdict(mlflow)}
        where.folder.write_text(STATE_FILE, json.dumps(state, indent=2) + "\n")
    run_options = SweepOptions(**{**asdict(SweepOptions()), **plan.resources,
                                  "max_concurrent": options.max_concurrent, "address": options.address,
                                  "dashboard": options.dashboard, "num_cpus": options.num_cpus})
    prepare_environment()
    resources = (plan.resources["cpus_per_trial"], plan.resources["gpus_per_trial"])
    started_ray = connect_ray(run_options, resources)
    try:
        check_resources(*resources)
        outcome = run_looks(plan, where.folder, run_options, mlflow, group_id)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if where.sweep is None and outcome.state == DONE:
        from mlflow.tracking import MlflowClient

        MlflowClient(mlflow.tracking_uri).set_terminated(mlflow.parent_run_id, status="FINISHED")
    print_outcome(plan, where, outcome, sha)
    return EXIT[outcome.state]


def resume_command(where: Where) -> str:
    label = f" --label {where.label}" if where.sweep is not None and where.label != "confirm" else ""
    target = where.sweep.folder.location if where.sweep is not None else where.folder.location
    return f"{PROG} --confirm {target}{label} --resume"


def print_outcome(plan: ConfirmationPlan, where: Where, outcome: LooksOutcome, sha: str) -> None:
    print()
    print(f"confirmation {plan.label}: {len(plan.configs)} config(s) against the {BASELINE}, seeds "
          f"{plan.seeds[0]}..{plan.seeds[-1]} at most, looks at {plan.looks} seeds; plan sha256 {sha[:16]}...")
    if outcome.message:
        print(outcome.message)
    last = {v["config"]: v for look in outcome.looks for v in look["verdicts"]}
    for c in plan.configs:
        v = last.get(c.label)
        if v is None:
            print(f"  {c.label:<14} no look decided yet")
        else:
            print(f"  {c.label:<14} look {v['look']} ({v['n']} seeds): {v['verdict']}, mean difference "
                  f"{v['estimate']:+.4f}, repeated CI [{v['rci_low']:+.4f}, {v['rci_high']:+.4f}]")
    configs = {label: typed_values(plan.base_config, {**EXAGGERATION_OFF, **values})
               for label, values in [(BASELINE, {}), *((c.label, c.values) for c in plan.configs)]}
    print(f"run one alone (any seed of {plan.seeds[0]}..{plan.seeds[-1]} for --seed; on the same kind of CPU and "
          "threads, that run's numbers bit for bit):")
    for line in run_alone_lines(configs, outcome.rows, plan.seeds[0], plan.resources.get("cpus_per_trial", 1)):
        print(f"  {line}")
    print(f"folder: {where.folder} (plan.json, looks.json, results.csv)")
    if outcome.state != DONE:
        print(f"continue it with: {resume_command(where)}")
