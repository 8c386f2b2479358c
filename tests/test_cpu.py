"""CPU threads of the command lines on shared cores (tune_bir.cpu): passive OpenMP waits set before torch loads,
a fair share of threads by default, `--threads` and $OMP_NUM_THREADS obeyed. Speed itself is measured by
benchmarks/shared_cores.py, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_bir import cpu

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True, text=True,
                          timeout=120, check=True).stdout.strip()


# Loaded first by a child's interpreter (sitecustomize, on PYTHONPATH): notes OMP_WAIT_POLICY as it is when torch
# starts to load, i.e. what OpenMP will read, then gets out of the way.
_WATCH_TORCH_IMPORT = """
import importlib.abc, os, sys

class _FirstTorchImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            with open(os.environ["TORCH_IMPORT_NOTE"], "w") as note:
                note.write(str(os.environ.get("OMP_WAIT_POLICY")))
        return None

sys.meta_path.insert(0, _FirstTorchImport())
"""


@pytest.mark.parametrize("command", [["tune_bir.train", "--iters=-1"],
                                     ["tune_bir.sweep", "--iters", "-1", "--num-cpus", "1"],
                                     ["tune_bir.pretrain", "--epochs", "0"]],
                         ids=lambda c: c[0])
def test_every_command_line_sets_the_wait_policy_before_torch_loads(tmp_path, command):
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it, and a command's imports load torch (its config class
    # is built from the plugins): the policy must already be set then. Each command is refused (exit 2) after it
    # has loaded torch to build its config.
    (tmp_path / "sitecustomize.py").write_text(_WATCH_TORCH_IMPORT)
    note = tmp_path / "note"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean | {"PYTHONPATH": str(tmp_path), "TORCH_IMPORT_NOTE": str(note)})
    assert done.returncode == 2, done.stderr
    assert note.read_text() == "PASSIVE"


def test_importing_the_package_as_a_library_sets_no_wait_policy():
    assert _python("import os, tune_bir.train; print(os.environ.get('OMP_WAIT_POLICY'))"
                   ) == "None"


def test_a_wait_policy_the_user_set_wins_and_nothing_changes_once_torch_is_loaded():
    assert _python("import tune_bir.cpu as c, os; c.quiet_waits(); print(os.environ['OMP_WAIT_POLICY'])",
                   OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _python("import torch, tune_bir.cpu as c, os; c.quiet_waits(); print(os.environ.get('OMP_WAIT_POLICY'))"
                   ) == "None"


def test_the_fair_share_is_omp_num_threads_else_half_the_usable_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 16)
    assert cpu.fair_share() == 8
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 1)
    assert cpu.fair_share() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.fair_share() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cpu.fair_share() == 1


def test_cpu_threads_sets_and_restores_torchs_thread_count():
    before = torch.get_num_threads()
    with cpu.cpu_threads(1) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("flags", "env", "expected"), [([], {}, max(1, len(os.sched_getaffinity(0)) // 2)),
                                                       (["--threads=3"], {}, 3),
                                                       ([], {"OMP_NUM_THREADS": "1"}, 1)])
def test_a_train_run_uses_the_threads_it_reports(tmp_path, flags, env, expected):
    code = ("import sys, torch, tune_bir.train as t; code = t.main(sys.argv[1:]); "
            "print('threads', torch.get_num_threads()); sys.exit(code)")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, "--iters=2", "--tasks=2", f"--results-dir={tmp_path}",
                          "--run-name=r", *flags], cwd=ROOT, env=clean | env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert f"on cpu ({expected} CPU thread" in out
    assert json.loads((tmp_path / "r.json").read_text())["cpu_threads"] == expected
    assert out.strip().splitlines()[-1] == f"threads {_torch_default(env)}"   # restored after the run


def _torch_default(env: dict[str, str]) -> int:
    """torch's own thread count in a fresh process with env: main() restores it after the run."""
    return int(_python("import torch; print(torch.get_num_threads())", **env))


def test_negative_threads_are_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tune_bir.train", "--threads=-1", f"--results-dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--threads must be >= 0" in result.stderr
