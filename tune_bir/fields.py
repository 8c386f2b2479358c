"""Config fields as the user sees them: their declaration by a plugin (`Field`), their command-line spelling and
the value checks shared by the config (`tune_bir.config`) and the plugin registry (`tune_bir.terms`), which both
sit on this module. Nothing here imports torch."""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass
from dataclasses import field as _dataclass_field
from typing import Any

from tune_bir.errors import ConfigError

# Fields whose flag is not their name's spelling (`--lambda` is a Python keyword, so `ewc_lambda`, the original
# code's `dest`): filled from the `flag` of each registered plugin's declarations (`tune_bir.plugin.register`)
FLAG_ALIASES: dict[str, str] = {}

_declared = itertools.count()   # declaration order of every Field of the process (BIRConfig lists them so)


@dataclass(frozen=True)
class Field:
    """One config field as a plugin declares it, once: `BIRConfig`'s field, its CLI flag, its type and choice
    validation and its range check are all derived from it (`tune_bir.config.make_config_class`).

    type: bool, int, float or str, or one of them `| None` (None: take a default resolved later);
    choices: the only values allowed (a tuple of strings), None for any value of the type;
    minimum / maximum: the range of a number, each bound included unless `*_inclusive=False` (None: no bound);
    flag: the command-line flag when it is not `--` + the name with dashes (`--lambda` for `ewc_lambda`).
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    minimum_inclusive: bool = True
    maximum: float | None = None
    maximum_inclusive: bool = True
    flag: str | None = None
    order: int = _dataclass_field(default_factory=lambda: next(_declared), compare=False, repr=False)

    @classmethod
    def switch(cls, name: str, help: str) -> Field:
        """The bool field that turns a plugin on: off by default."""
        return cls(name, bool, False, help)

    @classmethod
    def weight(cls, name: str, default: float, help: str, flag: str | None = None) -> Field:
        """The float field weighting a plugin: any finite number >= 0 (0 leaves the learner as without it)."""
        return cls(name, float, default, help, minimum=0.0, flag=flag)

    @property
    def kind(self) -> type:
        """The value type without its `None`: bool, int, float or str."""
        return value_type(self.type)[0]

    @property
    def optional(self) -> bool:
        """None is a valid value (resolved to a default later)."""
        return value_type(self.type)[1]

    def metadata(self) -> dict[str, Any]:
        """What `BIRConfig`'s dataclass field carries: the CLI help and the choices."""
        return {"help": self.help, **({"choices": self.choices} if self.choices is not None else {})}

    def check(self, value: Any) -> None:
        """A one-line ConfigError if `value` is outside the declared range (an int field: a Python int too)."""
        if value is None and self.optional:
            return
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{flag_name(self.name)} must be an integer, got {value!r}")
        if self.minimum is None and self.maximum is None:
            return
        low, high = self.minimum, self.maximum
        bad = value is None or not math.isfinite(value)
        bad = bad or (low is not None and (value < low or (value == low and not self.minimum_inclusive)))
        bad = bad or (high is not None and (value > high or (value == high and not self.maximum_inclusive)))
        if bad:
            raise ConfigError(f"{flag_name(self.name)} must be {self.rule()}, got {value}")

    def rule(self) -> str:
        """The range in words: `>= 0`, `> 0`, `in [0, 1)`."""
        low, high = self.minimum, self.maximum
        if high is None:
            return f"{'>=' if self.minimum_inclusive else '>'} {low:g}"
        if low is None:
            return f"{'<=' if self.maximum_inclusive else '<'} {high:g}"
        return f"in {'[' if self.minimum_inclusive else '('}{low:g}, {high:g}{']' if self.maximum_inclusive else ')'}"


def value_type(hint: Any) -> tuple[type, bool]:
    """A field's type hint as its value type without `None` (bool, int, float or str) and whether None is allowed:
    `float | None` -> (float, True), `int` -> (int, False)."""
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint), type(None) in args


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
