"""The plugin registry: every optional part of the learner is one registered class that declares its fields once.

A plugin class (a subclass of `tune_bir.plugin.Plugin`, registered with `@register`) declares, as class
attributes holding `tune_bir.fields.Field`s, the field that switches it on (`switch`), the one that weights it
(`weight_field`) and the other fields that act only through it (`options`; its boolean ones are its
sub-switches: off in a sweep's baseline, refused without the plugin), and says whether it acts on replayed
memories only (`acts_on_replay`, the exaggeration terms) and whether it is what a sweep compares
(`off_in_baseline`: the exaggeration terms, EWC). Everything the rest of the code needs to know about the set
of plugins is derived here, never listed by hand:

- `declared_fields()`: every plugin field, once, in order: `BIRConfig`'s fields after the core ones
  (`tune_bir.config.make_config_class`), hence the CLI flags and the type and choice checks;
- `replay_only_fields()`: the fields two configs may differ in and still train task 1 identically
  (`BIRConfig.first_task_fields`, `Engine.adopt_first_task`);
- `exaggeration_off()`: a sweep baseline's overrides (every exaggerating switch and sub-switch off;
  `search_spaces.EXAGGERATION_OFF` is a live view of it);
- `check_config(cfg)`: every replay-acting plugin needs replay-through-feedback, every declared field is in
  its declared range, sub-switches need one of their plugins, plus each plugin's own `check`;
- `enabled(cfg)` (method labels), `uses_exaggeration(cfg)`, `build_plugins(cfg, context)` (the engine's
  plugins, in registration order).

The plugins are the built-in ones (`BUILTIN_MODULES`) and those of other installed packages: each entry point of
the group `tune_bir.plugins` (`ENTRY_POINT_GROUP`) names a module (or an object in one) whose import registers
plugins (docs/extending.md "A plugin in a package of your own"). Both are loaded on the first registry
question, once. An entry point that cannot be loaded, or whose plugin clashes with a field of the core or of
another plugin, is left out and reported by every later registry question (`registered()` raises a one-line
ConfigError naming it and its package), so the command lines print it as their error, with exit code 2.

The engine talks to the built plugins through the life-cycle hooks of `tune_bir.plugin.Plugin` only;
docs/extending.md walks through adding one. This module imports no torch itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from tune_bir.errors import ConfigError
from tune_bir.fields import Field, flag_name
from tune_bir.plugin import ExaggerationTerm, Plugin, PluginContext, register, registry, unregister

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig

# Modules whose import registers the built-in plugins (in this order: it is the order of method labels,
# of the plugins' hooks and losses, of their checks and of their fields in BIRConfig).
BUILTIN_MODULES = ("tune_bir.si", "tune_bir.ewc", "tune_bir.exaggeration")
# The entry-point group through which other installed packages register plugins.
ENTRY_POINT_GROUP = "tune_bir.plugins"

_loaded = False
_origins: dict[type[Plugin], str] = {}   # plugin -> the entry point that registered it, in words
_broken: list[str] = []                  # one line per entry point that is left out

__all__ = ["ExaggerationTerm", "Plugin", "PluginContext", "register", "unregister", "registered", "replay_only_fields",
           "exaggeration_off", "enabled", "uses_exaggeration", "idle_fields", "check_idle_fields", "check_config",
           "build_plugins", "switches", "declared_fields", "ENTRY_POINT_GROUP"]


def _entry_point_words(point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    package = f"package {dist.name} {dist.version}" if dist is not None else "an unnamed package"
    return f"plugin entry point {point.name} = {point.value} ({package}, group {ENTRY_POINT_GROUP})"


def _load() -> None:
    """Import the built-in plugin modules, then every entry point of `ENTRY_POINT_GROUP`, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        words, before = _entry_point_words(point), set(registry())
        try:
            point.load()
        except Exception as err:   # whatever a foreign import raises: reported as the line below, not a traceback
            _broken.append(f"{words} cannot be loaded: {type(err).__name__}: {err}")
            for cls in set(registry()) - before:   # what it registered before it failed is left out too
                unregister(cls.name)
            continue
        _origins.update(dict.fromkeys(set(registry()) - before, words))


def refuse(cls: type[Plugin], reason: str) -> None:
    """Leave a loaded plugin out (a field that clashes with a core one): every later registry question reports it."""
    _broken.append(f"{_origins.get(cls, f'plugin {cls.__name__} ({cls.__module__})')}: {reason}")
    unregister(cls.name)


