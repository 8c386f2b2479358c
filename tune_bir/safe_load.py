"""`torch.load` that never runs code from a file, and turns every unreadable file into one line.

Every torch file this project reads goes through `load_torch_file`: `weights_only=True` (tensors, numbers,
strings, lists, tuples, dicts; a foreign pickle is refused before any of its code runs), an optional CRC
check of the zip archive `torch.save` writes (torch itself reads a damaged tensor silently), and a
`ConfigError` naming the file and what is wrong with it: missing, empty, truncated, corrupt, not a torch
file, or holding Python objects. The original research code's files (the legacy, non-zip format) load too.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from tune_bir.errors import ConfigError


def _reason(err: BaseException) -> str:
    """What a torch.load error says about the file, in a few words."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return (f"it holds Python objects ({found.group(1)}), not only tensors, numbers, strings and "
                    f"containers; refused (loading it would run code from the file)")
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = f": {found.group(1).strip()[:80]}" if found else ""
        return f"it is not a file torch.save wrote (another pickle or other bytes{detail}); refused unread"
    if isinstance(err, EOFError):
        return "it ends early (truncated)"
    if "failed finding central directory" in text or "zip archive" in text:
        return "it is truncated or corrupt (its zip archive cannot be read)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is not a file torch.save wrote, or it is corrupt ({type(err).__name__}: {first[:120]})"


def load_torch_file(path: str | Path, what: str, *, map_location: Any = None, verify: bool = False,
                    mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)`; `verify` checks the CRC of every member of a zip-format file
    first (one extra read of the file). Raises ConfigError: "<what> <path> cannot be loaded: <reason>"."""
    path = Path(path)

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{what} {path} cannot be loaded: {reason}")

    if not path.is_file():
        raise refuse("no such file")
    if path.stat().st_size == 0:
        raise refuse("the file is empty")
    if verify and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise refuse(f"it is truncated or corrupt ({err})") from err
        if bad is not None:
            raise refuse(f"it is corrupt (checksum mismatch in {bad})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler trips on, the file is the problem
        raise refuse(_reason(err)) from err
