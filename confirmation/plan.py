"""A confirmation's pre-registered plan: what is compared, on which seeds, by which test, decided before any run.

`plan.json` holds `ConfirmationPlan.to_json()`, written once before the first run; its sha256 (of the bytes
as written) is printed, kept in the seed ledger and tagged on the MLflow parent run, and `--resume`
refuses a plan.json whose bytes no longer hash to it. Nothing in it changes after it is written: where
MLflow logs and what each look found are in `state.json` and `looks.json` beside it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.sequential import SequentialDesign
from search_spaces import EXAGGERATION_OFF
from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError

PLAN_FILE, STATE_FILE, LOOKS_FILE = "plan.json", "state.json", "looks.json"
BASELINE = "baseline"
METRIC = "acc_avg"    # test accuracy averaged over the tasks, after the last task
TEST = "paired t-test on per-seed differences (config - baseline), group-sequential"
FORMAT = 1


@dataclass(frozen=True)
class ConfigSpec:
    """One config under confirmation: its label, the values it sets on the base config, where it came from."""

    label: str
    values: dict[str, Any]
    source: Any          # free-form provenance, e.g. {"confirmation": "../repulsion/confirm.json", "config": "top2"}

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "values": self.values, "source": self.source}


@dataclass
class ConfirmationPlan:
    """Everything a confirmation decides before its first run (`plan.json`)."""

    label: str
    folder: str                          # where it lives (plan.json, looks, results)
    base_config: dict[str, Any]          # the base config every config and the baseline start from
    trial_base: dict[str, Any]           # the same with paths made absolute, as every trial receives it
    configs: list[ConfigSpec]
    seeds: list[int]                     # in the order they are used; the first looks[k] at look k
    design: dict[str, Any] | None        # the sequential design (analysis.sequential.SequentialDesign.to_dict())
    resources: dict[str, Any]            # cpus_per_trial, gpus_per_trial, max_failures: how every run runs
    sweeps: list[str] = field(default_factory=list)   # sweep folders whose configs these are (seeds used there)
    reuse_seeds: list[int] = field(default_factory=list)   # seeds used before, allowed by --reuse-seeds
    argv: list[str] = field(default_factory=list)
    git_commit: str | None = None
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_tasks(self) -> int:
        return BIRConfig.from_dict(self.base_config).resolved().tasks

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configs]

    @property
    def looks(self) -> list[int]:
        """Cumulative seeds at each look: the design's, or one look of every seed (a fixed design)."""
        return list(self.design["looks"]) if self.design else [len(self.seeds)]

    def trial_configs(self, labels: list[str]) -> dict[str, dict[str, Any]]:
        """The whole trial config of each label (the baseline: the base config, every exaggeration term off)."""
        by_label = {c.label: c for c in self.configs}
        out = {}
        for label in labels:
            values = EXAGGERATION_OFF if label == BASELINE else by_label[label].values
            out[label] = {**self.trial_base, **EXAGGERATION_OFF, **values, "baseline": label == BASELINE,
                          "share_first_task": True}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "label": self.label, "folder": self.folder, "created": self.created,
                "git_commit": self.git_commit, "metric": METRIC, "test": TEST if self.design else
                "paired t-test on per-seed differences (config - baseline), one look", "baseline": BASELINE,
                "base_config": self.base_config, "trial_base_config": self.trial_base,
                "resolved_base_config": BIRConfig.from_dict(self.base_config).resolved().to_dict(),
                "configs": [c.to_dict() for c in self.configs], "seeds": self.seeds, "max_seeds": len(self.seeds),
                "design": self.design, "resources": self.resources, "sweeps": self.sweeps,
                "reuse_seeds": self.reuse_seeds, "argv": self.argv}

    def text(self) -> str:
        """plan.json's exact bytes (as text): what its sha256 is taken of."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConfirmationPlan:
        try:
            if data.get("format") != FORMAT:
                raise ConfigError(f"format {data.get('format')!r}, this version reads {FORMAT}")
            return cls(label=data["label"], folder=data["folder"], base_config=data["base_config"],
                       trial_base=data["trial_base_config"],
                       configs=[ConfigSpec(c["label"], c["values"], c["source"]) for c in data["configs"]],
                       seeds=[int(s) for s in data["seeds"]], design=data["design"], resources=data["resources"],
                       sweeps=data.get("sweeps", []), reuse_seeds=data.get("reuse_seeds", []),
                       argv=data.get("argv", []), git_commit=data.get("git_commit"), created=data["created"])
        except (KeyError, TypeError, ConfigError) as err:
            raise ConfigError(f"{PLAN_FILE} is not one this version wrote ({type(err).__name__}: {err})") from err


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_config_file(path: str) -> list[ConfigSpec]:
    """The configs of a `--config-file`: a JSON list of {label, values, source}; raises ConfigError."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as err:
        raise ConfigError(f"--config-file {path}: cannot read it ({err.strerror or err})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config-file {path} is not valid JSON: {err.msg} (line {err.lineno})") from err
    what = "a JSON list of configs, each {\"label\": ..., \"values\": {...}, \"source\": ...}"
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--config-file {path} must hold {what}; it holds {type(data).__name__}"
                          + (" (empty)" if data == [] else ""))
    configs, labels = [], set()
    for i, item in enumerate(data, start=1):
        where = f"--config-file {path}, config {i}"
        if not isinstance(item, dict) or set(item) != {"label", "values", "source"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ConfigError(f"{where}: must be {{label, values, source}}, got {keys}")
        label, values, source = item["label"], item["values"], item["source"]
        if not isinstance(label, str) or not label or not label.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: label must be a name of letters, digits, - and _, got {label!r}")
        if label == BASELINE or label in labels:
            raise ConfigError(f"{where}: label {label!r} is " + ("the baseline's" if label == BASELINE else
                                                                 "used twice"))
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where} ({label}): values must be a non-empty object of config fields")
        if not source:
            raise ConfigError(f"{where} ({label}): source must say where the config came from")
        unknown = sorted(set(values) - set(BIRConfig.field_names()))
        if unknown:
            raise ConfigError(f"{where} ({label}): {unknown[0]!r} is not a config field")
        labels.add(label)
        configs.append(ConfigSpec(label, values, source))
    return configs


