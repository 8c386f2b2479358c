"""One table per sweep, one row per trial, read from the sweep folder or from MLflow.

`load_sweep(SWEEP)` reads what Ray Tune and `tune_bir.sweep` wrote into the sweep folder (a local
path or a storage URI); `load_mlflow(uri, sweep)` reads the sweep's MLflow runs. Both reduce each trial
to the same per-task records the sweep's MLflow callback logs (one record per task finished, plus one
for the task a trial diverged in), so both give the same DataFrame for the same sweep:

    trial_id, trial_name, trial_status, baseline, tasks_reached, <each tuned parameter>,
    val_acc_avg, acc_avg, forgetting_avg, bwt, time_total_s,
    val_acc_avg_after_task_1..T, acc_avg_after_task_1..T

A tuned parameter is NaN (None for a choice) where the trial did not sample it: in the baseline
(it samples nothing: every exaggeration is off) and for a conditional parameter whose `when` does
not hold. Final metrics are those after the last task a trial reached; a trial that diverged has NaN
final metrics. `time_total_s` is the trial's wall time in seconds at its last record (Tune's clock,
which the MLflow callback logs too). `trial_status` is one of tune_bir.sweep.status.STATUSES, or
`unfinished` for a trial of an interrupted sweep that has no recorded status. The sweep's plan
(sweep.json) is in `df.attrs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from tune_bir.errors import ConfigError
from tune_bir.sweep.status import STATUSES
from tune_bir.sweep.storage import RESULTS_FILE, SWEEP_FILE, SweepFolder

UNFINISHED = "unfinished"
ALL_STATUSES = (*STATUSES, UNFINISHED)
FINAL_METRICS = ("val_acc_avg", "acc_avg", "forgetting_avg", "bwt")
PER_TASK_METRICS = ("val_acc_avg", "acc_avg")
# the per-task record keys a row is built from (what the MLflow callback logs at step = task)
RECORD_KEYS = (*FINAL_METRICS, "time_total_s", "iters_done", "task")
RESULT_FILE, PARAMS_FILE = "result.json", "params.json"
PARENT_TAG, SWEEP_TAG, ROLE_TAG = "mlflow.parentRunId", "tune_bir.sweep_id", "tune_bir.role"


# ---------------------------------------------------------------------------------------------
# the plan and its parameters
def param_specs(plan: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The space's tuned parameters: name -> {distribution, low, high, choices, when}."""
    return dict(plan["space"]["params"])


def n_tasks(plan: Mapping[str, Any]) -> int:
    return int(plan["resolved_base_config"]["tasks"])


def is_log(spec: Mapping[str, Any]) -> bool:
    return spec["distribution"] in ("loguniform", "logint")


def _typed(value: Any, spec: Mapping[str, Any]) -> Any:
    """A parameter value (JSON value or MLflow's string) as the space's type; None when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value in ("None", ""):
        return None
    kind = spec["distribution"]
    if kind == "choice":
        for choice in spec["choices"]:
            if value == choice or str(value) == str(choice):
                return choice
        return value
    if kind in ("int", "logint"):
        return int(float(value))
    return float(value)


def typed_params(raw: Mapping[str, Any], plan: Mapping[str, Any], baseline: bool) -> dict[str, Any]:
    """The tuned parameters of one trial, typed; None where the trial did not sample them."""
    specs = param_specs(plan)
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        value = None if baseline else _typed(raw.get(name), spec)
        if any(values.get(k) != v for k, v in (spec.get("when") or {}).items()):
            value = None                       # conditional parameter whose condition does not hold
        values[name] = value
    return values


# ---------------------------------------------------------------------------------------------
# per-task records -> one row
def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trial_row(*, trial_id: str, trial_name: str, status: str, baseline: bool, params: Mapping[str, Any],
              records: Mapping[int, Mapping[str, Any]], plan: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from a trial's per-task records ({task: {metric: value}}, as MLflow steps)."""
    tasks = n_tasks(plan)
    finished = sorted(t for t, r in records.items() if math.isfinite(_number(r.get("val_acc_avg"))))
    reached = finished[-1] if finished else 0
    last = records[max(records)] if records else {}
    row: dict[str, Any] = {"trial_id": trial_id, "trial_name": trial_name, "trial_status": status,
                           "baseline": bool(baseline), "tasks_reached": reached}
    row |= typed_params(params, plan, baseline)
    row |= {k: _number(last.get(k)) for k in FINAL_METRICS}
    # the trial's wall time (Tune's clock, restored trials included) at its last per-task record
    row["time_total_s"] = _number(last.get("time_total_s"))
    for metric in PER_TASK_METRICS:
        for t in range(1, tasks + 1):
            row[f"{metric}_after_task_{t}"] = _number(records.get(t, {}).get(metric))
    return row


