"""Small sweeps that search, a baseline ASHA never stops, and `--confirm` on a real tiny sweep."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tests import sweep_helpers
from trainables.bir import SCHEDULER_METRIC
from tune_bir.errors import ConfigError
from tune_bir.record import FINGERPRINT_FIELDS
from tune_bir.sweep.confirm import fresh_seeds, load_sweep_plan
from tune_bir.sweep.driver import main, run_sweep
from tune_bir.sweep.plan import SweepOptions, SweepPlan, build_parser, plan_from_args, startup_trials
from tune_bir.sweep.run import baseline_keeping_asha
from tune_bir.sweep.summary import print_summary

TINY = ["--iters", "8", "--batch", "32", "--seed", "0"]


def test_tpe_models_small_sweeps_after_a_few_random_trials(tmp_path):
    assert [startup_trials(n) for n in (1, 6, 24, 40, 64, 1000)] == [3, 3, 6, 10, 10, 10]
    p = plan_from_args(build_parser().parse_args(["--num-samples", "24", "--storage-path", str(tmp_path)]))
    assert p.options.startup_trials == 6
    p = plan_from_args(build_parser().parse_args(["--n-startup-trials", "2", "--storage-path", str(tmp_path)]))
    assert p.options.startup_trials == 2 and p.to_json()["optuna"]["n_startup_trials"] == 2


def test_a_segmented_sweep_does_not_share_task_1_and_says_so_in_its_plan(tmp_path):
    argv = ["--iters", "20", "--segment-iters", "5", "--storage-path", str(tmp_path)]
    assert plan_from_args(build_parser().parse_args(argv), argv).to_json()["cli"]["args"]["share_first_task"] is False
    argv = ["--iters", "20", "--segment-iters", "20", "--storage-path", str(tmp_path)]
    assert plan_from_args(build_parser().parse_args(argv), argv).options.share_first_task is True


def test_sweep_plan_round_trips_through_sweep_json(tmp_path):
    p = plan_from_args(build_parser().parse_args(["--space", "recon", "--iters", "40", "--seeds-per-trial", "2",
                                                  "--storage-path", str(tmp_path), "--name", "x"]))
    back = SweepPlan.from_json(json.loads(json.dumps(p.to_json())))
    assert (back.name, back.sweep_id, back.base_config, back.trial_base) == (p.name, p.sweep_id, p.base_config,
                                                                            p.trial_base)
    assert back.space == p.space and back.resolved == p.resolved and back.options == p.options
    assert back.folder.location == p.folder.location and (back.max_t, back.grace_t) == (p.max_t, p.grace_t)
    assert fresh_seeds(back, 3) == [2, 3, 4]   # the sweep trained seeds 0 and 1


def test_asha_never_stops_the_baseline_but_counts_its_results():
    scheduler = baseline_keeping_asha(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode="max",
                                      max_t=5, grace_period=2, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=str(i), config={"baseline": i == 3}) for i in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    scores = [0.9, 0.8, 0.7, 0.1]   # the baseline (last) is the worst at the rung
    actions = [scheduler.on_trial_result(None, t, {"training_iteration": 2, SCHEDULER_METRIC: s})
               for t, s in zip(trials, scores, strict=True)]
    assert actions == ["CONTINUE", "STOP", "STOP", "CONTINUE"]   # rf 2: below the rung's median stops
    late = SimpleNamespace(trial_id="late", config={"baseline": False})
    scheduler.on_trial_add(None, late)
    # the baseline's 0.1 entered the rung: the cutoff (median) is 0.75 with it, 0.8 without, so 0.77 goes on
    assert scheduler.on_trial_result(None, late, {"training_iteration": 2, SCHEDULER_METRIC: 0.77}) == "CONTINUE"
    assert scheduler._num_stopped == 2   # trials 1 and 2; not the baseline


@pytest.mark.parametrize("argv, message", [
    (["--confirm", "{tmp}/nowhere"], "no sweep at"),
    (["--confirm", "{tmp}", "--top-k", "0"], "--top-k must be >= 1"),
    (["--confirm", "{tmp}", "--seeds", "1"], "--seeds must be >= 2"),
    (["--confirm", "{tmp}/nowhere", "--resume"], "no sweep at"),
])
def test_bad_confirmations_are_one_line_errors_before_anything_starts(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", *argv], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # no Ray results, no MLflow store


@pytest.fixture(scope="module")
def confirmed(ray_session, tmp_path_factory):
    """A tiny sweep whose every trial completes (grace period = all tasks), then its confirmation."""
    tmp = tmp_path_factory.mktemp("confirm")
    store, uri = tmp / "rr", f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = run_sweep([*TINY, "--num-samples", "4", "--grace-period", "5", "--name", "s", "--storage-path",
                       str(store), "--mlflow-uri", uri])
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["--confirm", str(store / "s"), "--top-k", "2", "--seeds", "2"])
    return sweep, code, store / "s", printed.getvalue()


@pytest.mark.slow
def test_confirmation_reruns_the_top_configs_and_the_baseline_on_fresh_seeds(confirmed):
    sweep, code, folder, _ = confirmed
    assert code == 0
    summary = json.loads((folder / "confirm" / "confirm.json").read_text())
    assert summary["seeds"] == [1, 2]                     # the sweep trained seed 0
    labels = [c["config"] for c in summary["configs"]]
    assert labels == ["baseline", "top1", "top2"]
    ranked = sorted((r for r in sweep.rows if not r["baseline"] and r["status"] == "completed"),
                    key=lambda r: r["val_acc_avg"], reverse=True)
    assert [c["source_trial_id"] for c in summary["configs"][1:]] == [r["trial_id"] for r in ranked[:2]]
    for c, r in zip(summary["configs"][1:], ranked, strict=False):
        assert c["values"]["lamda_rep"] == r["lamda_rep"] and c["sweep_val_acc_avg"] == r["val_acc_avg"]
    rows = list(csv.DictReader((folder / "confirm" / "results.csv").open()))
    assert sorted((r["config"], int(r["seed"])) for r in rows) == sorted((c, s) for c in labels for s in (1, 2))
    assert all(r["status"] == "completed" for r in rows)   # every task, no early stopping
    for r in rows:
        assert float(r["acc_avg_after_task_5"]) == pytest.approx(float(r["acc_avg"]))
        assert float(r["acc_avg_after_task_1"]) > float(r["acc_avg_after_task_5"])   # class-IL forgets


@pytest.mark.slow
def test_confirmation_runs_are_mlflow_children_of_the_sweep_and_it_resumes_without_rerunning(confirmed):
    sweep, _, folder, _ = confirmed
    runs = sweep_helpers.child_runs(sweep.plan.to_json())
    confirm_runs = [r for r in runs if "confirm_config" in r.data.tags]
    assert len(runs) == 4 + 6 and len(confirm_runs) == 6
    assert all(r.data.tags["trial_status"] == "completed" and r.info.status == "FINISHED" for r in confirm_runs)
    assert sorted((r.data.tags["confirm_config"], r.data.tags["confirm_seed"]) for r in confirm_runs) == sorted(
        (c, s) for c in ("baseline", "top1", "top2") for s in ("1", "2"))
    artifacts = {a.path for a in MlflowClient(sweep.tracking_uri).list_artifacts(sweep.parent_run_id, "confirm")}
    assert {"confirm/confirm.json", "confirm/results.csv"} <= artifacts
    before = (folder / "confirm" / "results.csv").read_text()
    with pytest.raises(ConfigError, match="add --resume"):
        main(["--confirm", str(folder), "--top-k", "2", "--seeds", "2"])
    assert main(["--confirm", str(folder), "--resume"]) == 0
    assert (folder / "confirm" / "results.csv").read_text() == before        # nothing ran again
    assert len(sweep_helpers.child_runs(sweep.plan.to_json())) == 10         # no run duplicated
    assert load_sweep_plan(str(folder)).options == sweep.plan.options
    assert SweepOptions().top_k == 3 and SweepOptions().seeds == 8


def test_a_sweep_without_a_completed_config_has_nothing_to_confirm(tmp_path):
    plan = plan_from_args(build_parser().parse_args(["--name", "s", "--storage-path", str(tmp_path)]))
    data = plan.to_json() | {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "experiment_id": "1",
                                        "experiment_name": "x", "parent_run_id": "p"}}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(data))
    (tmp_path / "s" / "results.csv").write_text("trial_id,status,baseline,val_acc_avg\n"
                                                "a,completed,True,0.8\nb,stopped_early,False,0.9\n")
    out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", "--confirm", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "no completed trial besides the baseline" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "s" / "confirm").exists()
    assert not (tmp_path / "m.db").exists()


def _lines_after(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ")][:10]


def _train_alone(line: str, tmp_path, name: str) -> dict:
    """Run a printed `python -m tune_bir.train` line in a fresh process; its record."""
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "tune_bir.train"]
    out = subprocess.run([sys.executable, *argv[1:], "--results-dir", str(tmp_path), "--run-name", name],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_the_printed_run_it_alone_lines_give_a_sweep_trials_and_a_confirmation_runs_numbers_bit_for_bit(
        confirmed, capsys, tmp_path):
    sweep, _, folder, printed = confirmed
    print_summary(sweep)
    line = _lines_after(capsys.readouterr().out, "run it alone")[0]
    best = sweep.best
    assert f"--seed={sweep.plan.resolved.seed}" in line and f"--threads={int(best['threads'])}" in line
    record = _train_alone(line, tmp_path, "sweep-best")
    compared = [k for k in best if k in record["final"] and k not in ("task", "iters_done")]
    assert {"acc_avg", "val_acc_avg", "forgetting_avg", "acc_task_5"} <= set(compared)
    assert {k: record["final"][k] for k in compared} == {k: best[k] for k in compared}   # exactly
    assert record["cpu_fingerprint"] == {k: best[k] for k in FINGERPRINT_FIELDS}
    # the confirmation: one line per config; another seed of the same config is the same line with that --seed
    by_config = dict(line.split(maxsplit=1) for line in _lines_after(printed, "run one alone"))
    assert list(by_config) == ["baseline", "top1", "top2"]
    rows = {(r["config"], int(r["seed"])): r for r in csv.DictReader((folder / "confirm" / "results.csv").open())}
    record = _train_alone(by_config["top1"].replace("--seed=1", "--seed=2"), tmp_path, "confirmed-top1-seed2")
    row = rows[("top1", 2)]
    for key in ("acc_avg", "forgetting_avg", "bwt", "val_acc_avg", "acc_task_1", "val_acc_task_5"):
        assert record["final"][key] == float(row[key]), key
    assert str(record["cpu_fingerprint"]["threads"]) == row["threads"]
