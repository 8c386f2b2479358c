"""Running a planned sweep on Ray: connect, check resources, open the MLflow parent run, build the Tuner, fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tune_bir.errors import ConfigError
from tune_bir.sweep.plan import METRIC, MODE, MlflowLocation, SweepOptions, SweepPlan
from tune_bir.sweep.preflight import check_ray_address
from tune_bir.tracking import default_tracking_uri

log = logging.getLogger(__name__)

# The columns of the trial table printed while a sweep runs: what a researcher watches. Every other
# metric goes to the trial folders (result.json, progress.csv) and MLflow.
PROGRESS_METRICS = {"task": "task", "val_acc_avg": "val acc", "acc_avg": "test acc",
                    "forgetting_avg": "forgetting", "time_total_s": "time (s)"}


def prepare_environment() -> None:
    """Process-wide settings of a sweep driver (before Ray is imported)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a checkpoint per task and num_to_keep=2 force a (cheap, local) state snapshot per result: no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray's newer console output prints every metric of every result in a box, which buries the trial
    # table; the classic reporter prints only the table, with the columns we choose (PROGRESS_METRICS)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def connect_ray(options: SweepOptions, trial_resources: tuple[float, float] | None = None) -> bool:
    """Join --address or start a local Ray; True when this call started it (and must shut it down).

    With `trial_resources` (CPUs, GPUs per trial), a local Ray that could never run one trial is refused
    before it starts (a cluster is checked once joined, by `check_resources`).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs = ray_init_kwargs(options)
    if trial_resources is not None and "address" not in kwargs:
        check_local_resources(kwargs["num_cpus"], *trial_resources)
    ray.init(**kwargs)
    return True


def local_gpus() -> int:
    """The GPUs a local Ray started here would have (CUDA_VISIBLE_DEVICES respected, as Ray does)."""
    import torch

    return torch.cuda.device_count()


def check_local_resources(num_cpus: int, cpus: float, gpus: float) -> None:
    """Refuse, before a local Ray starts, per-trial resources this machine does not have (trials would pend)."""
    if cpus > num_cpus:
        raise ConfigError(f"--cpus-per-trial={cpus:g}: the local Ray has {num_cpus} CPUs; lower --cpus-per-trial, "
                          "raise --num-cpus, or join a cluster (--address)")
    if gpus > 0:
        have = local_gpus()
        if gpus > have:
            use = "--gpus-per-trial 0" if have == 0 else f"at most --gpus-per-trial {have}"
            raise ConfigError(f"--gpus-per-trial={gpus:g}: this machine has {have} GPU(s) for a local Ray; use {use}, "
                              "or join a cluster with GPUs (--address)")


def check_parent_run(location: MlflowLocation) -> None:
    """The MLflow parent run a resumed sweep (or a confirmation) logs under still exists; checked before Ray
    starts, and without creating an empty sqlite store where the sweep's one is gone."""
    uri, run_id = location.tracking_uri, location.parent_run_id
    fix = "point MLFLOW_TRACKING_URI or the sweep's store back where the sweep logged, or start a new sweep"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"the sweep's MLflow store {uri} is gone (its parent run {run_id} was there); {fix}")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"the sweep's MLflow parent run {run_id} is not in {uri} ({str(err).splitlines()[0]}); "
                          f"{fix}") from None


def ray_init_kwargs(options: SweepOptions) -> dict[str, Any]:
    """What `connect_ray` passes to `ray.init`: the cluster to join (probed first), or a local Ray whose
    dashboard is off unless --dashboard asks for it, and then listens on 127.0.0.1 only."""
    if options.address:
        if options.dashboard:
            raise ConfigError("--dashboard starts the dashboard of a local Ray; a cluster's dashboard is its head's "
                              "(ray dashboard CLUSTER.yaml, or kubectl port-forward): drop --dashboard or --address")
        if options.num_cpus is not None:
            raise ConfigError("--num-cpus sizes a local Ray; a cluster (--address) has its own CPUs: drop --num-cpus "
                              "or --address")
        check_ray_address(options.address)
        return {"address": options.address}
    kwargs: dict[str, Any] = {"num_cpus": options.num_cpus or os.cpu_count(), "include_dashboard": options.dashboard}
    if options.dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    return kwargs


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


def open_parent_run(plan: SweepPlan) -> MlflowLocation:
    """The sweep's MLflow parent run: created for a new sweep, reopened for --resume."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from tune_bir.sweep.mlflow_callback import ROLE_TAG, SWEEP_TAG, experiment_id

    if plan.mlflow is not None:
        MlflowClient(plan.mlflow.tracking_uri).update_run(plan.mlflow.parent_run_id, status="RUNNING")
        return plan.mlflow
    options = plan.options
    tracking_uri = default_tracking_uri(options.mlflow_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, options.mlflow_experiment)
    run = client.create_run(exp_id, run_name=plan.name, tags={
        SWEEP_TAG: plan.sweep_id, ROLE_TAG: "parent", "space": plan.space.name, "sweep_dir": plan.folder.location})
    settings = {k: getattr(options, k) for k in (
        "space", "num_samples", "max_concurrent", "cpus_per_trial", "gpus_per_trial", "grace_period",
        "reduction_factor", "seeds_per_trial", "share_first_task")}
    settings["n_startup_trials"] = options.startup_trials
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in settings.items()])
    return MlflowLocation(tracking_uri, exp_id, options.mlflow_experiment, run.info.run_id)


def save_to_sweep(plan: SweepPlan, file: str, text: str, artifact_dir: str | None = None) -> None:
    """Write a file into the sweep folder and attach it to the sweep's MLflow parent run."""
    from mlflow.tracking import MlflowClient

    folder = plan.folder if artifact_dir is None else plan.folder.sub(artifact_dir)
    folder.write_text(file, text)
    name = file if artifact_dir is None else f"{artifact_dir}/{file}"
    MlflowClient(plan.mlflow.tracking_uri).log_text(plan.mlflow.parent_run_id, text, name)


