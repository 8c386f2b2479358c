"""The sweep driver, the top layer of tune_bir: `python -m tune_bir.sweep` (docs/architecture.md "Sweep driver").

Optuna (TPE) proposes configs of a search space, ASHA stops the weak ones early on `val_acc_avg`,
trials spread over the CPUs/GPUs of this machine or a Ray cluster, and every trial is logged to
MLflow; `--confirm` re-runs a finished sweep's best configs and its baseline on fresh seeds.

  plan.py             the command line, `SweepOptions` and the typed `SweepPlan` (sweep.json)
  storage.py          the sweep folder, local or a storage URI
  preflight.py        bounded-time checks of storage, MLflow and the Ray address before anything starts
  run.py              Ray connection, resources, the MLflow parent run, the Tuner
  search.py           Optuna under Tune, told which trials were stopped early
  mlflow_callback.py  one MLflow run per trial, one batched call per result
  status.py           trial statuses and the ranking of a sweep's trials
  summary.py          results.csv, best config, the closing summary
  confirm.py          confirmation runs of the top configs on fresh seeds
  driver.py           `main`: plan or resume, run, summarise; or confirm

Nothing below this package (the engine, trainables, search spaces) imports it.
"""
