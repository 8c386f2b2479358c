"""CPU threads of a command-line run whose cores other processes may share.

Left alone, every torch process starts one OpenMP thread per core, and OpenMP threads that wait at the end of
a parallel region spin for a while before they sleep. Two runs on a 2-core machine then keep 4 threads busy
on 2 cores, each spinning thread burns the time slice its partner needs, and both runs take many times
longer than one alone. The command lines therefore (1) set `OMP_WAIT_POLICY=PASSIVE` before torch loads
OpenMP (waiting threads sleep at once; a value the user set wins; `tune_bir/__init__.py` does it for every
`python -m` command line, the one point that runs before a command's imports) and (2) train with `--threads`
threads, by default a fair share of the cores: `$OMP_NUM_THREADS` when set (a Ray trial's worker gets 1), else half the
usable cores, at least 1. `benchmarks/shared_cores.py` measures what this buys (README "Benchmarks").
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows
        return os.cpu_count() or 1


def fair_share() -> int:
    """The default thread count: `$OMP_NUM_THREADS` when it is a positive integer, else half the usable cores
    (at least 1): a run alone loses little (the fc networks gain little from a second thread), two runs
    on the same cores no longer oversubscribe them."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, usable_cpus() // 2)


def quiet_waits() -> None:
    """OpenMP threads that wait sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE` unless set). OpenMP reads
    it once, when torch loads it: call this before torch is imported (it does nothing afterwards)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads inside the block: `threads`, or the fair share when None or 0; restored after
    (a caller that runs a command line in its own process keeps its setting)."""
    import torch

    before = torch.get_num_threads()
    chosen = threads or fair_share()
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
