"""Runs that share cores: one `python -m tune_bir.train` alone against two started together, and a 1-thread
worker (what a Ray trial gets) alone against the same worker beside a default run.

Every number is the wall time of real command-line runs (start to exit, imports and data included), all
measured in one run of this script; the ratios are what to read (a shared machine's speed drifts, so the
run alone is timed first and last). Children get this process's environment minus every OpenMP/MKL
thread setting, i.e. the defaults a user gets. It prints numbers; it asserts nothing about time.

    .venv/bin/python benchmarks/shared_cores.py                 # --iters 100 on every CPU of this process
    .venv/bin/python benchmarks/shared_cores.py --cpus 0,1      # pinned to 2 cores (a small machine on a big one)
    .venv/bin/python benchmarks/shared_cores.py --before        # also the settings before tune_bir.cpu existed
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_SETTINGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME")
# the command line as it was before tune_bir.cpu: no OMP_WAIT_POLICY (OpenMP's spinning default) and one
# thread per core (torch's default); the rest is the real `python -m tune_bir.train`
BEFORE = "import runpy; runpy.run_module('tune_bir.train', run_name='__main__', alter_sys=True)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=100, help="iterations per task of each run (default: 100)")
    p.add_argument("--tasks", type=int, default=5, help="tasks of each run (default: 5)")
    p.add_argument("--cpus", default="", help="pin every run to these CPUs, e.g. 0,1 (default: this process's)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every scenario; medians (default: 1)")
    p.add_argument("--before", action="store_true",
                   help="also time the settings before tune_bir.cpu (spinning waits, one thread per core)")
    return p.parse_args(argv)


@dataclass
class Run:
    label: str
    env: dict[str, str]
    argv: list[str]


def train_command(iters: int, tasks: int, results: Path, name: str) -> list[str]:
    return ["--replay=generative", "--brain-inspired", "--si", "--c=0.1", f"--iters={iters}", f"--tasks={tasks}",
            f"--results-dir={results}", f"--run-name={name}"]


def run_together(runs: list[Run], cpus: set[int] | None) -> list[float]:
    """Start every run at once; the wall time of each (start to exit)."""
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    start = time.perf_counter()
    procs = [subprocess.Popen(run.argv, env=run.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=pin, start_new_session=True) for run in runs]
    walls = [0.0] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                walls[i] = time.perf_counter() - start
                pending.discard(i)
        time.sleep(0.05)
    for run, proc in zip(runs, procs, strict=True):
        out, err = proc.communicate()
        if proc.returncode != 0 or "acc_avg=" not in out:
            sys.exit(f"{run.label} failed (exit {proc.returncode}):\n{err[-2000:]}")
    return walls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = {int(c) for c in args.cpus.split(",") if c.strip()} or None
    n_cpus = len(cpus) if cpus else len(os.sched_getaffinity(0))
    base_env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    results = Path(tempfile.mkdtemp(prefix="shared_cores-"))
    counter = iter(range(10**6))

    def run(label: str, extra_env: dict[str, str] | None = None, before: bool = False, all_cores: bool = False,
            ) -> Run:
        head = [sys.executable, "-c", BEFORE] if before else [sys.executable, "-m", "tune_bir.train"]
        flags = train_command(args.iters, args.tasks, results, f"{label}-{next(counter)}")
        flags += [f"--threads={n_cpus}"] if before or all_cores else []
        return Run(label, base_env | (extra_env or {}), head + flags)

    def worker() -> Run:
        return run("worker", {"OMP_NUM_THREADS": "1"})

    # name -> (what it runs, which run's wall time counts: None = until all have exited)
    scenarios: dict[str, tuple] = {
        "one run alone (default settings)": (lambda: [run("default")], 0),
        f"one run alone, --threads={n_cpus}": (lambda: [run("all-cores", all_cores=True)], 0),
        "two runs started together": (lambda: [run("default"), run("default")], None),
        "1-thread worker alone": (lambda: [worker()], 0),
        "1-thread worker beside a default run": (lambda: [worker(), run("default")], 0),
    }
    if args.before:
        scenarios |= {
            "before: one run alone": (lambda: [run("before", before=True)], 0),
            "before: two runs started together": (lambda: [run("before", before=True), run("before", before=True)],
                                                  None),
            "before: 1-thread worker beside a run": (lambda: [worker(), run("before", before=True)], 0),
        }
    print(f"python -m tune_bir.train, BI-R+SI on splitMNIST5k, {args.tasks} tasks x {args.iters} iterations, "
          f"on {n_cpus} CPU(s){' ' + args.cpus if cpus else ''}, each run in a session of its own; wall time "
          f"of a run, start to exit; median of {args.repeats} round(s); load average before: "
          f"{os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {name: [] for name in scenarios}
    for round_ in range(args.repeats):   # rounds: a drifting machine slows every scenario alike
        for name, (build, which) in scenarios.items():
            walls = run_together(build(), cpus)
            times[name].append(max(walls) if which is None else walls[which])
            print(f"    round {round_ + 1}: {name:<40} {times[name][-1]:7.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        spread = f"  ({', '.join(f'{v:.1f}' for v in times[name])})" if args.repeats > 1 else ""
        print(f"  {name:<40} {value:7.1f} s{spread}")
    alone, worker_alone = median["one run alone (default settings)"], median["1-thread worker alone"]
    share = max(1.0, 2 / n_cpus)   # two processes on n_cpus cores: the worker's share is n_cpus/2 cores, it uses 1
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    print(f"two together / one alone: {median['two runs started together'] / alone:.2f}x   (goal: <= 1.5x; one "
          f"after the other: 2.0x)")
    beside = median["1-thread worker beside a default run"]
    print(f"worker beside a default run / worker alone: {beside / worker_alone:.2f}x   (its share allows "
          f"{share:.2f}x: it uses 1 thread, and half of {n_cpus} CPU(s) is >= 1)")
    print(f"one run alone, default threads / every core: {alone / median[f'one run alone, --threads={n_cpus}']:.2f}x"
          f"   (what the fair share costs a run that has the machine to itself)")
    if args.before:
        print(f"before tune_bir.cpu: one alone {median['before: one run alone'] / alone:.2f}x and two together "
              f"{median['before: two runs started together'] / alone:.2f}x today's run alone; the worker beside "
              f"such a run {median['before: 1-thread worker beside a run'] / worker_alone:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
