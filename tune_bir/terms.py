"""The registry of exaggeration terms: each term is one class that declares its config fields once.

A term class (a subclass of `ExaggerationTerm`, registered with `@register`) says, as class attributes,
which `BIRConfig` field switches it on (`switch`), which one weights it (`weight_field`), which other
fields act only through it (`options`) and which of those are boolean sub-switches (`sub_switches`:
off in a sweep's baseline, refused without the term). Everything the rest of the code needs to know
about the set of terms is derived here, never listed by hand:

- `replay_only_fields()`: the fields two configs may differ in and still train task 1 identically
  (`BIRConfig.first_task_fields`, `Engine.adopt_first_task`);
- `exaggeration_off()`: a sweep baseline's overrides (every exaggerating switch and sub-switch off;
  `search_spaces.EXAGGERATION_OFF` is a live view of it);
- `check_config(cfg)`: every term needs replay-through-feedback, weights are >= 0, sub-switches need one
  of their terms, plus each term's own `check`;
- `enabled(cfg)` (method labels), `uses_exaggeration(cfg)`, `build_terms(cfg, context)` (the engine's
  plugins, in registration order).

The engine talks to the built terms through the plugin hooks of `ExaggerationTerm` only
(`replay_loss`, `objective`, `optimise`, `stats`, `state_dict`); docs/extending.md walks through adding
one. This module imports no torch, so validating a config stays cheap until a registry question is
asked; the built-in terms (`tune_bir.exaggeration`) are imported on the first one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tune_bir.errors import ConfigError
from tune_bir.fields import check_positive, flag_name

if TYPE_CHECKING:
    import torch

    from tune_bir.config import BIRConfig
    from tune_bir.exaggeration import ReplayBatch
    from tune_bir.model import BIRModel
    from tune_bir.nets import ConvLayers

# Modules whose import registers the built-in terms (in this order: it is the order of method labels,
# of the terms' losses and of their checks).
BUILTIN_MODULES = ("tune_bir.exaggeration",)

_REGISTRY: dict[str, type[ExaggerationTerm]] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class TermContext:
    """What a term is built from besides the config: parts of the learner it acts on."""

    model: BIRModel                       # the BI-R model (replay-through-feedback)
    conv: ConvLayers | None               # frozen conv layers (CIFAR), None for pixel inputs
    device: torch.device
    recon_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # per-sample R(target, reconstruction)


class MainStep(Protocol):
    """The interface a term with its own optimiser gets for the learner's main optimiser step.

    The engine implements it (`tune_bir.engine.MainStep`); a term's `optimise` puts the main objective's
    gradient into the `.grad` of `params` and calls `after_backward`, `step` and `consolidate` once each.
    """

    params: list[torch.Tensor]    # every parameter of the main optimiser, in its order

    def zero_grad(self) -> None: ...
    def after_backward(self, main: torch.Tensor) -> None: ...   # SI penalty gradient into .grad; logs
    def step(self) -> None: ...                                 # gradient clipping, main optimiser step
    def consolidation_grads(self) -> dict[str, torch.Tensor] | None: ...   # SI's gradients, now
    def consolidate(self, grads: dict[str, torch.Tensor] | None = None) -> None: ...   # SI path integral


class ExaggerationTerm:
    """Base of every exaggeration term: a declaration (class attributes) and the engine's plugin hooks.

    The engine builds the registered terms a config switches on (`from_config`) and, on every training
    step with replay, hands each the step's `ReplayBatch`:
      - `replay_loss(batch)`: a scalar the engine adds to the replay loss as `weight * value` (None: none);
      - `objective(batch)`: a scalar the term optimises itself; the engine passes `weight * value` to the
        term's `optimise(main, own, step)`, which then runs the whole optimiser step (at most one term
        may have one per step);
    it logs each value under `loss/<name>` and `stats(batch)` as they are. `state_dict` /
    `load_state_dict` carry whatever a term keeps between steps (optimiser, generators) in checkpoints.
    """

    # -- declaration
    name: ClassVar[str]                                  # loss/<name>; part of the method label
    switch: ClassVar[str]                                # bool config field that turns the term on
    weight_field: ClassVar[str | None] = None            # float config field weighting it (>= 0)
    options: ClassVar[tuple[str, ...]] = ()              # further fields that act only through this term
    sub_switches: ClassVar[tuple[str, ...]] = ()         # boolean options: off in a sweep's baseline
    exaggerates: ClassVar[bool] = True                   # False: a control run, kept in a sweep's baseline

    weight: float = 1.0

    # -- construction
    @classmethod
    def from_config(cls, cfg: BIRConfig, context: TermContext) -> ExaggerationTerm | None:
        """The term of a config that switches it on (None: nothing to build, e.g. another term covers it)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        """ConfigErrors for this term's own fields; called for every config, with the term on or off."""

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Every config field the term declares: switch, weight, options."""
        return tuple(dict.fromkeys(f for f in (cls.switch, cls.weight_field, *cls.options) if f))

    # -- plugin hooks
    def replay_loss(self, batch: ReplayBatch) -> torch.Tensor | None:
        return None

    def objective(self, batch: ReplayBatch) -> torch.Tensor | None:
        return None

    def optimise(self, main: torch.Tensor, own: torch.Tensor, step: MainStep) -> None:
        raise NotImplementedError(f"{type(self).__name__} has an objective but no optimise()")

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        """Per-step diagnostics to log (sizes of the gate, valid anchors), as tensors."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""


