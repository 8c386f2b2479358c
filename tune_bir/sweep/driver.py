"""`python -m tune_bir.sweep`: plan (or resume) a sweep, run it on Ray, summarise it; or confirm a finished one."""

from __future__ import annotations

import json
import time

from tune_bir.sweep.plan import (
    SweepOptions,
    SweepPlan,
    build_parser,
    check_confirm_options,
    check_resume_options,
    check_study_exists,
    given_options,
    plan_from_args,
    resume_folder,
)
from tune_bir.sweep.preflight import check_mlflow
from tune_bir.sweep.run import (
    check_parent_run,
    check_resources,
    connect_ray,
    new_tuner,
    open_parent_run,
    prepare_environment,
    restored_tuner,
    save_to_sweep,
    set_parent_status,
)
from tune_bir.sweep.storage import SWEEP_FILE
from tune_bir.sweep.summary import SweepOutcome, print_summary, summarise
from tune_bir.tracking import default_tracking_uri


def run_sweep(argv: list[str] | None = None) -> SweepOutcome:
    """Validate, run (or resume) a sweep, rank it, and log the summary; raises ConfigError on bad input."""
    args = build_parser().parse_args(argv)
    options = SweepOptions.from_namespace(args)
    if options.confirm:
        raise ValueError("run_sweep runs a sweep; --confirm is run by tune_bir.sweep.confirm.run_confirmation")
    given = given_options(argv)
    check_confirm_options(given)
    prepare_environment()
    if options.resume:
        plan = SweepPlan.load(resume_folder(options))
        check_resume_options(args, given, plan)
        connection = options   # where to run it is this call's choice; how, the sweep's own
    else:
        plan = plan_from_args(args, argv)   # the storage path is probed there
        connection = plan.options
    # nothing exists yet: probe MLflow now, the Ray address in connect_ray, before Ray starts
    check_mlflow(plan.mlflow.tracking_uri if plan.mlflow else default_tracking_uri(plan.options.mlflow_uri))
    if plan.mlflow is not None:
        check_parent_run(plan.mlflow)
    if options.resume:
        check_study_exists(plan)
    return _run(plan, connection, resumed=options.resume)


def _run(plan: SweepPlan, connection: SweepOptions, resumed: bool) -> SweepOutcome:
    started_ray = connect_ray(connection, (plan.options.cpus_per_trial, plan.options.gpus_per_trial))
    try:
        check_resources(plan.options.cpus_per_trial, plan.options.gpus_per_trial)
        plan.mlflow = open_parent_run(plan)
        if resumed:
            tuner = restored_tuner(plan.folder.location, plan.options)
        else:
            save_to_sweep(plan, SWEEP_FILE, json.dumps(plan.to_json(), indent=2))
            tuner = new_tuner(plan)
        start = time.monotonic()
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            set_parent_status(plan, "KILLED")
            raise
        budget = plan.options.time_budget
        budget_spent = budget is not None and time.monotonic() - start >= budget
        return summarise(plan, grid, tuner, budget_spent)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.confirm:
        from tune_bir.sweep.confirm import print_confirmation, run_confirmation

        check_confirm_options(given_options(argv))
        outcome = run_confirmation(SweepOptions.from_namespace(args))
        print_confirmation(outcome)
        return 130 if outcome.interrupted else 0
    outcome = run_sweep(argv)
    print_summary(outcome)
    return 130 if outcome.interrupted else 0
