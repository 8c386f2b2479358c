"""Synaptic Intelligence (Zenke et al., 2017) as used by BI-R+SI (docs/algorithm.md "Synaptic Intelligence")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tune_bir.fields import Field
from tune_bir.plugin import Plugin, PluginContext, TaskInfo, register

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig

_BUFFERS = ("W", "old", "omega", "theta_star")


class SynapticIntelligence:
    """Path-integral importance (omega) per parameter and the quadratic penalty anchoring it
    (docs/algorithm.md "Synaptic Intelligence").

    named_params: the SI scope, name -> parameter. Only these parameters accumulate a path integral and
        are penalised; every other parameter simply has omega = 0 (the engine passes fcE + classifier:
        difference "si-scope", docs/algorithm.md). The scope is explicit: nothing is skipped silently
        (difference "si-explicit-state", docs/algorithm.md).
    c: strength (>= 0) multiplying the penalty in `loss()`; the CIFAR-100 BI-R+SI baseline uses 1e8.
    epsilon: damping (> 0) in omega = W / (Delta^2 + epsilon); bounds omega when a parameter barely moved.

    Life cycle: `begin_task()` at the start of each task, `after_step()` after every optimiser step,
    `end_task()` at the end of each task; `loss()` is added to the objective before the backward pass,
    or (the same update, cheaper) `add_penalty_grad_()` adds its gradient right after it.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], c: float, epsilon: float = 0.1):
        if c < 0:
            raise ValueError(f"SI strength c must be >= 0, got {c}")
        if epsilon <= 0:
            raise ValueError(f"SI damping epsilon must be > 0, got {epsilon}")
        if not named_params:
            raise ValueError("SI scope is empty: pass at least one named parameter")
        self.named_params = dict(named_params)
        self.c = float(c)
        self.epsilon = float(epsilon)
        with torch.no_grad():
            # before task 1: theta* = theta, so the penalty is exactly 0 until the first end_task
            self._buffers: dict[str, dict[str, Tensor]] = {
                "W": {n: torch.zeros_like(p) for n, p in self.named_params.items()},
                "old": {n: p.detach().clone() for n, p in self.named_params.items()},
                "omega": {n: torch.zeros_like(p) for n, p in self.named_params.items()},
                "theta_star": {n: p.detach().clone() for n, p in self.named_params.items()},
            }
        # reused work space: fresh multi-MB temporaries every step cost page faults on the CPU
        self._scratch = {n: (torch.empty_like(p), torch.empty_like(p)) for n, p in self.named_params.items()}

    @torch.no_grad()
    def begin_task(self) -> None:
        """Start a task: W = 0 and old = theta."""
        for n, p in self.named_params.items():
            self._buffers["W"][n].zero_()
            self._buffers["old"][n].copy_(p)

    @torch.no_grad()
    def after_step(self, grads: dict[str, Tensor | None] | None = None) -> None:
        """After an optimiser step: W += -g * (theta - old); old = theta, with g = grads[name] or .grad (None = 0)."""
        # explicit grads: .grad may also hold the contrastive objective's gradient, which SI must not see
        # (docs/algorithm.md "Synaptic Intelligence", "Supervised contrastive replay")
        if grads is not None:
            missing = self.named_params.keys() - grads.keys()
            if missing:
                raise KeyError(f"SI after_step: no gradient given for {sorted(missing)}")
        for n, p in self.named_params.items():
            grad = grads[n] if grads is not None else p.grad
            old = self._buffers["old"][n]
            if grad is not None:
                self._buffers["W"][n].addcmul_(grad, torch.sub(p, old, out=self._scratch[n][0]), value=-1.0)
            old.copy_(p)

    @torch.no_grad()
    def end_task(self) -> None:
        """End of a task: omega += W / (Delta^2 + epsilon) with Delta = theta - theta*; then theta* = theta."""
        for n, p in self.named_params.items():
            star = self._buffers["theta_star"][n]
            delta = p - star
            self._buffers["omega"][n].add_(self._buffers["W"][n] / (delta.square() + self.epsilon))
            star.copy_(p)

    def penalty(self) -> Tensor:
        """sum_k sum omega_k * (theta_k - theta*_k)^2 (no 1/2, no c); exactly 0 before the first end_task."""
        omega, star = self._buffers["omega"], self._buffers["theta_star"]
        terms = [(omega[n] * (p - star[n]).square()).sum() for n, p in self.named_params.items()]
        return torch.stack(terms).sum()

    def loss(self) -> Tensor:
        """c * penalty(), the SI term of the total loss."""
        return self.c * self.penalty()

    @torch.no_grad()
    def add_penalty_grad_(self) -> Tensor:
        """Add the gradient of `loss()`, 2c * omega * (theta - theta*), to each parameter's .grad; return `loss()`.

        The same update as putting `loss()` into the objective, without building its autograd graph:
        four passes per parameter into reused buffers instead of ~8 elementwise ops and their backward.
        """
        terms = []
        for n, p in self.named_params.items():
            diff, weighted = self._scratch[n]
            torch.sub(p, self._buffers["theta_star"][n], out=diff)
            torch.mul(diff, self._buffers["omega"][n], out=weighted)      # omega * (theta - theta*)
            terms.append(torch.vdot(diff.flatten(), weighted.flatten()))  # sum omega * (theta - theta*)^2
            if p.grad is None:
                p.grad = weighted.mul(2 * self.c)
            else:
                p.grad.add_(weighted, alpha=2 * self.c)
        return self.c * torch.stack(terms).sum()

    def state_dict(self) -> dict[str, Any]:
        """Copies of all buffers keyed by parameter name, plus c and epsilon."""
        state: dict[str, Any] = {k: {n: t.detach().clone() for n, t in self._buffers[k].items()} for k in _BUFFERS}
        state.update(c=self.c, epsilon=self.epsilon)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` strictly (same names and shapes); tensors move to each parameter's device."""
        absent = [k for k in (*_BUFFERS, "c", "epsilon") if k not in state]
        if absent:
            raise KeyError(f"SI state is missing entries {absent}")
        names = self.named_params.keys()
        for k in _BUFFERS:
            missing, extra = sorted(names - state[k].keys()), sorted(state[k].keys() - names)
            if missing or extra:
                raise KeyError(f"SI state '{k}' does not match the scope: missing {missing}, unexpected {extra}")
            for n, p in self.named_params.items():
                if state[k][n].shape != p.shape:
                    raise ValueError(f"SI state '{k}' for {n}: shape {tuple(state[k][n].shape)} "
                                     f"!= parameter shape {tuple(p.shape)}")
        for k in _BUFFERS:
            for n, p in self.named_params.items():
                self._buffers[k][n] = state[k][n].detach().to(device=p.device, dtype=p.dtype).clone()
        self.c = float(state["c"])
        self.epsilon = float(state["epsilon"])


@register
class SIPlugin(Plugin):
    """`--si`: Synaptic Intelligence on the encoder and classifier as a plugin: path integral after every main
    optimiser step, consolidation at the end of each task, the penalty's gradient added after the backward pass
    (the same update as adding `c * penalty` to the loss, without its autograd graph)."""

    name = "si"
    label = "SI"
    switch = Field.switch("si", "Synaptic Intelligence")
    options = (
        # None: the SI-alone value of the protocol (`tune_bir.config.SI_C_DEFAULTS`, filled in by resolve())
        Field("c", float | None, None, "SI strength, with --si (default: SI-alone value of the protocol)",
              minimum=0.0),
        Field("epsilon", float, 0.1, "SI damping (with --si)", minimum=0.0, minimum_inclusive=False),
    )

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> SIPlugin:
        model = context.model
        # SI scope: encoder and classifier; the rest keeps omega = 0 (difference "si-scope", docs/algorithm.md)
        scope = ({f"fcE.{n}": p for n, p in model.fcE.named_parameters()}
                 | {f"classifier.{n}": p for n, p in model.classifier.named_parameters()})
        return cls(SynapticIntelligence(scope, c=cfg.c, epsilon=cfg.epsilon))

    def __init__(self, si: SynapticIntelligence):
        self.si = si

    def before_task(self, info: TaskInfo) -> None:
        self.si.begin_task()

    def after_backward(self) -> Tensor:
        return self.si.add_penalty_grad_()

    def after_step(self, grads: dict[Tensor, Tensor | None] | None) -> None:
        # explicit grads: .grad may also hold another optimiser's gradient (contrastive replay), which SI must not see
        self.si.after_step(None if grads is None else {n: grads[p] for n, p in self.si.named_params.items()})

    def after_task(self, info: TaskInfo) -> None:
        self.si.end_task()

    def state_dict(self) -> dict[str, Any]:
        return self.si.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.si.load_state_dict(state)
