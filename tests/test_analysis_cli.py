"""`python -m analysis` on hand-made sweep folders (no Ray): the table's rules, the report, the statistics,
and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import load_sweep
from analysis.report import write_report
from analysis.stats import COLUMNS
from tune_bir.record import FINGERPRINT_FIELDS

TASKS, ITERS = 3, 10
SPACE = {"name": "fake", "description": "a hand-made space", "fixed": {"repulsion": True}, "params": {
    "lamda_rep": {"distribution": "loguniform", "low": 0.01, "high": 1e8},
    "kl_js": {"distribution": "choice", "choices": ["kl", "js"]},
    "use_rep_f": {"distribution": "choice", "choices": [False, True]},
    "rep_f": {"distribution": "loguniform", "low": 1.5, "high": 100.0, "when": {"use_rep_f": True}},
    "n_rep": {"distribution": "int", "low": 1, "high": 4}}}
# trial id -> (status, baseline, params, validation accuracy after each task reached, diverged in the next task)
TRIALS = {
    "t0": ("completed", True, {}, [0.99, 0.60, 0.40], False),
    "t1": ("completed", False, {"lamda_rep": 10.0, "kl_js": "js", "use_rep_f": True, "rep_f": 5.0, "n_rep": 2},
           [0.99, 0.62, 0.45], False),
    "t2": ("completed", False, {"lamda_rep": 1e5, "kl_js": "kl", "use_rep_f": False, "n_rep": 3},
           [0.99, 0.58, 0.35], False),
    "t3": ("completed", False, {"lamda_rep": 3.0, "kl_js": "kl", "use_rep_f": True, "rep_f": 50.0, "n_rep": 1},
           [0.99, 0.61, 0.42], False),
    "t4": ("stopped_early", False, {"lamda_rep": 1e7, "kl_js": "js", "use_rep_f": False, "n_rep": 4},
           [0.99, 0.50], False),
    "t5": ("diverged", False, {"lamda_rep": 1e8, "kl_js": "js", "use_rep_f": False, "n_rep": 4}, [0.99], True),
}


def png_has_content(path: Path) -> None:
    """A real plot: a sizeable image with many distinct colours and spread-out pixel values."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    rgb = (image[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 30, f"{path.name}: too few colours for a plot"
    assert image[..., :3].std() > 0.05, f"{path.name}: nearly blank"


