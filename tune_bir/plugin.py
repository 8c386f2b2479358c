"""The plugin protocol: what the engine calls on everything optional (SI, EWC, the exaggeration terms).

A plugin acts at named points of the training life cycle, in this order for every task
(docs/extending.md "The life cycle"):

    before_task(task)                          once, before the task's first step
    for every step:
        replay_loss(batch) / objective(batch)  steps with replay only (`acts_on_replay` plugins)
        before_backward()                      a scalar added to the main objective as weight * value
        -- the backward pass of the main objective --
        after_backward()                       may add to .grad; returns the loss its gradient stands for
        -- gradient clipping and the main optimiser step --
        after_step(grads)                      the gradients the main step used
    after_task(task)                           once, after the task's last step

A plugin declares its config fields once, as `tune_bir.fields.Field` objects: `switch` turns it on, `weight_field`
weights it, `options` act only through it (docs/extending.md "1. Its fields"). `BIRConfig`, the CLI flags and the
validation are derived from them (`tune_bir.config.make_config_class`).

`state_dict` / `load_state_dict` carry what a plugin keeps between steps in the engine's checkpoints.
A plugin that has its own optimiser owns the step: its `optimise(main, own, step)` runs the backward
passes and both optimisers itself, calling the `LearnerStep` parts (`after_backward`, `step`, `after_step`)
once each, so every other plugin still sees its hooks. At most one plugin may own a step.

This module imports no torch at run time and nothing of the engine: the registry (`tune_bir.terms`), the
plugins and the engine all sit on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tune_bir.fields import FLAG_ALIASES, Field

if TYPE_CHECKING:
    import torch

    from tune_bir.config import BIRConfig
    from tune_bir.data import Split
    from tune_bir.model import BIRModel
    from tune_bir.nets import ConvLayers
    from tune_bir.replay_batch import ReplayBatch


@dataclass(frozen=True)
class PluginContext:
    """What a plugin is built from besides the config: parts of the learner it acts on."""

    model: BIRModel                       # the learner's model (classifier; BI-R's encoder, latent and decoder)
    conv: ConvLayers | None               # frozen conv layers (CIFAR), None for pixel inputs
    device: torch.device
    recon_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # per-sample R(target, reconstruction)


@dataclass(frozen=True)
class TaskInfo:
    """The task a `before_task` / `after_task` hook is called for."""

    task: int                                          # 1-based
    train: Split                                       # its training inputs (the space the fc network sees)
    columns: slice                                     # the active output columns while it is trained
    targets: Callable[[torch.Tensor], torch.Tensor]    # labels -> targets within those columns


class LearnerStep(Protocol):
    """The learner's main optimiser step as a plugin that owns the step sees it (`optimiser_step.OptimiserStep`).

    An owner puts the main objective's gradient into the `.grad` of `params`, then calls `after_backward`,
    `step` and `after_step` once each, in this order.
    """

    params: list[torch.Tensor]    # every parameter of the main optimiser, in its order

    def zero_grad(self) -> None: ...
    def after_backward(self, main: torch.Tensor) -> None: ...   # every plugin's after_backward; logs the total
    def step(self) -> None: ...                                 # gradient clipping, main optimiser step
    def after_step(self, grads: dict[torch.Tensor, torch.Tensor | None] | None = None) -> None: ...


class Plugin:
    """Base of every plugin: a declaration (class attributes) and the life-cycle hooks, each a no-op here."""

    # -- declaration
    name: ClassVar[str]                                  # loss/<name> in the metrics; its state's key
    switch: ClassVar[Field]                              # the bool field that turns the plugin on
    label: ClassVar[str | None] = None                   # part of the method label (None: the name)
    weight_field: ClassVar[Field | None] = None          # the float field weighting it (>= 0)
    options: ClassVar[tuple[Field, ...]] = ()            # further fields that act only through this plugin
    acts_on_replay: ClassVar[bool] = False               # True: acts from task 2 on, on replayed memories only
    off_in_baseline: ClassVar[bool] = False              # True: what a sweep compares (off in its baseline)

    weight: float = 1.0

    # -- construction
    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> Plugin | None:
        """The plugin of a config that switches it on (None: nothing to build, e.g. another plugin covers it)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        """ConfigErrors for this plugin's own fields beyond their declared ranges (e.g. combinations); called
        for every config, with the plugin on or off."""

    @classmethod
    def declared(cls) -> tuple[Field, ...]:
        """Every config field the plugin declares: switch, weight, options (a field shared with another
        plugin is the same `Field` object in both)."""
        return tuple({id(f): f for f in (cls.switch, cls.weight_field, *cls.options) if f is not None}.values())

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The names of `declared()`."""
        return tuple(f.name for f in cls.declared())

    @classmethod
    def sub_switches(cls) -> tuple[str, ...]:
        """Its boolean options: off in a sweep's baseline, refused without one of the plugins declaring them."""
        return tuple(f.name for f in cls.options if f.kind is bool)

    @classmethod
    def method_label(cls) -> str:
        return cls.label or cls.name

    @classmethod
    def owns_step(cls) -> bool:
        """The plugin runs the optimiser step itself (it overrides `optimise`)."""
        return cls.optimise is not Plugin.optimise

    # -- life cycle
    def before_task(self, info: TaskInfo) -> None:
        """Before the first step of a task."""

    def replay_loss(self, batch: ReplayBatch) -> torch.Tensor | None:
        """A scalar added to the replay loss as `weight * value` (steps with replay only)."""
        return None

    def objective(self, batch: ReplayBatch) -> torch.Tensor | None:
        """A scalar the plugin optimises itself in `optimise` (steps with replay only)."""
        return None

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        """Per-step diagnostics to log (sizes of the gate, valid anchors), as tensors."""
        return {}

    def before_backward(self) -> torch.Tensor | None:
        """A scalar added to the main objective as `weight * value` before its backward pass."""
        return None

    def after_backward(self) -> torch.Tensor | None:
        """After the main backward pass, before clipping: may add to `.grad`; returns the loss that gradient is
        of (logged, and counted in the logged total), or None."""
        return None

    def after_step(self, grads: dict[torch.Tensor, torch.Tensor | None] | None) -> None:
        """After the main optimiser step; `grads` maps each main parameter to the gradient that step used (None:
        read `.grad`, which still holds it)."""

    def after_task(self, info: TaskInfo) -> None:
        """After the last step of a task, before the previous-model snapshot."""

    def optimise(self, main: torch.Tensor, own: torch.Tensor, step: LearnerStep) -> None:
        """Own the step: `main` is the learner's objective, `own` = weight * this plugin's objective."""
        raise NotImplementedError(f"{type(self).__name__} has an objective but no optimise()")

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""


