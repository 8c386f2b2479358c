"""A sweep under load: many trials, more running at once than there are cores; wall time and peak memory.

Runs `python -m tune_bir.sweep` as a child process (its own session, a fresh local Ray), samples the
resident memory of the driver and of every process it started (Ray's daemons and trial workers) with
psutil, and checks afterwards that every trial is in `results.csv` and is one MLflow child run with a
final `trial_status`. It prints numbers; it asserts nothing about time.

    .venv/bin/python benchmarks/sweep_load.py                       # 40 trials, 4 at once, 2 CPUs
    .venv/bin/python benchmarks/sweep_load.py --trials 80 --max-concurrent 8 --iters 20
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import psutil
except ImportError:   # Ray ships its own copy (ray/thirdparty_files), on sys.path once ray is imported
    importlib.import_module("ray")
    psutil = importlib.import_module("psutil")

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40, help="--num-samples of the sweep (default: 40)")
    p.add_argument("--max-concurrent", type=int, default=4, help="trials at once (default: 4)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default: 2)")
    p.add_argument("--iters", type=int, default=8, help="iterations per task (default: 8)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples (default: 0.5)")
    p.add_argument("--out", help="folder for the sweep and its MLflow store (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default: 3600)")
    return p.parse_args(argv)


class MemorySampler:
    """Peak RSS of a process and of every process below it, sampled periodically."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.peak_driver = self.peak_total = self.peak_workers = self.peak_one_worker = self.peak_pss = 0
        self.peak_processes = 0
        self.worker_pids: set[int] = set()
        self.seen: set[int] = set()

    def sample(self) -> None:
        try:
            driver = self.root.memory_info().rss
            pss = _pss(self.root)
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        total, workers = driver, 0
        for child in children:
            try:
                rss, name = child.memory_info().rss, child.name()
                cmd = " ".join(child.cmdline()[:1])
                pss += _pss(child)
            except psutil.Error:
                continue
            self.seen.add(child.pid)
            total += rss
            if name.startswith("ray::") or cmd.startswith("ray::"):   # trial workers (and idle ones)
                workers += rss
                self.worker_pids.add(child.pid)
                self.peak_one_worker = max(self.peak_one_worker, rss)
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_total = max(self.peak_total, total)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_processes = max(self.peak_processes, len(children) + 1)


def _pss(proc: psutil.Process) -> int:
    """Proportional set size (shared pages split among their users; Linux), else RSS."""
    try:
        return proc.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return proc.memory_info().rss


def session_processes(session_id: int) -> list[psutil.Process]:
    """Live processes of the sweep's session: the ones the benchmark's child started."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def stop_leftovers(session_id: int) -> int:
    procs = session_processes(session_id)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


def mlflow_children(tracking_uri: str, sweep_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    plan = json.loads((sweep_dir / "sweep.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri).search_runs(
        [plan["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{plan['parent_run_id']}'",
        max_results=10000)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep_load-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    name = f"load-{int(time.time())}"
    cmd = [sys.executable, "-m", "tune_bir.sweep", "--iters", str(args.iters), "--batch", str(args.batch),
           "--num-samples", str(args.trials), "--max-concurrent", str(args.max_concurrent),
           "--cpus-per-trial", f"{args.num_cpus / args.max_concurrent:g}", "--num-cpus", str(args.num_cpus),
           "--storage-path", str(out / "rr"), "--name", name, "--mlflow-uri", uri]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_BIR_CACHE_DIR": str(out / "cache"),
           "PYTHONPATH": str(ROOT)}
    print(f"cores: {os.cpu_count()}, trials: {args.trials}, max concurrent: {args.max_concurrent} "
          f"({args.num_cpus / args.max_concurrent:g} CPU each on a {args.num_cpus}-CPU Ray), iters/task: {args.iters}")
    print("running:", " ".join(cmd[1:]))
    start = time.monotonic()
    log = open(out / "sweep.log", "w")   # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = MemorySampler(psutil.Process(proc.pid))
    try:
        while proc.poll() is None:
            sampler.sample()
            if time.monotonic() - start > args.timeout:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
                break
            time.sleep(args.interval)
    finally:
        wall = time.monotonic() - start
        log.close()
        left = stop_leftovers(proc.pid)
    code = proc.returncode
    sweep_dir = out / "rr" / name
    rows = []
    if (sweep_dir / "results.csv").exists():
        with open(sweep_dir / "results.csv") as f:
            rows = list(csv.DictReader(f))
    runs = mlflow_children(uri, sweep_dir) if (sweep_dir / "sweep.json").exists() else []
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    ended = [r for r in runs if r.info.status != "RUNNING" and "trial_status" in r.data.tags]
    run_ids = {r.data.tags.get("trial_id") for r in runs}
    print(f"exit code: {code}; log: {out / 'sweep.log'}")
    print(f"wall time: {wall:.1f} s ({wall / max(args.trials, 1):.2f} s per trial)")
    print(f"peak RSS: driver {sampler.peak_driver / MB:.0f} MB, driver + every process it started "
          f"{sampler.peak_total / MB:.0f} MB, Ray workers together {sampler.peak_workers / MB:.0f} MB, "
          f"one worker {sampler.peak_one_worker / MB:.0f} MB (RSS counts shared pages, e.g. torch's libraries, once "
          f"per process); peak PSS of them all {sampler.peak_pss / MB:.0f} MB (shared pages split)")
    print(f"processes: at most {sampler.peak_processes} at once, {len(sampler.worker_pids)} distinct Ray workers, "
          f"{left} left running after the driver exited (stopped)")
    print(f"results.csv: {len(rows)} rows ({', '.join(f'{v} {k}' for k, v in sorted(statuses.items()))}); "
          f"MLflow: {len(runs)} child runs, {len(ended)} ended with trial_status, {len(run_ids)} distinct trial ids")
    ok = code == 0 and len(rows) == args.trials and len(runs) == args.trials == len(ended) == len(run_ids)
    ok = ok and {r["trial_id"] for r in rows} == run_ids
    print("counts:", "OK (every trial in results.csv and once in MLflow)" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
