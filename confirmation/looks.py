"""Look after look: run a batch of seeds as Ray trials, ask analysis.sequential for verdicts, stop what is decided.

Look k runs the seeds looks[k-1] .. looks[k] - 1 of the plan (looks are cumulative seed counts) for the
baseline and every config still going on, as one batch of Ray Tune trials (`tune_bir.sweep.batch`,
folder `look-k/`). Once every run of the batch completed, `analysis.sequential.decide` gives each open
config its verdict from the paired differences of all its seeds so far; a decided config stops, the
baseline runs while any config goes on. `looks.json` gets one entry per decided look (with the commit
that ran it), `results.csv` every run so far. An interrupted look resumes where it stopped; a look whose
runs all finished but which was not decided (the driver stopped in between) is decided on resume without
running anything again.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from typing import Any

import analysis.sequential as sequential
from confirmation.plan import BASELINE, LOOKS_FILE, METRIC, ConfirmationPlan
from tune_bir.config import label_permutation
from tune_bir.record import git_commit
from tune_bir.sweep.batch import batch_points, run_batch
from tune_bir.sweep.plan import MlflowLocation, SweepOptions
from tune_bir.sweep.status import COMPLETED
from tune_bir.sweep.storage import RESULTS_FILE, SweepFolder
from tune_bir.sweep.summary import csv_text

# Exit states of `run_looks`
DONE, INTERRUPTED, FAILED = "done", "interrupted", "failed"


@dataclass
class LooksOutcome:
    state: str                        # DONE (every config decided, or the last look), INTERRUPTED, FAILED
    looks: list[dict[str, Any]]       # looks.json
    rows: list[dict[str, Any]]        # results.csv
    message: str = ""


def class_order(experiment: str, seed: int) -> str:
    """The seed's class order (split MNIST permutes from seed 10 on, docs/algorithm.md "Class order")."""
    return " ".join(str(int(c)) for c in label_permutation(experiment, seed))


def read_looks(folder: SweepFolder) -> list[dict[str, Any]]:
    return json.loads(folder.read_text(LOOKS_FILE)) if folder.exists(LOOKS_FILE) else []


def read_results(folder: SweepFolder) -> list[dict[str, Any]]:
    if not folder.exists(RESULTS_FILE):
        return []
    return list(csv.DictReader(io.StringIO(folder.read_text(RESULTS_FILE))))


def _decided(looks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config -> the verdict (as looks.json has it) that stopped it."""
    out = {}
    for look in looks:
        for v in look["verdicts"]:
            if v["verdict"] in sequential.DECIDED and v["config"] not in out:
                out[v["config"]] = v
    return out


def run_looks(plan: ConfirmationPlan, folder: SweepFolder, options: SweepOptions, mlflow: MlflowLocation,
              group_id: str, progress=print) -> LooksOutcome:
    """Run the plan's looks from the first undecided one on; Ray must be connected."""
    looks = read_looks(folder)
    rows = {(r["config"], int(r["seed"])): r for r in read_results(folder)}
    design = sequential.SequentialDesign.from_dict(plan.design) if plan.design else None
    decided = {c: sequential.Verdict.from_dict(v) for c, v in _decided(looks).items()}
    experiment = plan.base_config.get("experiment") or plan.trial_base.get("experiment") or "splitMNIST5k"
    for k in range(len(looks) + 1, len(plan.looks) + 1):
        open_configs = [c for c in plan.labels if c not in decided]
        if not open_configs:
            break
        n, before = plan.looks[k - 1], (plan.looks[k - 2] if k > 1 else 0)
        seeds = plan.seeds[before:n]
        labels = [BASELINE, *open_configs]
        progress(f"look {k} of {len(plan.looks)}: seeds {seeds[0]}..{seeds[-1]} ({n} in all) for "
                 f"{', '.join(labels)}")
        started = dt.datetime.now(dt.timezone.utc)
        points = batch_points(plan.trial_configs(labels), seeds)
        batch_rows, unfinished = run_batch(folder, f"look-{k}", points, options, mlflow, group_id, plan.n_tasks)
        for r in batch_rows:
            r["look"] = k
            r["class_order"] = class_order(experiment, int(r["seed"]))
            rows[(r["config"], int(r["seed"]))] = r
        ordered = sorted(rows.values(), key=lambda r: (r["config"] != BASELINE, r["config"], int(r["seed"])))
        folder.write_text(RESULTS_FILE, csv_text(ordered))
        if unfinished:
            return LooksOutcome(INTERRUPTED, looks, ordered, f"look {k} was interrupted")
        failed = [f"{r['config']} seed {r['seed']} ({r['status']})" for r in batch_rows if r["status"] != COMPLETED]
        if failed:
            return LooksOutcome(FAILED, looks, ordered, f"look {k} cannot be decided: {', '.join(failed[:4])} did "
                                "not complete; see the trial's error.txt under look-" f"{k}/, fix it and --resume")
        import pandas as pd

        table = pd.DataFrame(ordered)
        table = table[table["config"].isin(labels)].astype({"seed": int, METRIC: float})
        diffs = sequential.paired_differences(table, metric=METRIC, baseline=BASELINE, seeds=plan.seeds[:n])
        if design is None:    # a fixed design: its one look is the report's (python -m analysis)
            verdicts: dict[str, Any] = {}
        else:
            verdicts = sequential.decide(design, {c: diffs[c] for c in open_configs}, k, decided)
        entry = {"look": k, "n": n, "seeds": seeds, "commit": git_commit(),
                 "started": started.isoformat(timespec="seconds"),
                 "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "verdicts": [v.to_dict() for c, v in verdicts.items() if c in open_configs]}
        looks.append(entry)
        folder.write_text(LOOKS_FILE, json.dumps(looks, indent=2) + "\n")
        for c, v in verdicts.items():
            if c in open_configs:
                progress(f"  {c}: {v.verdict} (mean difference {v.estimate:+.4f}, repeated CI "
                         f"[{v.rci_low:+.4f}, {v.rci_high:+.4f}], {v.n} seeds)")
        decided |= {c: v for c, v in verdicts.items() if v.verdict in sequential.DECIDED}
    return LooksOutcome(DONE, looks, sorted(rows.values(), key=lambda r: (r["config"] != BASELINE, r["config"],
                                                                          int(r["seed"]))))