def register(cls: type[ExaggerationTerm]) -> type[ExaggerationTerm]:
    """Class decorator: add a term to the registry (its name and switch must be new).

    Terms from other modules are registered after the built-in ones, so the built-in order never changes.
    """
    if cls.__module__ not in BUILTIN_MODULES:
        registered()
    for attr in ("name", "switch"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"{cls.__name__} must declare `{attr}` as a class attribute")
    if not set(cls.sub_switches) <= set(cls.options):
        raise TypeError(f"{cls.__name__}: sub_switches must be among its options")
    for other in _REGISTRY.values():
        if other is not cls and (other.name == cls.name or other.switch == cls.switch):
            raise ValueError(f"{cls.__name__}: a term named {cls.name!r} / switched by {cls.switch!r} exists "
                             f"({other.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a term (tests that register toy terms)."""
    _REGISTRY.pop(name, None)


def registered() -> tuple[type[ExaggerationTerm], ...]:
    """Every registered term class, built-in ones first, in registration order."""
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True
    return tuple(_REGISTRY.values())


def _unique(names: Iterator[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def switches() -> tuple[str, ...]:
    return tuple(term.switch for term in registered())


def replay_only_fields() -> tuple[str, ...]:
    """Fields that act on replayed memories only, i.e. from task 2 on: every field a term declares."""
    return _unique(f for term in registered() for f in term.fields())


def exaggeration_off() -> dict[str, bool]:
    """A sweep baseline's overrides: every exaggerating term's switch and every sub-switch off."""
    terms = registered()
    names = _unique([*(t.switch for t in terms if t.exaggerates), *(s for t in terms for s in t.sub_switches)])
    return dict.fromkeys(names, False)


def enabled(cfg: BIRConfig) -> tuple[type[ExaggerationTerm], ...]:
    """The registered terms a config switches on."""
    return tuple(term for term in registered() if getattr(cfg, term.switch))


def uses_exaggeration(cfg: BIRConfig) -> bool:
    return any(term.exaggerates for term in enabled(cfg))


def idle_fields(cfg: BIRConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Term weights and options set away from their defaults while no term that declares them is on, each with
    the switches that would make it act: values that change nothing. Not part of `check_config`: a sweep's
    baseline switches its terms off and keeps the base config's options (the command lines refuse these)."""
    import dataclasses

    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    terms = registered()
    skip = {t.switch for t in terms} | {s for t in terms for s in t.sub_switches}   # sub-switches: check_config
    idle = []
    for name in replay_only_fields():
        owners = [t for t in terms if name in t.fields()]
        if name in skip or any(getattr(cfg, t.switch) for t in owners):
            continue
        if getattr(cfg, name) != default.get(name):
            idle.append((name, tuple(t.switch for t in owners)))
    return idle


def check_idle_fields(cfg: BIRConfig) -> None:
    """One-line ConfigError for the first of `idle_fields(cfg)`."""
    for name, switches in idle_fields(cfg)[:1]:
        raise ConfigError(f"{flag_name(name)} acts only with " + " or ".join(flag_name(s) for s in switches)
                          + f": add it, or drop {flag_name(name)}")


def check_config(cfg: BIRConfig) -> None:
    """The registry's part of config validation (one-line ConfigErrors)."""
    terms = registered()
    on = enabled(cfg)
    if on and not (cfg.replay == "generative" and cfg.feedback):
        raise ConfigError(f"{flag_name(on[0].switch)} acts on replayed memories: it needs --replay=generative "
                          "with --feedback (e.g. --brain-inspired)")
    check_positive(cfg, *(t.weight_field for t in terms if t.weight_field), allow_zero=True)
    for sub in _unique(s for t in terms for s in t.sub_switches):
        owners = [t for t in terms if sub in t.sub_switches]
        if getattr(cfg, sub) and not any(getattr(cfg, t.switch) for t in owners):
            raise ConfigError(f"{flag_name(sub)} needs " + " or ".join(flag_name(t.switch) for t in owners))
    for term in terms:
        term.check(cfg)


def build_terms(cfg: BIRConfig, context: TermContext) -> list[ExaggerationTerm]:
    """The engine's plugins: the enabled terms, built, in registration order."""
    built = [term for cls in enabled(cfg) if (term := cls.from_config(cfg, context)) is not None]
    owners = [t.name for t in built if type(t).optimise is not ExaggerationTerm.optimise]
    if len(owners) > 1:
        raise ConfigError(f"{' and '.join(owners)} each run their own optimiser step; use one of them")
    return built
