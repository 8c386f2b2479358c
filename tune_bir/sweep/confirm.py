"""`python -m tune_bir.sweep --confirm SWEEP`: is the sweep's winner real, or the luck of one seed?

A sweep's best config is the maximum of N single-seed validation scores: with N configs it beats the
baseline by chance alone. The confirmation re-runs the top K completed configs (ranked on validation,
the baseline left out) and the sweep's baseline, each with the same S fresh seeds that the sweep did
not use, to the full budget with no early stopping. Each (config, seed) is one Ray trial, so a
cluster runs them side by side; each is an MLflow child of the sweep's parent run. Everything lives
in `SWEEP/confirm/` (Ray's experiment state, `confirm.json`, `results.csv`) and resumes like a sweep.
Selection used validation accuracy; the confirmation reports test accuracy. The paired statistics
are `python -m analysis SWEEP`'s (docs/analysis.md).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from search_spaces import EXAGGERATION_OFF
from tune_bir.errors import ConfigError
from tune_bir.sweep.batch import BASELINE, batch_points, batch_tuner, confirmation_rows
from tune_bir.sweep.plan import METRIC, PROG, SweepOptions, SweepPlan
from tune_bir.sweep.run import (
    check_parent_run,
    check_resources,
    connect_ray,
    prepare_environment,
    restored_tuner,
    save_to_sweep,
)
from tune_bir.sweep.status import COMPLETED, is_finite_number, rank_trials
from tune_bir.sweep.storage import CONFIRM_DIR, CONFIRM_FILE, RESULTS_FILE, SWEEP_FILE, SweepFolder
from tune_bir.sweep.summary import best_values, csv_text, run_alone_lines


@dataclass
class ConfirmedConfig:
    """One config under confirmation: its label, where it came from, and the values that define it."""

    config: str                      # "baseline", "top1", "top2", ...
    source_trial_id: str | None      # the sweep trial it was taken from
    values: dict[str, Any]           # the tuned fields (the space's), as the sweep trial had them
    sweep_val_acc_avg: float | None  # its single-seed validation score in the sweep
    trial_config: dict[str, Any]     # the whole Tune config of the sweep trial, seed and labels aside


@dataclass
class ConfirmOutcome:
    plan: SweepPlan
    folder: SweepFolder
    configs: list[ConfirmedConfig]
    seeds: list[int]
    rows: list[dict[str, Any]]
    interrupted: bool


def fresh_seeds(plan: SweepPlan, n: int) -> list[int]:
    """n seeds the sweep did not use: its trials trained seed .. seed + seeds_per_trial - 1."""
    first = plan.resolved.seed + plan.options.seeds_per_trial
    return list(range(first, first + n))


def _check(options: SweepOptions) -> None:
    if options.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (configs to confirm besides the baseline), got {options.top_k}")
    if options.seeds < 2:
        raise ConfigError(f"--seeds must be >= 2 (a paired comparison needs at least two seeds), got {options.seeds}")


def load_sweep_plan(location: str) -> SweepPlan:
    """The plan of the finished sweep at `location` (<storage-path>/<name>); raises ConfigError."""
    folder = SweepFolder.of(location)
    if not folder.exists(SWEEP_FILE):
        raise ConfigError(f"no sweep at {folder} (no {SWEEP_FILE}): --confirm takes a sweep folder, "
                          "<storage-path>/<name>, as the sweep's summary prints it")
    return SweepPlan.load(folder)


def sweep_rows(plan: SweepPlan) -> list[dict[str, Any]]:
    """A finished sweep's results.csv rows (baseline a bool, the selection metric a float); raises ConfigError."""
    if not plan.folder.exists(RESULTS_FILE):
        raise ConfigError(f"sweep {plan.folder} has no {RESULTS_FILE}: it never finished; resume it first "
                          f"({PROG} --resume --name {plan.name} --storage-path {plan.folder.root})")
    rows = list(csv.DictReader(io.StringIO(plan.folder.read_text(RESULTS_FILE))))
    for row in rows:
        row["baseline"] = row.get("baseline") == "True"
        value = row.get(METRIC)
        row[METRIC] = float(value) if value not in (None, "") else math.nan
    return rows


