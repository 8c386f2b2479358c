"""The full-budget reference of a finished sweep: each of its trials' configs trained to the end with the sweep's seed.

Reads a sweep's trial table (`docs/results/<space>/trials.csv`, as `python -m analysis` writes it) and its
`sweep.json`, rebuilds every trial's learner config (the trial base config, the space's fixed fields and the
trial's values), and runs `python -m tune_bir.train --config FILE --seed SEED --threads 1` for each, at most
`--jobs` at a time under `nice`. `--code DIR` runs another checkout (e.g. a frozen commit: the numbers must
come from the code that ran the sweep). Writes one row per trial: its validation and test scores after every
task, the ASHA score `val_score` as the sweep computed it, and whether the run reproduced the sweep's own
numbers for the tasks the trial trained.

    python benchmarks/asha_reference.py docs/results/repulsion --out docs/results/repulsion/reference.csv \
        --code /work/frozen --only stopped_early
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

TIE_RANK_CODE = (
    "import json, sys; from trainables.bir import tie_rank; "
    "print(json.dumps([tie_rank(c) for c in json.load(sys.stdin)]))")


def trial_configs(sweep_dir: Path) -> tuple[pd.DataFrame, list[dict[str, Any]], int]:
    """The trial table, each trial's learner config (as the sweep's trial got it) and the sweep's seed."""
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    trials = pd.read_csv(sweep_dir / "trials.csv", dtype={"trial_id": str})
    base = dict(plan["trial_base_config"])
    fixed = plan["space"]["fixed"]
    params = plan["space"]["params"]
    configs = []
    for row in trials.itertuples(index=False):
        if row.baseline:
            cfg = dict(plan["baseline_config"])
        else:
            cfg = {**base, **fixed}
            for name, spec in params.items():
                when = spec.get("when", {})
                if all(cfg.get(k) == v for k, v in when.items()):
                    value = getattr(row, name)
                    cfg[name] = value.item() if hasattr(value, "item") else value
        # the CSV stores booleans and ints as pandas reads them; the config wants plain JSON values
        cfg = {k: (bool(v) if isinstance(v, bool) or str(v) in ("True", "False") else v) for k, v in cfg.items()}
        for name, spec in params.items():
            if spec["distribution"] == "int" and name in cfg:
                cfg[name] = int(cfg[name])
        configs.append(cfg)
    return trials, configs, int(plan["resolved_base_config"]["seed"])


def _record(work: Path, name: str) -> dict[str, Any]:
    # train writes <results-dir>/<run-name>.json; the config file was written beside it under another name
    return json.loads((work / "records" / f"{name}.json").read_text())


