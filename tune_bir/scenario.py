"""Which output columns a task trains and is scored on, and the batches it trains on."""

from __future__ import annotations

import torch


class Scenario:
    """Which output columns are active and what the targets are (docs/algorithm.md "Scenarios and active classes")."""

    def __init__(self, name: str, classes_per_task: int, n_classes: int):
        self.name, self.cpt, self.n_classes = name, classes_per_task, n_classes
        self.n_outputs = classes_per_task if name == "domain" else n_classes

    def columns(self, task: int, current: int) -> slice:
        """Output columns for evaluating `task` (1-based) while `current` tasks have been seen."""
        if self.name == "class":
            return slice(0, self.cpt * current)
        if self.name == "task":
            return slice(self.cpt * (task - 1), self.cpt * task)
        return slice(0, self.cpt)

    def targets(self, y: torch.Tensor, task: int) -> torch.Tensor:
        if self.name == "class":
            return y
        if self.name == "task":
            return y - self.cpt * (task - 1)
        return y % self.cpt


class BatchSampler:
    """Shuffled passes over one task's training data, batch B, drop_last; counted in iterations."""

    def __init__(self, n: int, batch: int, rng: torch.Generator, device: torch.device):
        self.n, self.batch, self.rng, self.device = n, batch, rng, device
        self.perm = torch.empty(0, dtype=torch.long, device=device)
        self.cursor = 0

    def next_indices(self) -> torch.Tensor:
        if self.cursor + self.batch > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.rng, device=self.device)
            self.cursor = 0
        idx = self.perm[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"].to(self.device), int(state["cursor"])
