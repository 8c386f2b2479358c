"""Config fields as the user sees them: their command-line spelling and the value checks shared by the
config (`tune_bir.config`) and the term registry (`tune_bir.terms`), which both sit on this module."""

from __future__ import annotations

import math
from typing import Any

from tune_bir.errors import ConfigError

# Fields whose flag is not their name's spelling: `--lambda` is a Python keyword, so the original code's `dest`
FLAG_ALIASES = {"ewc_lambda": "--lambda"}


def flag_name(name: str) -> str:
    """The command-line flag of a config field: `lamda_rep` -> `--lamda-rep` (the original code's spelling)."""
    return FLAG_ALIASES.get(name) or "--" + name.replace("_", "-")


def field_name(flag: str) -> str:
    """The config field of a command-line flag: `--lamda-rep` -> `lamda_rep` (inverse of `flag_name`)."""
    aliased = {v: k for k, v in FLAG_ALIASES.items()}
    return aliased.get(flag) or flag.removeprefix("--").replace("-", "_")


def check_positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    """Each named field of `cfg` is a finite number > 0 (>= 0 with allow_zero)."""
    for name in names:
        value = getattr(cfg, name)
        bad = value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
        if bad:
            rule = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{flag_name(name)} must be {rule}, got {value}")


def check_integer(cfg: Any, *names: str) -> None:
    """Each named field of `cfg` is an int (not a bool)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{flag_name(name)} must be an integer, got {value!r}")


def check_creatable_folder(path: str, flag: str, error: type[Exception] = ConfigError) -> None:
    """`path` is a folder that exists or can be made: its nearest existing ancestor is a writable folder."""
    import os
    from pathlib import Path

    existing = Path(path).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{flag} {path}: {existing} is not writable; choose another {flag}")