def make_sweep(root: Path, name: str = "fake", trials: dict | None = None, statuses: bool = True) -> Path:
    """A sweep folder in the layout `tune_bir.sweep` and Ray Tune write (sweep.json, results.csv, trial folders)."""
    trials = TRIALS if trials is None else trials
    folder = root / name
    folder.mkdir(parents=True)
    plan = {"name": name, "sweep_id": "abc", "sweep_dir": str(folder), "created": "2026-01-01T00:00:00",
            "space": SPACE, "base_config": {"iters": ITERS},
            "resolved_base_config": {"tasks": TASKS, "iters": ITERS, "seed": 0, "experiment": "splitMNIST5k",
                                     "val_fraction": 0.1},
            "metric": "val_acc_avg", "asha": {"metric": "val_score", "grace_period": 2, "reduction_factor": 4},
            "cli": {"args": {"num_samples": len(trials), "seeds_per_trial": 1}}}
    (folder / "sweep.json").write_text(json.dumps(plan))
    rows = []
    for trial_id, (status, baseline, params, val, diverged) in trials.items():
        trial = folder / f"BIRTrainable_{trial_id}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"iters": ITERS, "baseline": baseline, **params}))
        lines, elapsed = [], 0.0
        for task, v in enumerate(val, start=1):
            for segment_end in (ITERS * task - 5, ITERS * task):     # a segment inside the task, then its end
                elapsed += 1.0
                lines.append({"task": task if segment_end % ITERS == 0 else task - 1, "iters_done": segment_end,
                              "val_acc_avg": v if segment_end % ITERS == 0 else 0.0, "acc_avg": v - 0.01,
                              "forgetting_avg": 0.1 * task, "bwt": -0.1 * task, "time_this_step_s": 1.0,
                              "time_total_s": elapsed + 0.5, "trial_id": trial_id})
        if diverged:
            lines.append({"task": len(val), "iters_done": ITERS * len(val) + 3, "val_acc_avg": math.nan,
                          "acc_avg": math.nan, "time_this_step_s": 0.5, "time_total_s": elapsed + 1.0,
                          "diverged": True, "trial_id": trial_id})
        (trial / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
        rows.append({"trial_id": trial_id, "trial_name": trial.name, "status": status, "baseline": baseline})
    if statuses:
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    return folder


def run_analysis(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_load_sweep_applies_the_table_rules(tmp_path):
    table = load_sweep(str(make_sweep(tmp_path))).set_index("trial_id")
    assert list(table.index) == sorted(TRIALS)
    assert table.loc["t0", "baseline"] and table["baseline"].sum() == 1
    # the baseline samples nothing; rep_f only where use_rep_f is on
    assert math.isnan(table.loc["t0", "lamda_rep"]) and table.loc["t0", "kl_js"] is None
    assert table.loc["t1", "rep_f"] == 5.0 and math.isnan(table.loc["t2", "rep_f"])
    assert table.loc["t1", "n_rep"] == 2 and table.loc["t1", "use_rep_f"] is True
    # final metrics after the last task reached; a diverged trial has none
    assert table.loc["t4", "tasks_reached"] == 2 and table.loc["t4", "val_acc_avg"] == 0.50
    assert table.loc["t5", "tasks_reached"] == 1 and table.loc["t5", "trial_status"] == "diverged"
    assert math.isnan(table.loc["t5", "val_acc_avg"]) and math.isnan(table.loc["t5", "forgetting_avg"])
    assert table.loc["t5", "val_acc_avg_after_task_1"] == 0.99
    assert math.isnan(table.loc["t5", "val_acc_avg_after_task_2"])
    # per-task values come from the records that end a task (segments inside a task are skipped)
    assert list(table.loc["t1", [f"val_acc_avg_after_task_{t}" for t in (1, 2, 3)]]) == [0.99, 0.62, 0.45]
    assert table.loc["t1", "acc_avg_after_task_3"] == pytest.approx(0.44)
    # wall time (Tune's clock) at the last record: 6 segments of 1 s after a 0.5 s start; 2 + the diverged one
    assert table.loc["t1", "time_total_s"] == 6.5 and table.loc["t5", "time_total_s"] == 3.0
    assert table.attrs["plan"]["name"] == "fake"


def test_trials_of_an_interrupted_sweep_without_results_csv_are_unfinished(tmp_path):
    table = load_sweep(str(make_sweep(tmp_path, statuses=False)))
    assert set(table["trial_status"]) == {"unfinished"}


def test_report_of_a_sweep_with_importance(tmp_path):
    table = load_sweep(str(make_sweep(tmp_path)))
    report = write_report(table, tmp_path / "out", k=2)
    assert list(report.top["trial_id"]) == ["t1", "t3"] and list(report.top["rank"]) == [1, 2]
    assert set(report.importances) == {"lamda_rep", "kl_js", "use_rep_f", "n_rep"}   # rep_f is conditional
    assert sum(report.importances.values()) == pytest.approx(1.0)
    for file in ("val_acc_per_task.png", "params_vs_val_acc.png", "param_importance.png",
                 "parallel_coordinates.png"):
        png_has_content(tmp_path / "out" / file)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| completed | stopped_early | errored | diverged |" in text and "| 4 | 1 | 0 | 1 |" in text
    assert "candidate, not a finding" in text and "python -m tune_bir.sweep --confirm" in text
    assert pd.read_parquet(tmp_path / "out" / "trials.parquet").shape == table.shape


def test_fewer_than_two_completed_trials_skip_importance_with_a_note(tmp_path):
    trials = {k: TRIALS[k] for k in ("t0", "t1", "t4")}
    report = write_report(load_sweep(str(make_sweep(tmp_path, trials=trials))), tmp_path / "out")
    assert report.importances is None and not (tmp_path / "out" / "param_importance.png").exists()
    assert "needs >= 2 completed trials" in (tmp_path / "out" / "report.md").read_text()


def test_no_completed_trial_writes_the_table_and_says_so(tmp_path):
    trials = {k: TRIALS[k] for k in ("t4", "t5")}
    folder = make_sweep(tmp_path, trials=trials)
    done = run_analysis(str(folder), "--no-mlflow", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no trial trained all 3 tasks" in done.stdout
    assert len(pd.read_csv(folder / "report" / "trials.csv")) == 2
    png_has_content(folder / "report" / "val_acc_per_task.png")
    text = (folder / "report" / "report.md").read_text()
    assert "No trial trained every task" in text and "needs >= 2 completed trials" in text


def _confirmation(folder: Path, effect: float, cpu_of: Callable[[str, int], str] | None = None) -> None:
    rng = np.random.default_rng(0)
    confirm = folder / "confirm"
    confirm.mkdir()
    seeds = [1, 2, 3, 4, 5]
    configs = [{"config": "baseline", "source_trial_id": "t0", "values": {}, "sweep_val_acc_avg": 0.40},
               {"config": "top1", "source_trial_id": "t1", "values": TRIALS["t1"][2], "sweep_val_acc_avg": 0.45},
               {"config": "top2", "source_trial_id": "t3", "values": TRIALS["t3"][2], "sweep_val_acc_avg": 0.42}]
    (confirm / "confirm.json").write_text(json.dumps({"sweep": folder.name, "seeds": seeds, "n_tasks": TASKS,
                                                      "configs": configs}))
    rows = []
    base = 0.40 + rng.normal(0, 0.01, len(seeds))
    for c, gain in (("baseline", 0.0), ("top1", effect), ("top2", 0.0)):
        for seed, b in zip(seeds, base, strict=True):
            acc = b + gain + rng.normal(0, 0.002)
            rows.append({"config": c, "seed": seed, "trial_id": f"{c}{seed}", "status": "completed", "acc_avg": acc,
                         "forgetting_avg": 0.3, "bwt": -0.3, "val_acc_avg": acc, "acc_task_1": acc,
                         **{f"acc_avg_after_task_{t}": acc + (TASKS - t) * 0.2 for t in range(1, TASKS + 1)},
                         "time_total_s": 1.0})
            if cpu_of is not None:   # what a confirmation records per run (tune_bir.record.cpu_fingerprint)
                rows[-1] |= {"cpu_model": cpu_of(c, seed), "cpu_isa_torch": "AVX512", "cpu_isa_mkl": "x",
                             "mkl_cbwr": "OFF", "cpu_isa_onednn": "y", "threads": 1, "torch_version": "2",
                             "mkl_version": "2024.2", "onednn_version": "3"}
    pd.DataFrame(rows).to_csv(confirm / "results.csv", index=False)


def test_confirmation_statistics_verdicts_and_plot(tmp_path):
    folder = make_sweep(tmp_path)
    _confirmation(folder, effect=0.05)
    done = run_analysis(str(folder), "--no-mlflow", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "out" / "confirmation.csv")
    assert list(table.columns[:len(COLUMNS)]) == COLUMNS and list(table["config"]) == ["baseline", "top1", "top2"]
    assert table.set_index("config").loc["top1", "verdict"] == "better"
    assert table.set_index("config").loc["top2", "verdict"] == "no significant difference at 0.05 after Holm"
    png_has_content(tmp_path / "out" / "confirmation.png")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Confirmation on fresh seeds" in text
    assert "**top1** (trial t1, sweep val_acc_avg 0.4500): **better**" in text
    assert "top1: better" in done.stdout


def test_the_report_says_when_a_confirmations_runs_came_from_several_kinds_of_cpu(tmp_path):
    folder = make_sweep(tmp_path)
    _confirmation(folder, effect=0.05, cpu_of=lambda config, seed: "Intel Xeon" if config == "top2" else "AMD EPYC")
    done = run_analysis(str(folder), "--no-mlflow", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "CPUs: the runs came from 2 kinds of CPU or thread count" in text
    assert "baseline: 5 A; top1: 5 A; top2: 5 B" in text and "In 5 of 5 seeds the runs of that seed span kinds" in text
    assert "a bias no number of seeds removes" in text


def test_the_cpu_note_tells_noise_from_bias_and_is_silent_for_one_kind():
    from analysis.report import machines_note

    rows = [{"config": c, "seed": s, "cpu_model": "AMD", "threads": 1} for c in ("baseline", "top1") for s in (1, 2)]
    fields = {k: "x" for k in FINGERPRINT_FIELDS if k not in ("cpu_model", "threads")}
    table = pd.DataFrame([r | fields for r in rows])
    assert machines_note(table) is None
    assert "record no CPU" in machines_note(table[["config", "seed"]])
    table.loc[table["seed"] == 2, "cpu_model"] = "Intel"     # each seed on one kind, every config the same mix
    note = machines_note(table)
    assert "Every seed's runs computed on one kind" in note and "adds noise, not bias" in note
    table.loc[(table["seed"] == 1) & (table["config"] == "top1"), "threads"] = 2
    note = machines_note(table)
    assert "3 kinds" in note and "In 1 of 2 seeds" in note and "a bias no number of seeds removes" in note


def test_an_unfinished_confirmation_is_a_note(tmp_path):
    folder = make_sweep(tmp_path)
    (folder / "confirm").mkdir()
    done = run_analysis(str(folder), "--no-mlflow", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "confirmation unfinished" in done.stdout and not (folder / "report" / "confirmation.csv").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is not a sweep folder (no sweep.json)"),
    ("no-trials", "nothing to analyse"),
    ("top-k-0", "argument --top-k: must be an integer >= 1"),
    ("top-k-x", "argument --top-k: must be an integer >= 1"),
    ("both", "not both"),
    ("neither", "no sweep given"),
    ("no-store", "no MLflow store at"),
    ("no-parent-run", "names no MLflow parent run; add --no-mlflow"),
    ("uri-out", "is not a local folder"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path, case, message):
    sweep = str(make_sweep(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "sweep.json").write_text((tmp_path / "fake" / "sweep.json").read_text())
    args = {"missing": [str(tmp_path / "nope")], "empty": [str(tmp_path / "empty")],
            "no-trials": [str(tmp_path / "bare"), "--no-mlflow"], "top-k-0": [sweep, "--top-k", "0"],
            "top-k-x": [sweep, "--top-k", "x"], "both": [sweep, "--sweep", "fake"], "neither": [],
            "no-store": ["--mlflow-uri", f"sqlite:///{tmp_path / 'none.db'}", "--sweep", "fake"],
            "no-parent-run": [sweep], "uri-out": [sweep, "--out", "s3://bucket/x"]}[case]
    done = run_analysis(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("python -m analysis: error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "none.db").exists()
