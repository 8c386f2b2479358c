"""How much ASHA saves, and what Ray costs per trial, measured in one run.

The same N configs (the baseline plus N-1 drawn from a search space with a seeded sampler) are
trained twice on a local Ray: once under ASHA with the sweep's settings and once each to the full
budget. Printed: the ratio of segments trained (ASHA / full; the ASHA run also shares task 1 between
trials, as sweeps do by default, and the ratio is given with and without that), the best `val_acc_avg` of each run
among trials that trained every task, the test `acc_avg` of both winners, and Ray's overhead per
trial = wall time of the trial (driver side, from start to completion) minus the time spent inside
`step()`, i.e. actor start or reuse, setup, checkpoints and scheduling.

    python benchmarks/sweep_efficiency.py                   # 64 configs, 200 iterations per task (~25 min)
    python benchmarks/sweep_efficiency.py --num-configs 8 --iters 1000   # trials of a minute or more

With few configs the ratio stays well above ASHA's asymptote (the first trials at a rung pass for
want of rivals): measure it with a sweep's worth of configs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from search_spaces import EXAGGERATION_OFF, load_space
from trainables import BIRTrainable
from trainables.bir import SCHEDULER_METRIC
from trainables.node_cache import CACHE_DIR_ENV
from tune_bir.config import BIRConfig
from tune_bir.sweep.plan import METRIC, MODE, SWEEP_BASE, build_parser
from tune_bir.sweep.run import baseline_keeping_asha
from tune_bir.sweep.status import rank_trials, status_counts, trial_status


class TrialClock(tune.Callback):
    """Driver-side wall time of each trial, from its start to its completion."""

    def __init__(self):
        self.began = 0.0
        self.started: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def setup(self, **info):
        self.began = time.perf_counter()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.perf_counter())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.wall[trial.trial_id] = time.perf_counter() - self.started[trial.trial_id]


def sample_configs(space_name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The baseline, then n-1 configs of the space drawn with a seeded random sampler."""
    space = load_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = [{**EXAGGERATION_OFF, "baseline": True}]
    drawn += [{**space.sample(study.ask()), "baseline": False} for _ in range(n - 1)]
    return drawn


def rung_milestones(grace: int, rf: float, max_t: int) -> list[int]:
    """ASHA's rungs in segments, as Ray's ASHAScheduler places them (grace * rf^k below max_t)."""
    n_rungs = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [int(grace * rf**k) for k in range(n_rungs)]


def asymptotic_ratio(grace: int, rf: float, max_t: int) -> float:
    """Segments trained under ASHA / full budget when exactly 1/rf of the trials pass each rung (N -> inf).

    With few trials the ratio is higher: the first trials to reach a rung have no rivals yet and pass.
    """
    rungs = rung_milestones(grace, rf, max_t)
    ends = rungs[1:] + [max_t]
    stages = enumerate(zip(rungs, ends, strict=True))   # a share 1/rf^(k+1) trains on from rung k
    per_trial = rungs[0] + sum((end - start) / rf ** (k + 1) for k, (start, end) in stages)
    return per_trial / max_t


def run(label: str, base: dict[str, Any], configs: list[dict[str, Any]], scheduler: Any, args: argparse.Namespace,
        n_tasks: int, storage: str) -> dict[str, Any]:
    clock = TrialClock()
    # preset points may only set keys the param space has: every key any config sets, at its default
    defaults = BIRConfig().to_dict() | {"baseline": False}
    placeholders = {k: defaults[k] for config in configs for k in config if k not in base}
    tuner = tune.Tuner(
        tune.with_resources(BIRTrainable, {"cpu": 1}),
        param_space={**placeholders, **base},
        tune_config=tune.TuneConfig(
            search_alg=BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=args.max_concurrent),
            scheduler=scheduler, num_samples=len(configs), reuse_actors=True),
        run_config=tune.RunConfig(name=label, storage_path=storage, callbacks=[clock], verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1,
                                                                          checkpoint_at_end=True, num_to_keep=2)))
    start = time.perf_counter()
    grid = tuner.fit()
    elapsed = time.perf_counter() - start
    rows, overheads, step_time = [], [], 0.0
    for result in grid:
        metrics = result.metrics
        steps = result.metrics_dataframe
        inside = float(steps["time_this_step_s"].sum())
        step_time += inside
        # Tune reports a trial started once its actor is up and setup (or reset) is done: add that back
        wall = clock.wall[metrics["trial_id"]] + float(steps["worker/setup_s"].iloc[0])
        overheads.append((wall - inside, wall))
        rows.append({"status": trial_status(metrics, result.error is not None, n_tasks),
                     "segments": int(metrics["training_iteration"]),
                     # only trials that share task 1 report first_task_shared (1.0 where they adopted it)
                     "shared": int(steps["first_task_shared"].sum()) if "first_task_shared" in steps else 0,
                     "val_acc_avg": metrics.get(METRIC),
                     "acc_avg": metrics.get("acc_avg"), "baseline": bool(result.config.get("baseline"))})
    ranked = rank_trials(rows)
    return {"rows": rows, "best": ranked[0] if ranked else None, "overheads": overheads, "elapsed": elapsed,
            "segments": sum(r["segments"] for r in rows), "shared": sum(r["shared"] for r in rows),
            "first_start": min(clock.started.values()) - clock.began,
            "busy": step_time / (elapsed * args.max_concurrent)}