def _trial_config(plan: SweepPlan, trial_id: str) -> dict[str, Any]:
    """The Tune config a sweep trial ran with (its params.json), labels aside."""
    trial = plan.folder.sub(f"BIRTrainable_{trial_id}")
    try:
        config = json.loads(trial.read_text("params.json"))
    except (OSError, FileNotFoundError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the config of trial {trial_id} ({trial}/params.json): {err}") from err
    return {k: v for k, v in config.items() if not k.startswith("__")}


def select_configs(plan: SweepPlan, top_k: int) -> list[ConfirmedConfig]:
    """The baseline, then the top_k completed configs of the sweep on validation accuracy (baseline excluded)."""
    rows = sweep_rows(plan)
    ranked = [r for r in rank_trials(rows) if not r["baseline"]]
    if not ranked:
        raise ConfigError(f"sweep {plan.folder} has no completed trial besides the baseline: nothing to confirm "
                          "(run more trials, e.g. a larger --num-samples)")
    baseline_row = next((r for r in rows if r["baseline"]), None)
    if baseline_row is not None:
        baseline_config = _trial_config(plan, baseline_row["trial_id"])
    else:   # the baseline never finished (interrupted sweep): its config is the base with every term off
        baseline_config = {**plan.trial_base, **EXAGGERATION_OFF, "baseline": True,
                           "seeds_per_trial": plan.options.seeds_per_trial,
                           "share_first_task": plan.options.share_first_task}
    score = baseline_row[METRIC] if baseline_row else None
    configs = [ConfirmedConfig(BASELINE, baseline_row and baseline_row["trial_id"], {},
                               score if is_finite_number(score) else None, baseline_config)]
    for rank, row in enumerate(ranked[:top_k], start=1):
        config = _trial_config(plan, row["trial_id"])
        configs.append(ConfirmedConfig(f"top{rank}", row["trial_id"],
                                       {k: config[k] for k in plan.tuned_names if k in config},
                                       row[METRIC], config))
    return configs


def confirmation_points(configs: list[ConfirmedConfig], seeds: list[int]) -> list[dict[str, Any]]:
    """One Tune config per (seed, config), seed-major: the configs of a seed share its task 1 on a node."""
    return batch_points({c.config: c.trial_config for c in configs}, seeds)


def run_confirmation(options: SweepOptions) -> ConfirmOutcome:
    """Run (or resume) the confirmation of the sweep `options.confirm`; raises ConfigError on bad input."""
    _check(options)
    plan = load_sweep_plan(options.confirm)
    folder = plan.folder.sub(CONFIRM_DIR)
    if folder.exists(CONFIRM_FILE) and not options.resume:
        raise ConfigError(f"{folder} exists: add --resume to continue that confirmation, or delete the folder "
                          "to start it again")
    if options.resume and not folder.exists(CONFIRM_FILE):
        raise ConfigError(f"no confirmation to resume at {folder} (no {CONFIRM_FILE})")
    if plan.mlflow is None:
        raise ConfigError(f"{plan.folder}/{SWEEP_FILE} names no MLflow parent run: the sweep never started")
    if options.resume:
        saved = json.loads(folder.read_text(CONFIRM_FILE))
        configs = [ConfirmedConfig(**c, trial_config={}) for c in saved["configs"]]
        seeds = saved["seeds"]
    else:
        configs = select_configs(plan, options.top_k)
        seeds = fresh_seeds(plan, options.seeds)
    check_parent_run(plan.mlflow)
    # the sweep's resources and failure retries, this call's concurrency
    trial_options = dataclasses.replace(plan.options, max_concurrent=options.max_concurrent)
    prepare_environment()
    started_ray = connect_ray(options, (plan.options.cpus_per_trial, plan.options.gpus_per_trial))
    try:
        check_resources(plan.options.cpus_per_trial, plan.options.gpus_per_trial)
        if options.resume:
            tuner = restored_tuner(folder.location, trial_options)
        else:
            summary = {"sweep": plan.name, "sweep_dir": plan.folder.location, "seeds": seeds,
                       "n_tasks": plan.n_tasks, "selected_on": METRIC, "reported": "acc_avg",
                       "configs": [{k: v for k, v in asdict(c).items() if k != "trial_config"} for c in configs]}
            save_to_sweep(plan, CONFIRM_FILE, json.dumps(summary, indent=2), artifact_dir=CONFIRM_DIR)
            tuner = batch_tuner(plan.folder, CONFIRM_DIR, confirmation_points(configs, seeds), trial_options,
                                plan.mlflow, f"{plan.sweep_id}-{CONFIRM_DIR}", plan.n_tasks)
        grid = tuner.fit()
        rows, unfinished = confirmation_rows(grid, folder, plan.n_tasks)
        unfinished = unfinished or len(rows) < len(configs) * len(seeds)
        save_to_sweep(plan, RESULTS_FILE, csv_text(rows), artifact_dir=CONFIRM_DIR)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return ConfirmOutcome(plan, folder, configs, seeds, rows, unfinished)


def print_confirmation(outcome: ConfirmOutcome) -> None:
    import statistics

    print()
    print(f"confirmation of sweep {outcome.plan.name}: {len(outcome.configs)} configs x {len(outcome.seeds)} "
          f"fresh seeds ({outcome.seeds[0]}..{outcome.seeds[-1]}), every task, no early stopping")
    if outcome.interrupted:
        print(f"interrupted; continue it with: {PROG} --confirm {outcome.plan.folder.location} --resume")
    print(f"  {'config':<10} {'sweep val':>9} {'seeds':>5} {'test acc_avg mean':>17} {'sd':>7}")
    for c in outcome.configs:
        done = [r["acc_avg"] for r in outcome.rows if r["config"] == c.config and r["status"] == COMPLETED]
        mean = statistics.fmean(done) if done else math.nan
        sd = statistics.stdev(done) if len(done) > 1 else math.nan
        sweep_val = f"{c.sweep_val_acc_avg:.4f}" if c.sweep_val_acc_avg is not None else "-"
        print(f"  {c.config:<10} {sweep_val:>9} {len(done):>5} {mean:>17.4f} {sd:>7.4f}  "
              + " ".join(f"{k}={v}" for k, v in c.values.items()))
    print(f"run one alone (any seed of {outcome.seeds[0]}..{outcome.seeds[-1]} for --seed; on the same kind of CPU "
          "and threads, that run's numbers bit for bit):")
    configs = {c.config: best_values(outcome.plan, {"baseline": c.config == BASELINE, **c.values})
               for c in outcome.configs}
    for line in run_alone_lines(configs, outcome.rows, outcome.seeds[0], outcome.plan.options.cpus_per_trial):
        print(f"  {line}")
    print(f"results: {outcome.folder}/{RESULTS_FILE}")
    print(f"paired statistics (t-test, Wilcoxon, Holm) and plots: python -m analysis {outcome.plan.folder.location}")
