"""Named search spaces of the exaggeration hyper-parameters, and user spaces from YAML files.

A space file is plain data (see `repulsion.yaml` beside this file):

    description: one line shown in sweep.json
    fixed:                      # config fields set in every searched trial (switches a mechanism on)
      repulsion: true
    params:                     # config fields sampled per trial, in this order
      lamda_rep: {loguniform: [1.0e-2, 1.0e+8]}
      kl_js: {choice: [kl, js]}
      use_rep_f: {choice: [false, true]}
      rep_f: {loguniform: [1.5, 100.0], when: {use_rep_f: true}}   # only sampled when the gate is on
      n_rep: {int: [1, 4]}
    include: [recon]            # optional: merge other named spaces in

Distributions: `loguniform`, `uniform`, `int`, `logint` take [low, high]; `choice` takes a list.
Every name is a `BIRConfig` field (the snake_case of its train CLI flag). Errors are `ConfigError`s
with a one-line message. This module imports neither Ray nor Optuna: `SearchSpace.sample()` takes
anything with Optuna's `suggest_*` methods.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.fields import flag_name
from tune_bir.terms import exaggeration_off

SPACES_DIR = Path(__file__).resolve().parent
# every YAML file beside this module is a named space (`--space NAME`), in a fixed order
NAMED_SPACES = tuple(sorted(path.stem for path in SPACES_DIR.glob("*.yaml")))
DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice")



class _ExaggerationOff(Mapping):
    """A live view of `tune_bir.terms.exaggeration_off()`: every registered term counts, also one
    registered after this module was imported."""

    def __getitem__(self, key: str) -> bool:
        return exaggeration_off()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(exaggeration_off())

    def __len__(self) -> int:
        return len(exaggeration_off())

    def __repr__(self) -> str:
        return repr(exaggeration_off())


# The baseline of a sweep: its base config with every exaggeration mechanism (and the options that
# only exist with one of them) off (docs/sweep.md "What a sweep runs"), derived from the term registry.
EXAGGERATION_OFF: Mapping[str, bool] = _ExaggerationOff()


@dataclass(frozen=True)
class Param:
    """One sampled config field: its distribution and the condition under which it is sampled."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial: Any) -> Any:
        """Draw a value through an Optuna-like trial (`suggest_float` / `suggest_int` / `suggest_categorical`)."""
        if self.distribution == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.distribution in ("int", "logint"):
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.distribution == "logint")
        return trial.suggest_float(self.name, float(self.low), float(self.high),
                                   log=self.distribution == "loguniform")

    def extremes(self) -> list[Any]:
        """The values that bound what the distribution can produce (validated against BIRConfig)."""
        return list(self.choices) if self.distribution == "choice" else [self.low, self.high]

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) == v for k, v in self.when.items())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"distribution": self.distribution}
        if self.distribution == "choice":
            out["choices"] = list(self.choices)
        else:
            out |= {"low": self.low, "high": self.high}
        if self.when:
            out["when"] = dict(self.when)
        return out


@dataclass(frozen=True)
class SearchSpace:
    """A named set of sampled parameters plus the fixed fields that switch their mechanism on."""

    name: str
    description: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    source: str

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial: Any) -> dict[str, Any]:
        """One trial's values: conditional parameters only where their condition holds, plus `fixed`."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return {**self.fixed, **values}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "fixed": dict(self.fixed), "params": {p.name: p.to_dict() for p in self.params}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        """The space `to_dict()` wrote (e.g. into a sweep's sweep.json), as it was when the sweep began."""
        params = tuple(Param(name, spec["distribution"], spec.get("low"), spec.get("high"),
                             tuple(spec.get("choices", ())), dict(spec.get("when", {})))
                       for name, spec in data["params"].items())
        return cls(name=data["name"], description=data["description"], fixed=dict(data["fixed"]),
                   params=params, source=data["source"])

    def validate_against(self, base: dict[str, Any]) -> None:
        """Every bound of every parameter, with the space's switches on, gives a valid config."""
        clash = sorted(set(self.param_names) & set(base))
        clash += sorted(k for k, v in self.fixed.items() if k in base and base[k] != v)
        if clash:
            raise ConfigError(f"space {self.name} sets {clash[0]} itself; remove "
                              f"{flag_name(clash[0])} from the base config")
        try:
            BIRConfig.from_dict({**base, **self.fixed}).resolved()
        except ConfigError as err:
            raise ConfigError(f"space {self.name}: its fixed values do not fit the base config: {err}") from err
        for param in self.params:
            for value in param.extremes():
                try:
                    BIRConfig.from_dict({**base, **self.fixed, **param.when, param.name: value}).resolved()
                except (ConfigError, TypeError) as err:
                    raise ConfigError(f"space {self.name}: {param.name}={value!r} is not a valid value: "
                                      f"{err}") from err


def load_space(name_or_path: str) -> SearchSpace:
    """A named space (`NAMED_SPACES`: the YAML files beside this module) or a YAML file; raises ConfigError."""
    path = Path(name_or_path).expanduser()
    if name_or_path in NAMED_SPACES:
        return _load_file(SPACES_DIR / f"{name_or_path}.yaml", name_or_path, seen=())
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"search space {path} is a folder, not a file: give the YAML file inside it")
        if not path.is_file():
            raise ConfigError(f"search space file not found: {path}")
        return _load_file(path.resolve(), path.stem, seen=())
    raise ConfigError(f"unknown search space {name_or_path!r}; named spaces: {', '.join(NAMED_SPACES)} "
                      "(or a YAML file)")


