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
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from search_spaces import EXAGGERATION_OFF
from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.sweep.plan import METRIC, PROG, SweepOptions, SweepPlan
from tune_bir.sweep.run import (
    check_parent_run,
    check_resources,
    connect_ray,
    prepare_environment,
    restored_tuner,
    run_config,
    save_to_sweep,
    trainable_with_resources,
    trial_dirname,
)
from tune_bir.sweep.status import COMPLETED, is_finite_number, rank_trials, trial_status
from tune_bir.sweep.storage import CONFIRM_DIR, CONFIRM_FILE, RESULTS_FILE, SWEEP_FILE, SweepFolder
from tune_bir.sweep.summary import csv_text, saved_statuses

BASELINE = "baseline"
# keys of a trial's config that label it for MLflow (tags) and for the results table; the trainable ignores them
CONFIG_KEY, SEED_KEY = "__confirm_config", "__confirm_seed"
# final metrics kept per (config, seed), besides the per-task accuracies and the accuracy after each task
FINAL_METRICS = ("acc_avg", "forgetting_avg", "bwt", "val_acc_avg", "val_forgetting_avg", "time_total_s")


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
    points = [{**c.trial_config, "seed": seed, "seeds_per_trial": 1, CONFIG_KEY: c.config, SEED_KEY: seed}
              for seed in seeds for c in configs]
    # Tune's preset points may only set keys the param space has, so every point sets every key any point
    # sets: a field another config tunes takes its default here (the term it belongs to is off)
    defaults = BIRConfig().to_dict()
    keys = dict.fromkeys(k for point in points for k in point)
    return [{k: point.get(k, defaults.get(k)) for k in keys} for point in points]


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
    prepare_environment()
    started_ray = connect_ray(options, (plan.options.cpus_per_trial, plan.options.gpus_per_trial))
    try:
        check_resources(plan.options.cpus_per_trial, plan.options.gpus_per_trial)
        if options.resume:
            tuner = restored_tuner(folder.location, plan.options)
        else:
            summary = {"sweep": plan.name, "sweep_dir": plan.folder.location, "seeds": seeds,
                       "n_tasks": plan.n_tasks, "selected_on": METRIC, "reported": "acc_avg",
                       "configs": [{k: v for k, v in asdict(c).items() if k != "trial_config"} for c in configs]}
            save_to_sweep(plan, CONFIRM_FILE, json.dumps(summary, indent=2), artifact_dir=CONFIRM_DIR)
            tuner = _new_confirmation_tuner(plan, options, confirmation_points(configs, seeds))
        grid = tuner.fit()
        rows, unfinished = confirmation_rows(grid, folder, plan.n_tasks)
        unfinished = unfinished or len(rows) < len(configs) * len(seeds)
        save_to_sweep(plan, RESULTS_FILE, csv_text(rows), artifact_dir=CONFIRM_DIR)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return ConfirmOutcome(plan, folder, configs, seeds, rows, unfinished)


def _new_confirmation_tuner(plan: SweepPlan, options: SweepOptions, points: list[dict[str, Any]]):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune_bir.sweep.mlflow_callback import MlflowSweepCallback

    # every point sets the same keys: the first one is the param space, the points override it
    callback = MlflowSweepCallback(plan.mlflow, f"{plan.sweep_id}-{CONFIRM_DIR}", plan.n_tasks)
    return tune.Tuner(
        trainable_with_resources(plan.options),
        param_space=dict(points[0]),
        tune_config=tune.TuneConfig(
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=options.max_concurrent),
            num_samples=len(points), reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=run_config(CONFIRM_DIR, plan.folder.location, [callback], plan.options.max_failures,
                              [CONFIG_KEY, SEED_KEY]))


def confirmation_rows(grid: Any, folder: SweepFolder, n_tasks: int) -> tuple[list[dict[str, Any]], bool]:
    """One row per finished (config, seed) trial: final metrics and acc_avg after each task."""
    saved = saved_statuses(folder.location)
    rows, unfinished = [], False
    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        config = result.config or {}
        if trial_id is None or saved.get(trial_id) not in ("TERMINATED", "ERROR"):
            unfinished = True
            continue
        metrics = result.metrics
        row: dict[str, Any] = {"config": config[CONFIG_KEY], "seed": int(config[SEED_KEY]), "trial_id": trial_id,
                               "status": trial_status(metrics, result.error is not None, n_tasks)}
        row |= {k: metrics.get(k, math.nan) for k in FINAL_METRICS}
        # the CPU it trained on and what its libraries dispatched to (tune_bir.record.cpu_fingerprint)
        row |= {k[len("cpu/"):]: v for k, v in metrics.items() if k.startswith("cpu/")}
        row |= {k: v for k, v in metrics.items() if k.startswith(("acc_task_", "val_acc_task_"))}
        row |= after_each_task(result.metrics_dataframe, n_tasks)
        rows.append(row)
    rows.sort(key=lambda r: (r["config"] != BASELINE, r["config"], r["seed"]))
    return rows, unfinished


def after_each_task(history: Any, n_tasks: int) -> dict[str, float]:
    """acc_avg and val_acc_avg after each task, from a trial's results (one or more per task)."""
    out = {}
    for t in range(1, n_tasks + 1):
        for key in ("acc_avg", "val_acc_avg"):
            value = math.nan
            if history is not None and key in history:
                at_t = history[history["task"] == t]
                if len(at_t):
                    value = float(at_t[key].iloc[-1])
            out[f"{key}_after_task_{t}"] = value
    return out


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
    print(f"results: {outcome.folder}/{RESULTS_FILE}")
    print(f"paired statistics (t-test, Wilcoxon, Holm) and plots: python -m analysis {outcome.plan.folder.location}")