def columns(plan: Mapping[str, Any]) -> list[str]:
    tasks = n_tasks(plan)
    return (["trial_id", "trial_name", "trial_status", "baseline", "tasks_reached", *param_specs(plan),
             *FINAL_METRICS, "time_total_s"]
            + [f"{m}_after_task_{t}" for m in PER_TASK_METRICS for t in range(1, tasks + 1)])


def build_table(rows: Iterable[dict[str, Any]], plan: Mapping[str, Any]) -> pd.DataFrame:
    """The trial table with its column types fixed (so both sources give identical frames)."""
    specs = param_specs(plan)
    table = pd.DataFrame(list(rows), columns=columns(plan))
    table = table.sort_values("trial_id", kind="stable").reset_index(drop=True)
    for name, spec in specs.items():
        if spec["distribution"] == "choice":
            table[name] = table[name].astype(object).where(table[name].notna(), None)
        elif spec["distribution"] in ("int", "logint"):
            table[name] = table[name].astype("Int64")
        else:
            table[name] = table[name].astype(float)
    table["baseline"] = table["baseline"].astype(bool)
    table["tasks_reached"] = table["tasks_reached"].astype(int)
    for column in ("trial_id", "trial_name", "trial_status"):
        table[column] = table[column].astype(str)
    numeric = [c for c in table.columns if c in (*FINAL_METRICS, "time_total_s") or "_after_task_" in c]
    table[numeric] = table[numeric].astype(float)
    table.attrs["plan"] = dict(plan)
    return table


# ---------------------------------------------------------------------------------------------
# the sweep folder
def _fs(location: str):
    """(pyarrow filesystem, path) of a local path or a storage URI."""
    import pyarrow.fs

    try:
        if "://" not in location:
            return pyarrow.fs.LocalFileSystem(), location
        return pyarrow.fs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot use {location}: {err}") from err


def _read(fs: Any, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def records_from_results(results: Iterable[Mapping[str, Any]], iters: int) -> dict[int, dict[str, Any]]:
    """Ray Tune results -> the per-task records the MLflow callback logs (first record per task wins)."""
    records: dict[int, dict[str, Any]] = {}
    for result in results:
        task = int(result.get("task", 0))
        if result.get("iters_done", -1) == task * iters:
            step = task
        elif result.get("diverged"):
            step = task + 1
        else:
            continue
        if step <= max(records, default=0):
            continue
        records[step] = {k: result[k] for k in RECORD_KEYS if k in result}
    return records


def _statuses_from_results_csv(text: str) -> dict[str, str]:
    import io

    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    if "trial_id" not in table.columns or "status" not in table.columns:
        return {}
    return dict(zip(table["trial_id"], table["status"], strict=True))


def open_sweep(location: str) -> tuple[SweepFolder, dict[str, Any]]:
    """The sweep folder at `location` and its plan; ConfigError when it is no sweep folder."""
    folder = SweepFolder.of(str(location))
    fs, path = _fs(folder.location)
    import pyarrow.fs

    try:
        kind = fs.get_file_info(path).type
    except OSError as err:
        raise ConfigError(f"cannot read {folder}: {err}") from err
    if kind == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"sweep folder {folder} does not exist; give the folder a sweep wrote "
                          "(<storage-path>/<name>, e.g. ray_results/NAME)")
    if kind != pyarrow.fs.FileType.Directory:
        raise ConfigError(f"{folder} is a file, not a sweep folder; give the folder a sweep wrote "
                          "(<storage-path>/<name>, e.g. ray_results/NAME)")
    if not folder.exists(SWEEP_FILE):
        raise ConfigError(f"{folder} is not a sweep folder (no {SWEEP_FILE}); give the folder a sweep wrote "
                          "(<storage-path>/<name>)")
    try:
        plan = json.loads(folder.read_text(SWEEP_FILE))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{folder}/{SWEEP_FILE} is not valid JSON ({err.msg}, line {err.lineno}): the sweep folder "
                          "is damaged; give the folder of a sweep that tune_bir.sweep wrote") from err
    except OSError as err:
        raise ConfigError(f"cannot read {folder}/{SWEEP_FILE}: {err}") from err
    missing = _missing_plan_keys(plan)
    if missing:
        raise ConfigError(f"{folder}/{SWEEP_FILE} is not one tune_bir.sweep wrote (it lacks {missing}); give the "
                          "folder of a sweep that tune_bir.sweep wrote")
    return folder, plan


def _missing_plan_keys(plan: Any) -> str | None:
    """The first key of sweep.json the table needs and `plan` lacks (None when it has them all)."""
    needed = {"name": (), "space": ("name", "params"), "resolved_base_config": ("tasks", "iters")}
    if not isinstance(plan, dict):
        return "a JSON object"
    for key, inner in needed.items():
        if key not in plan:
            return repr(key)
        for sub in inner:
            if not isinstance(plan[key], dict) or sub not in plan[key]:
                return f"{key}.{sub}"
    return None


