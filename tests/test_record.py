"""Provenance: the git commit a run records says when the code differed from that commit."""

from __future__ import annotations

import subprocess

from tune_bir.record import git_commit


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
