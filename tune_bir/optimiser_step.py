"""The learner's main optimiser step with every plugin's hooks around it (`tune_bir.plugin.LearnerStep`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tune_bir.model import BIRModel
from tune_bir.plugin import Plugin


class OptimiserStep:
    """The learner's main optimiser step, written once for every optimisation path (`tune_bir.plugin.LearnerStep`):
    backward, every plugin's `after_backward`, clipping and the main optimiser's step, every plugin's `after_step`.

    The plain path is `run(total)`; a plugin that owns the step calls the same parts in its `optimise`.
    """

    def __init__(self, model: BIRModel, optimizer: torch.optim.Optimizer, plugins: list[Plugin],
                 grad_clip: float, log: Callable[[str, torch.Tensor], None]):
        self.model, self.optimizer, self.plugins, self.grad_clip, self._log = model, optimizer, plugins, grad_clip, log
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def after_backward(self, total: torch.Tensor) -> None:
        """Every plugin's `after_backward` (SI adds its penalty's gradient to .grad); logs each loss and the total."""
        logged = total
        for plugin in self.plugins:
            value = plugin.after_backward()
            if value is not None:
                self._log(plugin.name, value)
                logged = logged.detach() + value
        self._log("total", logged)

    def step(self) -> None:
        """Gradient clipping (`--grad-clip`) and the main optimiser's step."""
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def after_step(self, grads: dict[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """Every plugin's `after_step` (SI's path integral, docs/algorithm.md "Synaptic Intelligence")."""
        for plugin in self.plugins:
            plugin.after_step(grads)

    def run(self, total: torch.Tensor) -> None:
        self.zero_grad()
        total.backward()
        self.after_backward(total)
        self.step()
        self.after_step()