def load_sweep(location: str) -> pd.DataFrame:
    """The trial table of the sweep folder `location` (`<storage-path>/<name>`, a path or a URI)."""
    import pyarrow.fs

    folder, plan = open_sweep(location)
    fs, path = _fs(folder.location)
    statuses = _statuses_from_results_csv(folder.read_text(RESULTS_FILE)) if folder.exists(RESULTS_FILE) else {}
    iters = int(plan["resolved_base_config"]["iters"])
    rows = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        params_path = f"{info.path}/{PARAMS_FILE}"
        if fs.get_file_info(params_path).type != pyarrow.fs.FileType.File:
            continue
        config = json.loads(_read(fs, params_path))
        result_path = f"{info.path}/{RESULT_FILE}"
        results = []
        if fs.get_file_info(result_path).type == pyarrow.fs.FileType.File:
            results = [json.loads(line) for line in _read(fs, result_path).splitlines() if line.strip()]
        trial_id = _trial_id(info.base_name, results)
        rows.append(trial_row(trial_id=trial_id, trial_name=info.base_name,
                              status=statuses.get(trial_id, UNFINISHED), baseline=bool(config.get("baseline")),
                              params=config, records=records_from_results(results, iters), plan=plan))
    return build_table(rows, plan)


def _trial_id(folder_name: str, results: list[dict[str, Any]]) -> str:
    for result in results:
        if result.get("trial_id"):
            return str(result["trial_id"])
    return folder_name.rsplit("_", 1)[-1]     # trial folders are <trainable>_<trial_id>


# ---------------------------------------------------------------------------------------------
# MLflow
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def find_parent_run(tracking_uri: str, sweep: str):
    """The parent run of sweep `sweep` (its name or its parent run id); ConfigError when there is none."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if len(sweep) == 32 and all(c in "0123456789abcdef" for c in sweep):
            try:
                run = client.get_run(sweep)
                if run.data.tags.get(ROLE_TAG) == "parent":
                    return run
            except MlflowException:
                pass
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1000)
    except MlflowException as err:
        raise ConfigError(f"cannot read MLflow at {tracking_uri}: {str(err).splitlines()[0]}") from err
    matching = [r for r in runs if r.info.run_name == sweep]
    if not matching:
        names = sorted({r.info.run_name for r in runs})
        known = f"known sweeps: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else \
            "it holds no sweep"
        raise ConfigError(f"no sweep named {sweep!r} in MLflow at {tracking_uri} ({known}); "
                          "give --sweep a sweep name or its parent run id")
    if len(matching) > 1:
        ids = ", ".join(r.info.run_id for r in matching)
        raise ConfigError(f"{len(matching)} sweeps are named {sweep!r} in MLflow at {tracking_uri}; "
                          f"give --sweep the parent run id of one of them ({ids})")
    return matching[0]


def plan_of_run(tracking_uri: str, run: Any) -> dict[str, Any]:
    """The sweep.json the sweep attached to its parent run."""
    import tempfile
    from pathlib import Path

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = _client(tracking_uri).download_artifacts(run.info.run_id, SWEEP_FILE, tmp)
            return json.loads(Path(local).read_text())
    except Exception as err:   # MLflow raises several kinds for a missing artifact
        raise ConfigError(f"the sweep's parent run {run.info.run_id} has no readable {SWEEP_FILE} "
                          f"artifact: {err}") from err


def _child_runs(client: Any, run: Any) -> list:
    found, token = [], None
    while True:
        page = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'",
                                  max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _records_from_history(client: Any, run: Any) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    for key in RECORD_KEYS:
        if key not in run.data.metrics:
            continue
        for metric in client.get_metric_history(run.info.run_id, key):
            records.setdefault(int(metric.step), {}).setdefault(key, metric.value)
    return records


def load_mlflow(tracking_uri: str, sweep: str) -> pd.DataFrame:
    """The trial table of sweep `sweep` (name or parent run id) from MLflow at `tracking_uri`."""
    from mlflow.exceptions import MlflowException

    parent = find_parent_run(tracking_uri, sweep)
    plan = plan_of_run(tracking_uri, parent)
    client = _client(tracking_uri)
    try:
        rows = []
        for run in _child_runs(client, parent):
            tags, params = run.data.tags, run.data.params
            rows.append(trial_row(trial_id=tags.get("trial_id", run.info.run_id),
                                  trial_name=tags.get("trial_name", run.info.run_name),
                                  status=tags.get("trial_status", UNFINISHED),
                                  baseline=params.get("baseline") == "True", params=params,
                                  records=_records_from_history(client, run), plan=plan))
    except MlflowException as err:
        raise ConfigError(f"cannot read MLflow at {tracking_uri}: {str(err).splitlines()[0]}") from err
    table = build_table(rows, plan)
    table.attrs["parent_run_id"] = parent.info.run_id
    return table
