"""Memory-exaggeration terms on replayed samples (ALGORITHM.md section 5), one small class each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tune_bir.config import BIRConfig

if TYPE_CHECKING:
    from tune_bir.engine import Engine
    from tune_bir.model import BIRModel


@dataclass
class ReplayBatch:
    """What the current model made of one replay batch (ALGORITHM.md 5.0)."""

    h: torch.Tensor              # replayed inputs htil [Br, ...]
    scores: torch.Tensor         # previous model's logits over previous classes [Br, K]
    e: torch.Tensor              # current encoder features of htil
    mu: torch.Tensor             # current posterior mean [Br, Z]
    logvar: torch.Tensor         # current posterior log-variance [Br, Z]
    recon: torch.Tensor          # current reconstruction of htil
    class_weights: torch.Tensor  # soft class weights used for gates / prior [Br, n_classes]
    n_active: int
    model: BIRModel
    engine: Engine


class ExaggerationTerm:
    """A named loss term on a replay batch; the engine adds `weight * term(batch)` to the replay loss."""

    name: str = "term"
    weight: float = 1.0

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        raise NotImplementedError

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        """Extra per-step diagnostics to log (e.g. gate size), as tensors."""
        return {}

    def own_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this term trains with its own optimiser (kept out of the main optimiser)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def build_terms(cfg: BIRConfig, engine: Engine) -> list[ExaggerationTerm]:
    """The enabled exaggeration terms of a config, in a fixed order."""
    del engine
    return []