def loaded() -> tuple[type[Plugin], ...]:
    """Every plugin registered and not left out: the built-in ones first, in `BUILTIN_MODULES` order, then the
    others in registration order. Unlike `registered()`, it does not raise for a broken entry point (the config
    class is built from these even then, so that the command lines can report it in one line)."""
    _load()
    order = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    return tuple(sorted(registry(), key=lambda cls: order.get(cls.__module__, len(order))))   # stable


def registered() -> tuple[type[Plugin], ...]:
    """Every registered plugin class (`loaded()`); a ConfigError of one line while an entry point is broken (each
    broken one named, with its package and its fault)."""
    plugins = loaded()
    if _broken:
        raise ConfigError("; ".join(_broken))
    return plugins


def declared_fields(plugins: Collection[type[Plugin]] | None = None) -> tuple[Field, ...]:
    """Every field the plugins declare (default: `loaded()`), once: plugins in registration order, the fields of
    one module in the order its source declares them (a field shared by two plugins sits where it is declared)."""
    plugins = loaded() if plugins is None else tuple(plugins)
    module_rank: dict[str, int] = {}
    first: dict[int, tuple[int, int, Field]] = {}
    for plugin in plugins:
        rank = module_rank.setdefault(plugin.__module__, len(module_rank))
        for f in plugin.declared():
            first.setdefault(id(f), (rank, f.order, f))
    return tuple(f for _, _, f in sorted(first.values(), key=lambda entry: entry[:2]))


def _unique(names: Iterator[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def switches() -> tuple[str, ...]:
    return tuple(term.switch.name for term in registered())


def replay_only_fields() -> tuple[str, ...]:
    """Fields that act on replayed memories only, i.e. from task 2 on: every field a replay-acting plugin declares."""
    return _unique(f for term in registered() if term.acts_on_replay for f in term.fields())


def exaggeration_off() -> dict[str, bool]:
    """A sweep baseline's overrides: every exaggerating term's switch and every sub-switch off."""
    terms = registered()
    names = _unique([*(t.switch.name for t in terms if t.off_in_baseline),
                     *(s for t in terms for s in t.sub_switches())])
    return dict.fromkeys(names, False)


def enabled(cfg: BIRConfig) -> tuple[type[Plugin], ...]:
    """The registered plugins a config switches on."""
    return tuple(term for term in registered() if getattr(cfg, term.switch.name))


def uses_exaggeration(cfg: BIRConfig) -> bool:
    return any(term.off_in_baseline for term in enabled(cfg))


def idle_fields(cfg: BIRConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Plugin weights and options set away from their defaults while no plugin that declares them is on, each
    with the switches that would make it act: values that change nothing. Not part of `check_config`: a sweep's
    baseline switches its plugins off and keeps the base config's options (the command lines refuse these)."""
    import dataclasses

    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    terms = registered()
    skip = {t.switch.name for t in terms} | {s for t in terms for s in t.sub_switches()}   # those: check_config
    idle = []
    for name in _unique(f for t in terms for f in t.fields()):
        owners = [t for t in terms if name in t.fields()]
        if name in skip or any(getattr(cfg, t.switch.name) for t in owners):
            continue
        if getattr(cfg, name) != default.get(name):
            idle.append((name, tuple(t.switch.name for t in owners)))
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
        raise ConfigError(f"{flag_name(on[0].switch.name)} acts on replayed memories: it needs --replay=generative "
                          "with --feedback (e.g. --brain-inspired)")
    for f in declared_fields(terms):   # the declared ranges, with the plugin on or off
        f.check(getattr(cfg, f.name))
    for sub in _unique(s for t in terms for s in t.sub_switches()):
        owners = [t for t in terms if sub in t.sub_switches()]
        if getattr(cfg, sub) and not any(getattr(cfg, t.switch.name) for t in owners):
            raise ConfigError(f"{flag_name(sub)} needs " + " or ".join(flag_name(t.switch.name) for t in owners))
    for term in terms:
        term.check(cfg)


def build_plugins(cfg: BIRConfig, context: PluginContext) -> list[Plugin]:
    """The engine's plugins: the enabled ones, built, in registration order."""
    built = [plugin for cls in enabled(cfg) if (plugin := cls.from_config(cfg, context)) is not None]
    owners = [p.name for p in built if p.owns_step()]
    if len(owners) > 1:
        raise ConfigError(f"{' and '.join(owners)} each run their own optimiser step; use one of them")
    return built
