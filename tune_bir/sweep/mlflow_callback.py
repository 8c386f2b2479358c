"""MLflow logging of a sweep: one parent run per sweep, one child run per trial, one call per result.

Ray's stock `MLflowLoggerCallback` makes one blocking call per metric key (~0.5 s per result on
sqlite), cannot tell a completed trial from one ASHA stopped, and opens a second run for every
trial of a resumed sweep (docs/ray-optuna-mlflow.md "MLflow"). `MlflowSweepCallback` runs on the driver, logs each
per-task result with ONE `MlflowClient.log_batch`, tags every run with `trial_status`, and finds
its runs again by the sweep id and the Tune trial id, so a resumed sweep continues them.

Run layout: parent tags `tune_bir.sweep_id`, `tune_bir.role=parent`; child tags
`tune_bir.sweep_id`, `trial_id`, `trial_name`, `mlflow.parentRunId`, `trial_status`, and
`tune_bir.last_task` (the last task whose metrics were logged, so nothing is logged twice).
Params are the resolved config fields under their BIRConfig names, plus the trial options
(`seeds_per_trial`, `baseline`, `share_first_task`) and, from the trial's first result, the CPU that computes it
(`cpu/<field>` for each of `tune_bir.record.FINGERPRINT_FIELDS`, as the result names them; a trial restored on
another kind of CPU keeps the first ones and gets the tag `cpu_fingerprint_changed`, the fields that differ);
metrics are logged at step = task (tasks finished).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from trainables.bir import TRIAL_OPTIONS, split_config
from tune_bir.config import BIRConfig
from tune_bir.record import CPU_PREFIX, FINGERPRINT_FIELDS
from tune_bir.sweep.plan import MlflowLocation
from tune_bir.sweep.status import COMPLETED, ERRORED, STOPPED_EARLY, trial_status

log = logging.getLogger(__name__)

SWEEP_TAG = "tune_bir.sweep_id"
ROLE_TAG = "tune_bir.role"
LAST_TASK_TAG = "tune_bir.last_task"
PARENT_TAG = "mlflow.parentRunId"
# Tune's own bookkeeping is left out, except the trial's wall time so far (time_total_s), which MLflow
# readers need (analysis.load_mlflow) and which is Tune's to measure
_SKIP_KEYS = (set(AUTO_RESULT_KEYS) - {"time_total_s"}) | {"done", "diverged", "trial_id", "experiment_id",
                                                           "experiment_tag", "should_checkpoint"}
_RUN_STATUS = {COMPLETED: "FINISHED", STOPPED_EARLY: "FINISHED"}   # diverged / errored -> FAILED
_MAX_PARAMS_PER_BATCH = 100
# MLflow 3 keeps an experiment's kind in this tag (its UI and demo write it; custom_model_development = model
# training). MLflow 3.17's UI no longer reads it: it opens every experiment on the view of its GenAI / Model
# training switch, which the `workflowType` URL parameter sets (default: GenAI, whose overview hides the runs),
# so the sweep sets the tag for the clients that read it and prints its experiment's address with the parameter
# (docs/ray-optuna-mlflow.md "MLflow")
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs in `mlflow ui`, in the model-training view."""
    return f"{ui}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the MLflow experiment `name`, created when missing; marked as a model-training experiment unless a
    kind was chosen for it already."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a Tune result (docs/sweep.md "Result keys"), Tune's bookkeeping and worker diagnostics
    left out."""
    return {k: float(v) for k, v in result.items()
            if k not in _SKIP_KEYS and not k.startswith(("worker/", CPU_PREFIX))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """Labels a driver put into a trial's config under `__<name>` (e.g. a confirmation's config and seed):
    the trainable ignores them, MLflow gets them as tags."""
    return {k[2:]: str(v) for k, v in config.items() if k.startswith("__") and not k.startswith("___")}


def trial_params(resolved: BIRConfig, config: dict[str, Any]) -> dict[str, str]:
    """MLflow params of a trial: every resolved config field plus the trial options."""
    options = split_config(config)[1]
    values = resolved.to_dict() | {k: options[k] for k in TRIAL_OPTIONS}
    return {k: str(v) for k, v in values.items()}


class MlflowSweepCallback(Callback):
    """Tune callback (driver side) writing each trial of one sweep to MLflow."""

    def __init__(self, location: MlflowLocation, sweep_id: str, n_tasks: int):
        self.tracking_uri = location.tracking_uri
        self.experiment_id = location.experiment_id
        self.parent_run_id = location.parent_run_id
        self.sweep_id = sweep_id
        self.n_tasks = n_tasks
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}          # Tune trial id -> MLflow run id
        self._last_task: dict[str, int] = {}     # Tune trial id -> last task logged
        self._ended: set[str] = set()
        self._resolved: dict[str, BIRConfig] = {}   # Tune trial id -> its resolved config (once per trial)
        self._fingerprinted: set[str] = set()        # Tune trial ids whose CPU fingerprint is logged

    # the client and the caches are rebuilt after Tune unpickles the callback on --resume
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _last_task={}, _ended=set(), _resolved={}, _fingerprinted=set())
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
            self._find_existing_runs()
        return self._client

    def _find_existing_runs(self) -> None:
        token = None
        while True:
            page = self._client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{self.sweep_id}'",
                max_results=1000, page_token=token)
            for run in page:
                trial_id = run.data.tags.get("trial_id")
                if trial_id:
                    self._runs[trial_id] = run.info.run_id
                    self._last_task[trial_id] = int(run.data.tags.get(LAST_TASK_TAG, 0))
                    if run.info.status != "RUNNING":
                        self._ended.add(trial_id)
            token = page.token
            if not token:
                break

    def setup(self, **info: Any) -> None:
        _ = self.client

    def resolved(self, trial: Any) -> BIRConfig:
        if trial.trial_id not in self._resolved:
            self._resolved[trial.trial_id] = split_config(trial.config)[0].resolved()
        return self._resolved[trial.trial_id]

    def _run_id(self, trial: Any) -> str:
        client = self.client
        trial_id = trial.trial_id
        if trial_id in self._runs:
            if trial_id in self._ended:   # resumed or restored after it was closed
                client.update_run(self._runs[trial_id], status="RUNNING")
                self._ended.discard(trial_id)
            return self._runs[trial_id]
        run = client.create_run(self.experiment_id, run_name=str(trial), tags={
            SWEEP_TAG: self.sweep_id, PARENT_TAG: self.parent_run_id, "trial_id": trial_id,
            "trial_name": str(trial), LAST_TASK_TAG: "0", **trial_tags(trial.config)})
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in trial_params(self.resolved(trial), trial.config).items()]
        for i in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + _MAX_PARAMS_PER_BATCH])
        self._runs[trial_id] = run_id
        self._last_task[trial_id] = 0
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def _log_fingerprint(self, trial: Any, result: dict) -> None:
        """The trial's CPU fingerprint as params, once; MLflow params cannot change, so a trial restored on
        another kind of CPU (a mixed cluster) keeps its first one and is tagged."""
        keys = [CPU_PREFIX + k for k in FINGERPRINT_FIELDS]
        if trial.trial_id in self._fingerprinted or not all(k in result for k in keys):
            return
        run_id = self._run_id(trial)
        logged = self.client.get_run(run_id).data.params
        fingerprint = {k: str(result[k]) for k in keys}
        new = [Param(k, v) for k, v in fingerprint.items() if k not in logged]
        changed = [k for k, v in fingerprint.items() if k in logged and logged[k] != v]
        self.client.log_batch(run_id, params=new,
                              tags=[RunTag("cpu_fingerprint_changed", ",".join(changed))] if changed else [])
        self._fingerprinted.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._log_fingerprint(trial, result)
        task = int(result.get("task", 0))
        ends_task = result.get("iters_done", -1) == task * self.resolved(trial).iters
        if ends_task:
            step = task
        elif result.get("diverged"):
            step = task + 1          # it diverged while training the next task
        else:
            return                   # a segment inside a task: metrics are logged per task
        if step <= self._last_task.get(trial.trial_id, 0):
            return                   # already logged before the trial was restored from a checkpoint
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in result_metrics(result).items()]
        self.client.log_batch(self._run_id(trial), metrics=metrics, tags=[RunTag(LAST_TASK_TAG, str(step))])
        self._last_task[trial.trial_id] = step

    def _end(self, trial: Any, status: str) -> None:
        run_id = self._run_id(trial)
        self.client.log_batch(run_id, tags=[RunTag("trial_status", status)])
        self.client.set_terminated(run_id, status=_RUN_STATUS.get(status, "FAILED"))
        self._ended.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, trial_status(trial.last_result, False, self.n_tasks))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, ERRORED)
