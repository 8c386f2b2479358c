"""A batch of (config, seed) runs as Ray Tune trials: what a confirmation asks the sweep layer to run.

Each (config, seed) is one trial that trains every task with no early stopping, an MLflow child of a
given parent run, tagged with its config label and seed. A batch is one Tune experiment in a folder of
its own (e.g. `look-2/` of a sequential confirmation), so an interrupted batch resumes where it stopped
and a finished one is read back without running anything again. The caller connects Ray
(`run.connect_ray`); this module knows nothing of plans, ledgers or verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tune_bir.config import BIRConfig
from tune_bir.record import result_fingerprint
from tune_bir.sweep.plan import MlflowLocation, SweepOptions
from tune_bir.sweep.run import restored_tuner, run_config, trainable_with_resources, trial_dirname
from tune_bir.sweep.status import trial_status
from tune_bir.sweep.storage import SweepFolder
from tune_bir.sweep.summary import saved_statuses

BASELINE = "baseline"   # the label of the configs' yardstick: every exaggeration term off
# keys of a trial's config that label it for MLflow (tags) and for the results table; the trainable ignores them
CONFIG_KEY, SEED_KEY = "__confirm_config", "__confirm_seed"
# final metrics kept per (config, seed), besides the per-task accuracies and the accuracy after each task
FINAL_METRICS = ("acc_avg", "forgetting_avg", "bwt", "val_acc_avg", "val_forgetting_avg", "time_total_s")


def batch_points(configs: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One Tune config per (seed, config), seed-major (the configs of a seed share its task 1 on a node).

    `configs` maps a label to the whole trial config (base config and the config's own values); every point
    sets every key any point sets, a key another config sets taking its default (Tune's preset points may
    only set keys of the param space).
    """
    points = [{**config, "seed": int(seed), "seeds_per_trial": 1, CONFIG_KEY: label, SEED_KEY: int(seed)}
              for seed in seeds for label, config in configs.items()]
    defaults = BIRConfig().to_dict()   # a field another config sets takes its default (its term is off)
    keys = dict.fromkeys(k for point in points for k in point)
    return [{k: point.get(k, defaults.get(k)) for k in keys} for point in points]


def run_batch(parent: SweepFolder, name: str, points: list[dict[str, Any]], options: SweepOptions,
              mlflow: MlflowLocation, group_id: str, n_tasks: int) -> tuple[list[dict[str, Any]], bool]:
    """Run (or resume, or read back) the batch `parent/name`; its rows and whether some run is unfinished.

    `options` gives the per-trial resources, concurrency and failure retries; `group_id` is the MLflow
    sweep id its child runs carry (the callback finds them again by it on resume).
    """
    from ray import tune

    folder = parent.sub(name)
    if tune.Tuner.can_restore(folder.location):
        # errored trials are retried too: a batch is decided only when every one of its runs completed
        tuner = restored_tuner(folder.location, options, resume_errored=True)
    else:
        tuner = batch_tuner(parent, name, points, options, mlflow, group_id, n_tasks)
    grid = tuner.fit()
    rows, unfinished = confirmation_rows(grid, folder, n_tasks)
    return rows, unfinished or len(rows) < len(points)


def batch_tuner(parent: SweepFolder, name: str, points: list[dict[str, Any]], options: SweepOptions,
                mlflow: MlflowLocation, group_id: str, n_tasks: int):
    """A new Tuner running `points` in `parent/name`: no scheduler, `options.max_concurrent` at a time."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune_bir.sweep.mlflow_callback import MlflowSweepCallback

    callback = MlflowSweepCallback(mlflow, group_id, n_tasks)
    return tune.Tuner(
        trainable_with_resources(options),
        param_space=dict(points[0]),   # every point sets the same keys; the points override it
        tune_config=tune.TuneConfig(
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=options.max_concurrent),
            num_samples=len(points), reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=run_config(name, parent.location, [callback], options.max_failures, [CONFIG_KEY, SEED_KEY]))


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
        row |= result_fingerprint(metrics)
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