def set_parent_status(plan: SweepPlan, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(plan.mlflow.tracking_uri).set_terminated(plan.mlflow.parent_run_id, status=status)


def baseline_keeping_asha(**kwargs: Any):
    """Ray's ASHA, except that the baseline trial always trains every task.

    The baseline is the yardstick every config is compared with: its results still enter each rung
    (so they raise or lower the cutoff as any trial's do), but ASHA's verdict never stops it.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class BaselineKeepingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if (trial.config or {}).get("baseline") and action == TrialScheduler.STOP and not result.get("done"):
                self._num_stopped -= 1   # counted as stopped by ASHA, but it goes on
                return TrialScheduler.CONTINUE
            return action

    return BaselineKeepingASHA(**kwargs)


def progress_reporter(parameter_names: list[str]):
    """The console's trial table: status, the tuned parameters and PROGRESS_METRICS."""
    from ray.tune import CLIReporter

    # no metric: its "current best trial" line looks every parameter up in the best trial's config, and the
    # baseline's config has none of them
    return CLIReporter(metric_columns=PROGRESS_METRICS, parameter_columns=parameter_names,
                       max_progress_rows=30, max_report_frequency=30)


def run_config(name: str, storage_root: str, callbacks: list, max_failures: int, parameter_names: list[str]):
    """The RunConfig every Tuner of the sweep uses: a checkpoint per step, two kept, failures restored."""
    from ray import tune

    return tune.RunConfig(
        name=name, storage_path=storage_root, callbacks=callbacks, verbose=1,
        progress_reporter=progress_reporter(parameter_names),
        checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True, num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=max_failures))


def trainable_with_resources(options: SweepOptions):
    from ray import tune

    from trainables import BIRTrainable

    return tune.with_resources(BIRTrainable, {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})


def new_tuner(plan: SweepPlan):
    """The Tuner of a new sweep: Optuna's TPE (baseline first) under a concurrency limit, ASHA, MLflow."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from trainables.bir import SCHEDULER_METRIC
    from tune_bir.sweep.mlflow_callback import MlflowSweepCallback
    from tune_bir.sweep.plan import optuna_storage
    from tune_bir.sweep.search import TruthfulOptunaSearch

    o = plan.options
    sampler = optuna.samplers.TPESampler(seed=plan.resolved.seed, n_startup_trials=o.startup_trials)
    # the study lives in a database (optuna-dashboard reads it as trials finish), not only in Ray's searcher state
    storage = optuna_storage(plan.optuna_storage) if plan.optuna_storage else None
    searcher = TruthfulOptunaSearch(plan.space, metric=METRIC, mode=MODE, n_tasks=plan.n_tasks, sampler=sampler,
                                    storage=storage, study_name=plan.study_name)
    searcher.enqueue_baseline()
    scheduler = baseline_keeping_asha(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode=MODE,
                                      max_t=plan.max_t, grace_period=plan.grace_t, reduction_factor=o.reduction_factor)
    callback = MlflowSweepCallback(plan.mlflow, plan.sweep_id, plan.n_tasks)
    return tune.Tuner(
        trainable_with_resources(o),
        param_space={**plan.trial_base, "seeds_per_trial": o.seeds_per_trial, "share_first_task": o.share_first_task},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=o.max_concurrent),
            scheduler=scheduler, num_samples=o.num_samples, reuse_actors=True,
            time_budget_s=o.time_budget, trial_dirname_creator=trial_dirname),
        run_config=run_config(plan.name, plan.folder.root, [callback], o.max_failures, plan.space.param_names))


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Ray's default spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def restored_tuner(location: str, options: SweepOptions, resume_errored: bool = False):
    """The Tuner of an interrupted sweep (or confirmation) at `location`, to continue where it stopped
    (`resume_errored`: errored trials too, from their last checkpoint)."""
    from ray import tune

    if not tune.Tuner.can_restore(location):
        raise ConfigError(f"{location} holds no Ray Tune experiment state to resume (it never started)")
    return tune.Tuner.restore(location, trainable=trainable_with_resources(options), resume_unfinished=True,
                              resume_errored=resume_errored)


def search_alg(tuner: Any) -> Any:
    """The TruthfulOptunaSearch behind a Tuner's ConcurrencyLimiter (for tests and inspection)."""
    search = tuner._local_tuner._tune_config.search_alg   # no public accessor
    return getattr(search, "searcher", search)
