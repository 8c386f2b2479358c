"""The node-local cache folder the trials of a machine share, and the two things every cache file needs:
a key that names exactly what the file depends on, and a write that readers never see half done.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_DIR_ENV = "TUNE_BIR_CACHE_DIR"


def cache_dir() -> Path:
    """`$TUNE_BIR_CACHE_DIR`, else a per-user folder in the node's temporary directory."""
    configured = os.environ.get(CACHE_DIR_ENV)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"tune_bir-cache-{uid}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(*sources: bytes) -> str:
    """Short digest of code (file contents, versions): a cache file written by other code is never read."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(len(source).to_bytes(8, "little"))  # length-prefixed: no two splits hash alike
        digest.update(source)
    return digest.hexdigest()[:16]


# (resolved path, size, mtime_ns) -> sha256 of the content: a file is hashed once per process and version
_content_digests: dict[tuple[str, int, int], str] = {}


def content_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes (None when there is no such file), computed once per process for each
    (path, size, modification time): a cache keyed by it misses when the file is rewritten in place."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _content_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _content_digests[memo] = digest.hexdigest()
    return _content_digests[memo]


def cache_key(parts: dict[str, Any]) -> str:
    """Short digest of everything a cached object depends on (JSON-able values; others by str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a process-private file, then rename: readers see the old file or the whole new one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