def main() -> int:
    sweep_defaults = build_parser().parse_args([])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-configs", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200, help="iterations per task")
    parser.add_argument("--space", default="repulsion")
    parser.add_argument("--grace-period", type=int, default=sweep_defaults.grace_period, help="tasks")
    parser.add_argument("--reduction-factor", type=float, default=sweep_defaults.reduction_factor)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage-path", default="/tmp/tune_bir-sweep-efficiency")
    args = parser.parse_args()

    # preset configs set keys that the param space holds at their defaults: Tune warns for each, harmlessly
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a fresh node cache (the Ray workers inherit it): task-1 learners of earlier runs must not be adopted
    os.environ[CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="tune_bir-bench-cache-")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    base = {**SWEEP_BASE, "iters": args.iters, "seed": args.seed, "device": "cpu"}
    n_tasks = BIRConfig.from_dict(base).resolved().tasks
    configs = sample_configs(args.space, args.num_configs, args.seed)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    storage = os.path.abspath(args.storage_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    asha = baseline_keeping_asha(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode=MODE, max_t=n_tasks,
                                 grace_period=args.grace_period, reduction_factor=args.reduction_factor)
    early = run(f"asha-{stamp}", base | {"share_first_task": True}, configs, asha, args, n_tasks, storage)
    full = run(f"full-{stamp}", base | {"share_first_task": False}, configs, FIFOScheduler(), args, n_tasks, storage)
    ray.shutdown()

    print(f"{len(configs)} configs of space '{args.space}' (baseline first), {args.iters} iterations per task, "
          f"{n_tasks} tasks, {args.max_concurrent} trials at a time on {args.num_cpus} CPUs")
    grace, rf = args.grace_period, args.reduction_factor
    print(f"ASHA on {SCHEDULER_METRIC}: grace period {grace} tasks, reduction factor {rf:g}; rungs after tasks "
          f"{rung_milestones(grace, rf, n_tasks)} of {n_tasks}: with many configs the ratio tends to "
          f"{asymptotic_ratio(grace, rf, n_tasks):.3f} (ASHA alone), "
          f"{asymptotic_ratio(grace, rf, n_tasks) - 1 / n_tasks:.3f} (task 1 trained once and shared)")
    ratio = early["segments"] / full["segments"]
    trained = early["segments"] - early["shared"]
    print(f"segments stepped: ASHA {early['segments']} / full {full['segments']} = {ratio:.3f} (ASHA alone); "
          f"of ASHA's, {early['shared']} adopted task 1 from another trial: trained {trained} / {full['segments']} "
          f"= {trained / full['segments']:.3f} (ASHA + shared task 1)")
    print(f"wall time: ASHA {early['elapsed']:.0f} s / full {full['elapsed']:.0f} s "
          f"= {early['elapsed'] / full['elapsed']:.3f}")
    for name, outcome in (("ASHA", early), ("full", full)):
        best = outcome["best"]
        statuses = status_counts(outcome["rows"])
        if best is None:
            print(f"{name}: no trial trained every task ({statuses})")
            continue
        print(f"{name}: best val_acc_avg {best['val_acc_avg']:.4f}, its test acc_avg {best['acc_avg']:.4f}"
              f"{' (the baseline)' if best['baseline'] else ''}; {statuses}")
    if early["best"] and full["best"]:
        gap = 100 * (full["best"]["val_acc_avg"] - early["best"]["val_acc_avg"])
        print(f"winner gap (full - ASHA): {gap:.2f} points val_acc_avg, "
              f"{100 * (full['best']['acc_avg'] - early['best']['acc_avg']):.2f} points test acc_avg")
    for name, outcome in (("ASHA", early), ("full", full)):
        over = outcome["overheads"]
        long = [(o, w) for o, w in over if w >= 60]
        print(f"Ray overhead per trial ({name}): mean {statistics.mean(o for o, _ in over):.2f} s over "
              f"{len(over)} trials; mean wall {statistics.mean(w for _, w in over):.1f} s"
              + (f"; trials of a minute or more: {100 * sum(o for o, _ in long) / sum(w for _, w in long):.1f} % "
                 f"of their wall time ({len(long)} trials)" if long else ""))
        print(f"  whole run ({name}): first trials running {outcome['first_start']:.1f} s after the start (new "
              f"actors: process, imports, setup); time inside step() = {100 * outcome['busy']:.0f} % of "
              f"{args.max_concurrent} slots x {outcome['elapsed']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