def _load_file(path: Path, name: str, seen: tuple[str, ...]) -> SearchSpace:
    where = f"search space {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where} is not valid YAML{line}: {problem}") from err
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with 'params' (and optional 'fixed', 'include', "
                          "'description')")
    unknown_keys = sorted(set(data) - {"params", "fixed", "include", "description"})
    if unknown_keys:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown_keys)}; expected params, fixed, "
                          "include, description")
    fields = set(BIRConfig.field_names())
    fixed: dict[str, Any] = {}
    params: list[Param] = []
    includes = data.get("include") or []
    if not isinstance(includes, list):
        raise ConfigError(f"{where}: 'include' must be a list of space names")
    for included in includes:
        if included not in NAMED_SPACES or included in seen or included == name:
            raise ConfigError(f"{where}: cannot include {included!r} (named spaces: {', '.join(NAMED_SPACES)}, "
                              "no cycles)")
        sub = _load_file(SPACES_DIR / f"{included}.yaml", included, seen=(*seen, name))
        fixed |= sub.fixed
        params += [p for p in sub.params if p.name not in {q.name for q in params}]
    raw_fixed = data.get("fixed") or {}
    if not isinstance(raw_fixed, dict):
        raise ConfigError(f"{where}: 'fixed' must be a mapping of config fields to values")
    for key, value in raw_fixed.items():
        _check_field(where, key, fields)
        fixed[key] = value
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ConfigError(f"{where}: 'params' must be a mapping of config fields to distributions")
    for key, spec in raw_params.items():
        _check_field(where, key, fields)
        param = _parse_param(where, key, spec)
        params = [p for p in params if p.name != key] + [param]
    if not params:
        raise ConfigError(f"{where} has no parameters to search")
    names = [p.name for p in params]
    for i, param in enumerate(params):
        if param.name in fixed:
            raise ConfigError(f"{where}: {param.name} is both fixed and searched")
        for cond, value in param.when.items():
            if cond not in names[:i]:
                raise ConfigError(f"{where}: {param.name} is conditional on {cond!r}, which must be a "
                                  "parameter listed before it")
            source = params[names.index(cond)]
            if source.distribution != "choice" or value not in source.choices:
                raise ConfigError(f"{where}: condition {cond}={value!r} of {param.name} can never hold")
    description = str(data.get("description") or name)
    return SearchSpace(name=name, description=description, fixed=fixed, params=tuple(params), source=str(path))


def _check_field(where: str, key: Any, fields: set[str]) -> None:
    if key in fields:
        return
    close = difflib.get_close_matches(str(key), sorted(fields), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"{where}: unknown parameter {key!r}: not a config field{hint}")


def _number(where: str, name: str, value: Any) -> float | int:
    # YAML 1.1 reads `1e-3` (no dot) as a string: accept it as the number it obviously is
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {name} bounds must be numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} bounds must be numbers, got {value!r}") from None


def _parse_param(where: str, name: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {name} must be a mapping like {{loguniform: [1.0e-2, 1.0e+8]}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = sorted(set(spec) - set(DISTRIBUTIONS) - {"when"})
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: {name} needs exactly one of {', '.join(DISTRIBUTIONS)} (and optional "
                          f"'when'), got {', '.join(map(str, spec))}")
    kind = kinds[0]
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: 'when' of {name} must be a mapping like {{use_rep_f: true}}")
    args = spec[kind]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {name}: choice needs a non-empty list of values")
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}: {name}: choice has repeated values")
        return Param(name, kind, choices=tuple(args), when=dict(when))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {name}: {kind} needs [low, high], got {args!r}")
    low, high = (_number(where, name, v) for v in args)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: {name}: empty range [{low}, {high}] (needs low < high)")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{where}: {name}: {kind} needs low > 0, got {low}")
    if kind in ("int", "logint"):
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: {name}: {kind} bounds must be integers, got [{low}, {high}]")
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, when=dict(when))