def check_configs(configs: list[ConfigSpec], base: dict[str, Any]) -> None:
    """Each config is valid on the base config and differs from the baseline; raises ConfigError."""
    for c in configs:
        try:
            BIRConfig.from_dict({**base, **c.values}).resolved()
        except ConfigError as err:
            raise ConfigError(f"config {c.label} is invalid on the base config: {err}") from err
        if all(base.get(k, BIRConfig().to_dict().get(k)) == v or EXAGGERATION_OFF.get(k) == v
               for k, v in c.values.items()):
            raise ConfigError(f"config {c.label} sets nothing the baseline does not: it would be compared with itself")


def check_design_options(alpha: float, margin: float, max_seeds: int, looks: int) -> None:
    """The sequential design's options are in range (before anything starts); raises ConfigError."""
    if not (margin > 0 and math.isfinite(margin)):
        raise ConfigError(f"--margin must be > 0 (the equivalence margin, in units of {METRIC}), got {margin}")
    if not 0 < alpha < 0.5:
        raise ConfigError(f"--alpha must be in (0, 0.5) (family-wise, two-sided), got {alpha}")
    if max_seeds < 4:
        raise ConfigError(f"--max-seeds must be >= 4 (a look needs at least 2 paired seeds), got {max_seeds}")
    if not 1 <= looks <= max_seeds // 2:
        raise ConfigError(f"--looks must be 1..{max_seeds // 2} (at least 2 new seeds a look, --max-seeds "
                          f"{max_seeds}), got {looks}")


def even_looks(max_seeds: int, looks: int) -> list[int]:
    """Cumulative seed counts of `looks` evenly spaced looks up to max_seeds (48 in 6: 8, 16, ..., 48)."""
    return [int(round(max_seeds * k / looks)) for k in range(1, looks + 1)]


def design_dict(alpha: float, margin: float, max_seeds: int, looks: int, n_configs: int,
                spending: str) -> dict[str, Any]:
    """The design as plan.json records it (analysis.sequential.SequentialDesign.to_dict())."""
    points = even_looks(max_seeds, looks)
    try:
        return SequentialDesign(alpha, margin, tuple(points), n_configs, spending).to_dict()
    except ValueError as err:
        raise ConfigError(f"the sequential design is invalid: {err}") from err

