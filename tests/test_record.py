"""Provenance: the git commit a run records says when the code differed from that commit; the CPU fingerprint
says what computed it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from tune_bir.record import FINGERPRINT_FIELDS, cpu_fingerprint, git_commit


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_the_recorded_commit_is_marked_dirty_when_tracked_files_changed(tmp_path):
    assert git_commit(tmp_path) is None                       # not a checkout
    _git(tmp_path, "init", "-q")
    assert git_commit(tmp_path) is None                       # a checkout without a commit
    (tmp_path / "engine.py").write_text("x = 1\n")
    _git(tmp_path, "add", "engine.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked files do not change the code that ran\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "engine.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_the_cpu_fingerprint_names_what_computes_a_run_and_draws_no_random_numbers(capfd):
    state = torch.get_rng_state()
    fingerprint = cpu_fingerprint(3)
    assert tuple(fingerprint) == FINGERPRINT_FIELDS
    assert all(value is None or isinstance(value, str | int) for value in fingerprint.values())   # flat
    assert fingerprint["threads"] == 3 and cpu_fingerprint()["threads"] == torch.get_num_threads()
    assert fingerprint["cpu_isa_torch"] == torch.backends.cpu.get_cpu_capability()
    assert fingerprint["torch_version"] == torch.__version__
    if torch.backends.mkl.is_available():
        assert fingerprint["cpu_isa_mkl"] and fingerprint["mkl_cbwr"] and fingerprint["mkl_version"][:2] == "20"
    if torch.backends.mkldnn.is_available():
        assert fingerprint["cpu_isa_onednn"] and fingerprint["onednn_version"][0].isdigit()
    assert torch.equal(torch.get_rng_state(), state)
    assert capfd.readouterr().out == ""   # the libraries' banners are read, not shown


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction-set caps")
def test_the_cpu_fingerprint_sees_instruction_set_caps_and_mkl_reproducibility_mode():
    env = os.environ | {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
    code = "import json; from tune_bir.record import cpu_fingerprint; print(json.dumps(cpu_fingerprint()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    fingerprint = json.loads(out)
    assert fingerprint["cpu_isa_torch"] == "DEFAULT"
    if torch.backends.mkldnn.is_available():
        assert fingerprint["cpu_isa_onednn"] == "Intel SSE4.1"
    if torch.backends.mkl.is_available():
        assert fingerprint["mkl_cbwr"] == "COMPATIBLE"
