"""`python -m analysis`: from a finished sweep to an answer (docs/analysis.md).

Reads a sweep (its folder, or its MLflow runs), writes the trial table, plots and report.md, prints
the top-k trials, attaches the report to the sweep's MLflow parent run, and, when the sweep was
confirmed on fresh seeds (SWEEP/confirm/), the paired statistics (confirmation.csv).

Examples:
  python -m analysis ray_results/repulsion-splitMNIST5k-20260101-120000
  python -m analysis ray_results/NAME --top-k 10 --out paper/figures --no-mlflow
  python -m analysis --mlflow-uri http://127.0.0.1:5000 --sweep NAME
  python -m analysis power --pilot docs/results/repulsion --configs 2 --margin 0.005   # seeds to plan for
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tune_bir.cli import OneLineArgumentParser, run_main
from tune_bir.errors import ConfigError

PROG = "python -m analysis"


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (trials in the top table), got {text!r}")
    return value


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn a finished sweep into a table, plots, a report and (after --confirm) statistics.",
        epilog="Examples:" + __doc__.split("Examples:")[1])
    parser.add_argument("sweep_dir", nargs="?", metavar="SWEEP",
                        help="the sweep folder, <storage-path>/<name> (a path or a URI such as s3://...; a folder "
                             "named power: ./power, as power starts the planning subcommand)")
    parser.add_argument("--sweep", metavar="NAME",
                        help="read the sweep from MLflow instead: its name or its parent run id")
    parser.add_argument("--mlflow-uri", metavar="URI",
                        help="MLflow tracking URI (default: the sweep's own, from sweep.json; with --sweep: "
                             "$MLFLOW_TRACKING_URI, else sqlite mlflow.db here)")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: SWEEP/report; with --sweep: the "
                        "sweep's folder/report when it is here, else ./<name>-report)")
    parser.add_argument("--top-k", type=_top_k, default=5, metavar="K", help="trials in the top table (default: 5)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not attach the report to the sweep's MLflow parent run")
    return parser


def _check_store(tracking_uri: str) -> None:
    """A sqlite store must exist (MLflow would create an empty one and find nothing); a server must answer
    (MLflow's client would retry it for a long while)."""
    from tune_bir.tracking import check_mlflow

    check_mlflow(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_file():
            raise ConfigError(f"no MLflow store at {path} ({tracking_uri}); give --mlflow-uri the sweep's tracking "
                              "URI, or --no-mlflow to skip MLflow")


def _parent_run(tracking_uri: str, run_id: str) -> None:
    """Fail early, in one line, when the sweep's parent run cannot be reached."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_store(tracking_uri)
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except (MlflowException, OSError) as err:
        raise ConfigError(f"cannot reach the sweep's MLflow parent run {run_id} at {tracking_uri}: "
                          f"{str(err).splitlines()[0]}; start the tracking server, pass --mlflow-uri, or add "
                          "--no-mlflow") from err


def _attach(tracking_uri: str, run_id: str, out: str, files: list[str]) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        for file in files:
            client.log_artifact(run_id, str(Path(out) / file), artifact_path="report")
    except (MlflowException, OSError) as err:
        raise ConfigError(f"the report is written to {out} but could not be attached to MLflow run {run_id} at "
                          f"{tracking_uri}: {str(err).splitlines()[0]}; add --no-mlflow to skip") from err


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(the trial table, where it came from: sweep_ref, out, source, tracking_uri, parent_run_id, confirm)."""
    from analysis import table as tables
    from tune_bir.sweep.storage import CONFIRM_DIR, SweepFolder, join
    from tune_bir.tracking import default_tracking_uri

    if args.sweep_dir and args.sweep:
        raise ConfigError("give either a sweep folder (SWEEP) or --sweep NAME (MLflow), not both")
    if not args.sweep_dir and not args.sweep:
        raise ConfigError("no sweep given: pass its folder (python -m analysis ray_results/NAME) or "
                          "--sweep NAME to read it from MLflow")
    if args.sweep_dir:
        folder, plan = tables.open_sweep(args.sweep_dir)
        mlflow = plan.get("mlflow") or {}
        tracking_uri = args.mlflow_uri or mlflow.get("tracking_uri")
        run_id = mlflow.get("parent_run_id")
        if not args.no_mlflow:
            if not tracking_uri or not run_id:
                raise ConfigError(f"{folder}/sweep.json names no MLflow parent run; add --no-mlflow")
            _parent_run(tracking_uri, run_id)
        table = tables.load_sweep(folder.location)
        where = {"sweep_ref": folder.location, "out": args.out or join(folder.location, "report"),
                 "source": f"sweep folder {folder.location}", "confirm": join(folder.location, CONFIRM_DIR)}
    else:
        tracking_uri = default_tracking_uri(args.mlflow_uri)
        _check_store(tracking_uri)
        table = tables.load_mlflow(tracking_uri, args.sweep)
        run_id = table.attrs["parent_run_id"]
        plan = table.attrs["plan"]
        sweep_dir = plan.get("sweep_dir") or ""
        local = bool(sweep_dir) and "://" not in sweep_dir and Path(sweep_dir).is_dir()
        where = {"sweep_ref": sweep_dir or plan["name"],
                 "out": args.out or (f"{sweep_dir}/report" if local else f"{plan['name']}-report"),
                 "source": f"MLflow {tracking_uri}, parent run {run_id}",
                 "confirm": f"{sweep_dir}/{CONFIRM_DIR}" if local else None}
        if local:
            SweepFolder.of(sweep_dir)   # a well-formed location
    if table.empty:
        raise ConfigError(f"nothing to analyse: sweep {plan['name']} has no trial yet (it never started); run or "
                          f"resume it with python -m tune_bir.sweep --resume --name {plan['name']}")
    return table, where | {"tracking_uri": tracking_uri, "parent_run_id": run_id}


def _confirmation(location: str | None):
    """The confirmation of the sweep, None when there is none; a note when it is there but unfinished."""
    from analysis.report import read_confirmation
    from analysis.table import _fs

    if location is None:
        return None, None
    import pyarrow.fs

    fs, path = _fs(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return None, None
    confirmation = read_confirmation(location)
    if confirmation is None:
        return None, f"{location} has no confirm.json and results.csv yet (confirmation unfinished?): no statistics"
    return confirmation, None


def _sequential(args: argparse.Namespace) -> int:
    """`python -m analysis CONFIRM_FOLDER`: a pre-registered sequential confirmation's verdicts and report."""
    import json

    from analysis.sequential_report import STATE_FILE, naive_mean_bias, read_sequential, write_sequential_report

    conf = read_sequential(args.sweep_dir)   # refuses a changed plan and results outside it, before writing
    out = args.out or str(conf.folder / "report")
    if Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder for the report (--out DIR)")
    tracking_uri = run_id = None
    if not args.no_mlflow:
        state_path = conf.folder / STATE_FILE
        mlflow = (json.loads(state_path.read_text()).get("mlflow") or {}) if state_path.is_file() else {}
        tracking_uri, run_id = args.mlflow_uri or mlflow.get("tracking_uri"), mlflow.get("parent_run_id")
        if not tracking_uri or not run_id:
            raise ConfigError(f"{conf.folder}/{STATE_FILE} names no MLflow parent run; add --no-mlflow")
        _parent_run(tracking_uri, run_id)
    table, files, notes = write_sequential_report(conf, out)
    print(f"confirmation {conf.plan.get('label', conf.folder.name)}: plan sha256 {conf.sha256[:16]}... verified; "
          f"{conf.design.method()}")
    for r in table.to_dict("records"):
        if r.get("n"):
            at = "after" if r["verdict"] == "go on" else "at"
            print(f"  {r['config']}: {r['verdict']} {at} look {r['look']} ({r['n']} seeds), repeated CI "
                  f"[{r['rci_low']:+.4f}, {r['rci_high']:+.4f}], naive mean {r['mean_diff_naive']:+.4f}"
                  + (f" ({bias})" if (bias := naive_mean_bias(r["verdict"], r["look"] < len(conf.design.looks)))
                     else ""))
        else:
            print(f"  {r['config']}: {r['verdict']}")
    for note in notes:
        print(f"note: {note}")
    print(f"report: {out}/report.md ({', '.join(files)})")
    if run_id:
        _attach(tracking_uri, run_id, out, files)
        print(f"attached to MLflow parent run {run_id} (artifacts/report) at {tracking_uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["power"]:   # the planning subcommand; a sweep folder named power is given as ./power
        from analysis.power import PROG as POWER
        from analysis.power import main as power

        return run_main(POWER, power, argv[1:])
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")   # an unreachable server fails in seconds
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if args.no_mlflow and args.mlflow_uri and args.sweep_dir:
        raise ConfigError("--mlflow-uri with --no-mlflow and a sweep folder: nothing is read from or attached to "
                          "MLflow; drop --mlflow-uri or --no-mlflow")
    if not args.no_mlflow and args.out and "://" in args.out:
        raise ConfigError(f"--out {args.out} is not a local folder: MLflow attaches local files; give a local "
                          "--out, or add --no-mlflow")
    if args.sweep_dir and not args.sweep:
        from analysis.sequential_report import is_sequential_folder

        if is_sequential_folder(args.sweep_dir):
            return _sequential(args)
    table, where = _load(args)
    if not args.no_mlflow and "://" in where["out"]:
        raise ConfigError(f"--out {where['out']} is not a local folder: MLflow attaches local files; give a local "
                          "--out, or add --no-mlflow")
    if "://" not in where["out"] and Path(where["out"]).expanduser().exists() and not Path(
            where["out"]).expanduser().is_dir():
        raise ConfigError(f"--out {where['out']} is a file, not a folder; give a folder for the report (--out DIR)")
    confirmation, confirm_note = _confirmation(where["confirm"])
    if confirmation is not None:
        from analysis.stats import confirmation_table

        try:   # checked before anything is written
            confirmation_table(confirmation.results)
        except ValueError as err:
            raise ConfigError(f"{where['confirm']}: {err}; continue the confirmation (python -m tune_bir.sweep "
                              f"--confirm {where['sweep_ref']} --resume) or move the confirm folder away") from err
    try:
        import pandas as pd

        from analysis.report import top_k, write_report
        from analysis.stats import BASELINE

        report = write_report(table, where["out"], k=args.top_k, sweep_ref=where["sweep_ref"],
                              source=where["source"], confirmation=confirmation)
    except ValueError as err:   # e.g. a confirmation results.csv without a baseline
        raise ConfigError(str(err)) from err
    plan = table.attrs["plan"]
    counts = table["trial_status"].value_counts().to_dict()
    print(f"sweep {plan['name']}: {len(table)} trials (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")
    top = top_k(table, args.top_k)
    if top.empty:
        print(f"no trial trained all {plan['resolved_base_config']['tasks']} tasks: no top table, no best config")
    else:
        print(f"top {len(top)} completed trials by val_acc_avg (validation):")
        with pd.option_context("display.width", 200, "display.max_columns", 50,
                               "display.float_format", "{:.4g}".format):
            print(top.to_string(index=False))
    for c in report.rung_correlations:
        print(f"early stopping: rung at task {c.task}: Spearman rho {c.rho:.3g} (95 % bootstrap {c.low:.3g} to "
              f"{c.high:.3g}) between val_acc_avg there and at the end, {c.n} completed trials (range-restricted: "
              "trials ASHA stopped have no final score)")
    for note in report.notes:
        print(f"note: {note}")
    if confirm_note:
        print(f"note: {confirm_note}")
    if "://" not in where["sweep_ref"] and Path(where["sweep_ref"]).is_dir():
        for plan_file in sorted(Path(where["sweep_ref"]).glob("confirm-*/plan.json")):
            print(f"note: {plan_file.parent} is a pre-registered confirmation: python -m analysis {plan_file.parent}")
    if report.confirmation is not None:
        print("confirmation on fresh seeds (test acc_avg vs the baseline, paired by seed, Holm-adjusted):")
        for row in report.confirmation.to_dict("records"):
            if row["config"] != BASELINE:
                print(f"  {row['config']}: {row['verdict']} (diff {row['diff_vs_baseline']:+.4f}, "
                      f"p_holm {row['p_holm']:.3g}, {row['n_pairs']} paired seeds)")
    print(f"report: {report.out}/report.md ({', '.join(report.files)})")
    if not args.no_mlflow:
        _attach(where["tracking_uri"], where["parent_run_id"], report.out, report.files)
        print(f"attached to MLflow parent run {where['parent_run_id']} (artifacts/report) at {where['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