def informativeness(trials: pd.DataFrame, reference: pd.DataFrame, rungs: list[int], n_tasks: int,
                    metric: str = "val_acc_avg") -> dict[str, Any]:
    """Per rung: Spearman's rho (bootstrap 95 % interval) between every config's score there and its full-budget
    final score, the same over the completed trials only (what a sweep alone can say), how many of the reference's
    final top 3 ASHA stopped there; and the regret of ASHA's winner. Final scores: the sweep's own for trials that
    completed, the reference's for the others."""
    from tune_bir.sweep.rungs import RESOLUTION_DIGITS, spearman_with_interval

    ref = reference.set_index("trial_id")
    table = trials.set_index("trial_id")
    final_key = f"{metric}_after_task_{n_tasks}"
    final = {t: round(float(table.loc[t, final_key] if table.loc[t, "trial_status"] == "completed"
                            else ref.loc[t, final_key]), RESOLUTION_DIGITS)   # equal to a validation image: ties
             for t in table.index if table.loc[t, "trial_status"] == "completed" or t in ref.index}
    final_test = {t: (table.loc[t, f"acc_avg_after_task_{n_tasks}"] if table.loc[t, "trial_status"] == "completed"
                      else ref.loc[t, f"acc_avg_after_task_{n_tasks}"]) for t in final}
    # the final top 3, ties at the third place included (accuracies on 400 validation images tie often)
    third = sorted(final.values(), reverse=True)[min(2, len(final) - 1)]
    top3 = sorted((t for t in final if final[t] >= third), key=lambda t: -final[t])
    completed = [t for t in final if table.loc[t, "trial_status"] == "completed"]
    out: dict[str, Any] = {"metric": metric, "n_configs": len(final), "n_completed": len(completed),
                           "reference_top3": [{"trial_id": t, metric: final[t], "asha_status":
                                               table.loc[t, "trial_status"], "tasks_reached":
                                               int(table.loc[t, "tasks_reached"])} for t in top3], "rungs": []}
    for task in rungs:
        key = f"{metric}_after_task_{task}"
        ids = list(final)
        rho, low, high = spearman_with_interval([table.loc[t, key] for t in ids], [final[t] for t in ids])
        r_rho, r_low, r_high = spearman_with_interval([table.loc[t, key] for t in completed],
                                                      [final[t] for t in completed])
        rho_test, low_test, high_test = spearman_with_interval([table.loc[t, key] for t in ids],
                                                               [final_test[t] for t in ids])
        out["rungs"].append({
            "task": task, "rho": rho, "low": low, "high": high, "rho_vs_final_test_acc": rho_test,
            "low_test": low_test, "high_test": high_test,
            "restricted_rho": r_rho, "restricted_low": r_low, "restricted_high": r_high,
            "distinct_scores": int(table.loc[ids, key].nunique()),
            "top3_stopped_here": sum(int(table.loc[t, "tasks_reached"]) == task
                                     and table.loc[t, "trial_status"] == "stopped_early" for t in top3)})
    winner = max(completed, key=lambda t: table.loc[t, final_key])
    best = max(final, key=lambda t: (final[t], t == winner))   # a tie with ASHA's winner is no regret
    out["asha_winner"] = {"trial_id": winner, metric: final[winner], "acc_avg": final_test[winner]}
    out["reference_best"] = {"trial_id": best, metric: final[best], "acc_avg": final_test[best]}
    out["regret"] = {metric: final[best] - final[winner], "acc_avg": final_test[best] - final_test[winner]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="folder with the sweep's trials.csv and sweep.json")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (one row per trial)")
    parser.add_argument("--code", type=Path, default=None, help="checkout whose code runs the trials")
    parser.add_argument("--only", default=None, help="run only trials of this status (e.g. stopped_early)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--records", type=Path, default=None,
                        help="train nothing: build the table from the train records already in this folder (e.g. a "
                             "run cut short: the configs it finished)")
    parser.add_argument("--summarise", action="store_true",
                        help="run nothing: from trials.csv and --out, print (and write beside --out as JSON) how "
                             "informative each ASHA rung was")
    args = parser.parse_args(argv)
    if args.summarise:
        from tune_bir.sweep.rungs import rung_tasks

        plan = json.loads((args.sweep_dir / "sweep.json").read_text())
        summary = informativeness(pd.read_csv(args.sweep_dir / "trials.csv", dtype={"trial_id": str}),
                                  pd.read_csv(args.out, dtype={"trial_id": str}), rung_tasks(plan["asha"]),
                                  int(plan["resolved_base_config"]["tasks"]))
        text = json.dumps(summary, indent=2, default=float)
        args.out.with_name(args.out.stem + "_summary.json").write_text(text + "\n")
        print(text)
        return 0
    trials, configs, seed = trial_configs(args.sweep_dir)
    env = dict(os.environ, **({"PYTHONPATH": str(args.code)} if args.code else {}))
    ranks = json.loads(subprocess.run([sys.executable, "-c", TIE_RANK_CODE], input=json.dumps(configs), env=env,
                                      capture_output=True, text=True, check=True).stdout)
    chosen = [i for i, row in trials.iterrows() if args.only is None or row["trial_status"] == args.only]
    if args.records is not None:
        found = {p.stem.removeprefix("ref_") for p in args.records.glob("ref_*.json")}
        chosen = [i for i in chosen if trials.loc[i, "trial_id"] in found]
        work = args.records.parent
    else:
        work = Path(tempfile.mkdtemp(prefix="asha_reference_"))
        (work / "records").mkdir()

    def job(i: int) -> dict[str, Any]:
        name = f"ref_{trials.loc[i, 'trial_id']}"
        cfg_file = work / f"{name}.cfg.json"
        cfg_file.write_text(json.dumps({k: v for k, v in configs[i].items()
                                        if k not in ("data_dir", "pretrained_conv")}))
        cmd = ["nice", "-n", "10", sys.executable, "-m", "tune_bir.train", "--config", str(cfg_file),
               "--seed", str(seed), "--threads", "1", "--run-name", name, "--results-dir", str(work / "records")]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        print(f"done {name}", flush=True)
        return _record(work, name)

    if args.records is not None:
        records = {i: _record(work, f"ref_{trials.loc[i, 'trial_id']}") for i in chosen}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            records = dict(zip(chosen, pool.map(job, chosen), strict=True))
    rows = []
    for i, record in records.items():
        row: dict[str, Any] = {"trial_id": trials.loc[i, "trial_id"], "trial_status": trials.loc[i, "trial_status"],
                               "baseline": bool(trials.loc[i, "baseline"]),
                               "tasks_reached": int(trials.loc[i, "tasks_reached"]), "tie_rank": ranks[i],
                               "git_commit": record["git_commit"]}
        for t, m in enumerate(record["metrics_per_task"], start=1):
            row[f"val_acc_avg_after_task_{t}"] = m["val_acc_avg"]
            row[f"val_prob_avg_after_task_{t}"] = m["val_prob_avg"]
            row[f"acc_avg_after_task_{t}"] = m["acc_avg"]
            # ASHA's key, as trainables/bir.py computes it (TIE_BREAK_WEIGHT, EXACT_TIE_WEIGHT)
            row[f"val_score_after_task_{t}"] = m["val_acc_avg"] + 1e-9 * m["val_prob_avg"] + 1e-13 * ranks[i]
        reached = row["tasks_reached"]
        row["reproduces_sweep"] = all(
            row[f"{key}_after_task_{t}"] == trials.loc[i, f"{key}_after_task_{t}"]
            for t in range(1, reached + 1) for key in ("val_acc_avg", "acc_avg"))
        rows.append(row)
    out = pd.DataFrame(rows)
    if args.out.exists():   # a second call (e.g. the completed trials) adds its rows
        out = pd.concat([pd.read_csv(args.out, dtype={"trial_id": str}), out]).drop_duplicates("trial_id", keep="last")
    out.sort_values("trial_id").to_csv(args.out, index=False)
    print(f"{len(rows)} trials -> {args.out}; reproduce the sweep's numbers: {int(out['reproduces_sweep'].sum())}"
          f" of {len(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
