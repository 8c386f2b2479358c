"""The plugin registry: every optional part of the learner is one registered class that declares its fields once.

A plugin class (a subclass of `tune_bir.plugin.Plugin`, registered with `@register`) says, as class
attributes, which `BIRConfig` field switches it on (`switch`), which one weights it (`weight_field`), which
other fields act only through it (`options`), which of those are boolean sub-switches (`sub_switches`:
off in a sweep's baseline, refused without the plugin), whether it acts on replayed memories only
(`acts_on_replay`, the exaggeration terms) and whether it is what a sweep compares (`off_in_baseline`:
the exaggeration terms, EWC). Everything the rest of the code needs to know about the set of plugins is
derived here, never listed by hand:

- `replay_only_fields()`: the fields two configs may differ in and still train task 1 identically
  (`BIRConfig.first_task_fields`, `Engine.adopt_first_task`);
- `exaggeration_off()`: a sweep baseline's overrides (every exaggerating switch and sub-switch off;
  `search_spaces.EXAGGERATION_OFF` is a live view of it);
- `check_config(cfg)`: every replay-acting plugin needs replay-through-feedback, weights are >= 0,
  sub-switches need one of their plugins, plus each plugin's own `check`;
- `enabled(cfg)` (method labels), `uses_exaggeration(cfg)`, `build_plugins(cfg, context)` (the engine's
  plugins, in registration order).

The engine talks to the built plugins through the life-cycle hooks of `tune_bir.plugin.Plugin` only;
docs/extending.md walks through adding one. This module imports no torch, so validating a config stays
cheap until a registry question is asked; the built-in plugins (`BUILTIN_MODULES`) are imported on the
first one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tune_bir.errors import ConfigError
from tune_bir.fields import check_positive, flag_name
from tune_bir.plugin import ExaggerationTerm, Plugin, PluginContext, register, registry, unregister

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig

# Modules whose import registers the built-in plugins (in this order: it is the order of method labels,
# of the plugins' hooks and losses, and of their checks).
BUILTIN_MODULES = ("tune_bir.si", "tune_bir.ewc", "tune_bir.exaggeration")

_builtins_loaded = False

__all__ = ["ExaggerationTerm", "Plugin", "PluginContext", "register", "unregister", "registered", "replay_only_fields",
           "exaggeration_off", "enabled", "uses_exaggeration", "idle_fields", "check_idle_fields", "check_config",
           "build_plugins", "switches"]


def registered() -> tuple[type[Plugin], ...]:
    """Every registered plugin class: the built-in ones first, in `BUILTIN_MODULES` order, then the others in
    registration order."""
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True
    order = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    return tuple(sorted(registry(), key=lambda cls: order.get(cls.__module__, len(order))))   # stable


def _unique(names: Iterator[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def switches() -> tuple[str, ...]:
    return tuple(term.switch for term in registered())


def replay_only_fields() -> tuple[str, ...]:
    """Fields that act on replayed memories only, i.e. from task 2 on: every field a replay-acting plugin declares."""
    return _unique(f for term in registered() if term.acts_on_replay for f in term.fields())


def exaggeration_off() -> dict[str, bool]:
    """A sweep baseline's overrides: every exaggerating term's switch and every sub-switch off."""
    terms = registered()
    names = _unique([*(t.switch for t in terms if t.off_in_baseline), *(s for t in terms for s in t.sub_switches)])
    return dict.fromkeys(names, False)


def enabled(cfg: BIRConfig) -> tuple[type[Plugin], ...]:
    """The registered plugins a config switches on."""
    return tuple(term for term in registered() if getattr(cfg, term.switch))


def uses_exaggeration(cfg: BIRConfig) -> bool:
    return any(term.off_in_baseline for term in enabled(cfg))


def idle_fields(cfg: BIRConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Plugin weights and options set away from their defaults while no plugin that declares them is on, each
    with the switches that would make it act: values that change nothing. Not part of `check_config`: a sweep's
    baseline switches its plugins off and keeps the base config's options (the command lines refuse these)."""
    import dataclasses

    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    terms = registered()
    skip = {t.switch for t in terms} | {s for t in terms for s in t.sub_switches}   # sub-switches: check_config
    idle = []
    for name in _unique(f for t in terms for f in t.fields()):
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
    on = [t for t in enabled(cfg) if t.acts_on_replay]
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


def build_plugins(cfg: BIRConfig, context: PluginContext) -> list[Plugin]:
    """The engine's plugins: the enabled ones, built, in registration order."""
    built = [plugin for cls in enabled(cfg) if (plugin := cls.from_config(cfg, context)) is not None]
    owners = [p.name for p in built if p.owns_step()]
    if len(owners) > 1:
        raise ConfigError(f"{' and '.join(owners)} each run their own optimiser step; use one of them")
    return built
