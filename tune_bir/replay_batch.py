"""The state of one replay batch that the engine builds and the replay-acting plugins read
(docs/algorithm.md "Replay-batch state"); below both, so neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from tune_bir.model import BIRModel


@dataclass
class ReplayState:
    """Ranking, gates, class groups and validity of one replay batch (docs/algorithm.md "Replay-batch state")."""

    own: torch.Tensor             # [Br] previous-model top-1 class r^1
    competitors: torch.Tensor     # [Br, J] classes r^2 .. r^(J+1), J = n_rep clamped to K - 1
    gate: torch.Tensor            # [Br, J] repulsion-factor gate S (all True without --use-rep-f)
    present: torch.Tensor         # [K] class has at least one member in the batch
    representative: torch.Tensor  # [K] index of one uniformly drawn member of each class group
    membership: torch.Tensor      # [K, Br] one-hot of the class groups (float)

    @classmethod
    def build(cls, scores: torch.Tensor, n_rep: int, rep_f: float | None,
              rng: torch.Generator) -> ReplayState:
        n, k = scores.shape
        top = scores.topk(min(n_rep + 1, k), dim=1).indices
        own, competitors = top[:, 0], top[:, 1:]
        if rep_f is None:
            gate = torch.ones_like(competitors, dtype=torch.bool)
        else:  # probabilities at temperature 1 (difference "rep-f-temperature", docs/algorithm.md)
            p = torch.softmax(scores, dim=1)
            gate = p.gather(1, own[:, None]) < rep_f * p.gather(1, competitors)
        membership = F.one_hot(own, k).T.float()
        present = membership.sum(1) > 0
        keys = torch.rand(n, generator=rng, device=scores.device)
        representative = torch.where(membership > 0, keys, torch.full_like(membership, -1.0)).argmax(1)
        return cls(own, competitors, gate, present, representative, membership)

    @property
    def valid(self) -> torch.Tensor:
        """[Br, J] the competing class has a member in the batch."""
        return self.present[self.competitors]

    @property
    def anchors(self) -> torch.Tensor:
        return self.gate & self.valid

    def class_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[K, ...] mean of `values` over each class group (zeros for absent classes)."""
        counts = self.membership.sum(1).clamp(min=1)
        flat = self.membership @ values.flatten(1) / counts[:, None]
        return flat.view(-1, *values.shape[1:])


class ReplayBatch:
    """What the current model made of one replay batch (docs/algorithm.md "Replay-batch state").

    `recon`, `state` and `e_alone` may be given as zero-argument callables: they are then computed on first use,
    once, so a step whose terms need neither (contrastive replay) neither decodes nor ranks.
    """

    def __init__(self, *, h: torch.Tensor, scores: torch.Tensor, e: torch.Tensor, mu: torch.Tensor,
                 logvar: torch.Tensor, recon: torch.Tensor | Callable[[], torch.Tensor],
                 state: ReplayState | Callable[[], ReplayState], model: BIRModel, image_pixels: int,
                 e_alone: torch.Tensor | Callable[[], torch.Tensor] | None = None):
        self.h = h                    # replayed inputs htil [Br, ...]
        self.scores = scores          # previous model's logits over previous classes [Br, K]
        self.e = e                    # current encoder features of htil
        self.mu = mu                  # current posterior mean [Br, Z]
        self.logvar = logvar          # current posterior log-variance [Br, Z]
        self.model = model
        self.image_pixels = image_pixels
        self._recon, self._state = recon, state
        self._e_alone = e if e_alone is None else e_alone

    @property
    def e_alone(self) -> torch.Tensor:
        """e again, on a graph of its own that back-propagates through the replayed rows only
        (`tune_bir.nets.MLP.rows_alone`): for an objective with its own backward. The same numbers as e's."""
        if callable(self._e_alone):
            self._e_alone = self._e_alone()
        return self._e_alone

    @property
    def recon(self) -> torch.Tensor:
        """Current reconstruction of htil."""
        if callable(self._recon):
            self._recon = self._recon()
        return self._recon

    @property
    def state(self) -> ReplayState:
        if callable(self._state):
            self._state = self._state()
        return self._state