class ExaggerationTerm(Plugin):
    """A memory-exaggeration term: a plugin that acts on replayed memories only (from task 2 on).

    On every training step with replay the engine hands each enabled term the step's `ReplayBatch`:
      - `replay_loss(batch)`: a scalar the engine adds to the replay loss as `weight * value` (None: none);
      - `objective(batch)`: a scalar the term optimises itself; the engine passes `weight * value` to the
        term's `optimise(main, own, step)`, which then owns the whole optimiser step;
    it logs each value under `loss/<name>` and `stats(batch)` as they are.
    """

    acts_on_replay = True
    off_in_baseline = True


_REGISTRY: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: add a plugin to the registry; `tune_bir.terms` derives everything else from it.

    Its name and switch must be new, and so must every field it declares, unless it is the very `Field` object
    another plugin declares (a shared option, e.g. the repulsion gate). Raises TypeError naming the clash.
    """
    if not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"{cls.__name__} must declare `name` as a class attribute (a string)")
    for attr in ("switch", "weight_field"):
        value = getattr(cls, attr, None)
        if value is not None and not isinstance(value, Field) or (attr == "switch" and value is None):
            raise TypeError(f"{cls.__name__}: `{attr}` must be a tune_bir.fields.Field, got {value!r}")
    if not isinstance(cls.options, tuple) or not all(isinstance(f, Field) for f in cls.options):
        raise TypeError(f"{cls.__name__}: `options` must be a tuple of tune_bir.fields.Field")
    if cls.switch.kind is not bool or cls.switch.default is not False:
        raise TypeError(f"{cls.__name__}: its switch {cls.switch.name} must be a bool field off by default")
    if cls.weight_field is not None and (cls.weight_field.kind is not float or cls.weight_field.minimum is None):
        raise TypeError(f"{cls.__name__}: its weight {cls.weight_field.name} must be a float field with a minimum "
                        "(Field.weight)")
    names = [f.name for f in cls.declared()]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__} declares two different fields named "
                        f"{next(n for n in names if names.count(n) > 1)}")
    for other in _REGISTRY.values():
        if other is cls:
            continue
        if other.name == cls.name or other.switch.name == cls.switch.name:
            raise TypeError(f"{cls.__name__}: a plugin named {cls.name!r} / switched by {cls.switch.name!r} exists "
                            f"({other.__name__})")
        theirs = {f.name: f for f in other.declared()}
        for mine in cls.declared():
            if mine.name in theirs and theirs[mine.name] is not mine:
                raise TypeError(f"{cls.__name__}: field {mine.name} is declared by {other.__name__} already (to "
                                "share it, list that plugin's Field object)")
    _REGISTRY[cls.name] = cls
    FLAG_ALIASES.update({f.name: f.flag for f in cls.declared() if f.flag})
    return cls


def unregister(name: str) -> None:
    """Remove a plugin (tests that register toy plugins)."""
    cls = _REGISTRY.pop(name, None)
    if cls is not None:
        kept = {f.name for other in _REGISTRY.values() for f in other.declared()}
        for f in cls.declared():
            if f.flag and f.name not in kept:
                FLAG_ALIASES.pop(f.name, None)


def registry() -> tuple[type[Plugin], ...]:
    """The plugin classes registered so far, in registration order (`tune_bir.terms.registered` loads the
    built-in ones first)."""
    return tuple(_REGISTRY.values())
