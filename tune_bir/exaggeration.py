"""Memory-exaggeration terms on replayed samples (ALGORITHM.md section 5), one small class each.

Each term has a `name`, a `weight` and one call that takes the step's shared `ReplayBatch` (with its
`ReplayState`, computed once) and returns a scalar tensor; the engine adds `weight * value` to the
replay loss and logs the value under `loss/<name>`. Contrastive replay is different in kind (its own
head and optimiser): `ContrastiveReplay` is a plugin the engine calls around its optimiser step.
Everything is vectorised over the batch; invalid anchors are masked, an empty set gives exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from tune_bir import losses
from tune_bir.augment import AuxDecoder, augment_cifar, augment_mnist
from tune_bir.config import BIRConfig
from tune_bir.nets import adam, linear

if TYPE_CHECKING:
    from tune_bir.engine import Engine
    from tune_bir.model import BIRModel

PROJECTION_SIZE = 100
BASE_TEMPERATURE = 0.07


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; exactly 0 (no NaN, no host sync) when the mask is empty."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


@dataclass
class ReplayState:
    """Ranking, gates, class groups and validity of one replay batch (ALGORITHM.md 5.0)."""

    own: torch.Tensor             # [Br] previous-model top-1 class r^1
    competitors: torch.Tensor     # [Br, J] classes r^2 .. r^(J+1), J = n_rep clamped to K - 1
    gate: torch.Tensor            # [Br, J] repulsion-factor gate S (all True without --use-rep-f)
    present: torch.Tensor         # [K] class has at least one member in the batch
    representative: torch.Tensor  # [K] index of one uniformly drawn member of each class group
    membership: torch.Tensor      # [K, Br] one-hot of the class groups (float)

    @classmethod
    def build(cls, scores: torch.Tensor, n_rep: int, rep_f: float | None,
              generator: torch.Generator) -> ReplayState:
        n, k = scores.shape
        top = scores.topk(min(n_rep + 1, k), dim=1).indices
        own, competitors = top[:, 0], top[:, 1:]
        if rep_f is None:
            gate = torch.ones_like(competitors, dtype=torch.bool)
        else:  # probabilities at temperature 1 (quirk F27, kept)
            p = torch.softmax(scores, dim=1)
            gate = p.gather(1, own[:, None]) < rep_f * p.gather(1, competitors)
        membership = F.one_hot(own, k).T.float()
        present = membership.sum(1) > 0
        keys = torch.rand(n, generator=generator, device=scores.device)
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


@dataclass
class ReplayBatch:
    """What the current model made of one replay batch (ALGORITHM.md 5.0)."""

    h: torch.Tensor              # replayed inputs htil [Br, ...]
    scores: torch.Tensor         # previous model's logits over previous classes [Br, K]
    e: torch.Tensor              # current encoder features of htil
    mu: torch.Tensor             # current posterior mean [Br, Z]
    logvar: torch.Tensor         # current posterior log-variance [Br, Z]
    recon: torch.Tensor          # current reconstruction of htil
    state: ReplayState
    model: BIRModel
    image_pixels: int


class ExaggerationTerm:
    """A named loss term on a replay batch; the engine adds `weight * term(batch)` to the replay loss."""

    name: str = "term"
    weight: float = 1.0

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        raise NotImplementedError

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        """Per-step diagnostics to log (sizes of S, valid anchors), as tensors."""
        return {}


class DistributionRepulsion(ExaggerationTerm):
    """5.1: mean over anchors of 1 / max(D(q_i || target_i), d_min), for each competing neighbour.

    divergence: kl | js (moment-matched, zero iff equal) | js_ref (the original formula);
    target: prior (competing class's GMM mode, / P) | sample (posterior of a replayed member of the
    competing class) | class_mean (moment-matched posterior of the competing class group).
    """

    name = "repulsion"

    def __init__(self, weight: float, divergence: str, target: str, d_min: float):
        self.weight, self.divergence, self.target, self.d_min = weight, losses.DIVERGENCES[divergence], target, d_min
        self._last_clamped: torch.Tensor | None = None

    def _targets(self, batch: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target mean and log-variance [Br, J, Z] and the mask of anchors that have a target."""
        comp, state = batch.state.competitors, batch.state
        if self.target == "prior":
            return batch.model.z_class_means[comp], batch.model.z_class_logvars[comp], state.gate
        if self.target == "sample":
            idx = state.representative[comp]
            return batch.mu[idx], batch.logvar[idx], state.anchors
        counts = state.membership.sum(1).clamp(min=1)
        mean_mu = state.class_mean(batch.mu)
        # variance of the group mean: sum of variances / |G|^2 (dead code of the fork, 5.1)
        mean_lv = torch.log(state.membership @ batch.logvar.exp() / counts[:, None] ** 2 + 1e-12)
        return mean_mu[comp], mean_lv[comp], state.anchors

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        mu_t, lv_t, mask = self._targets(batch)
        d = self.divergence(batch.mu[:, None, :], batch.logvar[:, None, :], mu_t, lv_t)
        self._last_clamped = masked_mean((d < self.d_min).float(), mask).detach()
        inv = losses.inverse_clamped(d, self.d_min)
        per_level = torch.where(mask, inv, torch.zeros_like(inv)).sum(0) / mask.sum(0).clamp(min=1)
        value = per_level.sum()  # each further neighbour is added with the same weight
        return value / batch.image_pixels if self.target == "prior" else value

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        state = batch.state
        stats = {"stats/rep_gate_size": state.gate[:, :1].sum().float(),
                 "stats/rep_valid_anchors": state.anchors[:, :1].sum().float()}
        if self._last_clamped is not None:
            stats["stats/rep_clamped_fraction"] = self._last_clamped
        return stats


class _ReconTerm(ExaggerationTerm):
    """Shared target choice of 5.2: a replayed member of a class (default) or the class mean."""

    def __init__(self, weight: float, averaged: bool, recon_loss, d_min: float):
        self.weight, self.averaged, self.recon_loss, self.d_min = weight, averaged, recon_loss, d_min

    def _target(self, batch: ReplayBatch, classes: torch.Tensor) -> torch.Tensor:
        h = batch.h.detach()  # targets are constants; gradients flow through the reconstruction only
        if self.averaged:
            return batch.state.class_mean(h)[classes]
        return h[batch.state.representative[classes]]


class ReconRepulsion(_ReconTerm):
    """5.2: mean over anchors of 1 / max(R(target of the competing class, reconstruction), d_min)."""

    name = "recon_repulsion"

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        if batch.state.competitors.shape[1] == 0:  # a single previous class: nothing to repel from
            return batch.recon.sum() * 0.0
        competitor = batch.state.competitors[:, 0]
        distance = self.recon_loss(self._target(batch, competitor), batch.recon)
        return masked_mean(losses.inverse_clamped(distance, self.d_min), batch.state.anchors[:, 0])

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        anchors = batch.state.anchors
        return {"stats/recon_rep_valid_anchors": anchors[:, :1].sum().float()}


class ReconAttraction(_ReconTerm):
    """5.2: mean over ALL replayed samples of R(target of the own class, reconstruction)."""

    name = "recon_attraction"

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        return self.recon_loss(self._target(batch, batch.state.own), batch.recon).mean()


class ContrastiveReplay:
    """5.3: second views of replayed memories, projection head, SupCon loss and the encoder optimiser.

    With `train=False` (`--not-hidden` alone) the views are built exactly as for contrastive runs but
    nothing is trained on them: the augmentation-matched baseline.
    """

    name = "contrastive"

    def __init__(self, cfg: BIRConfig, model: BIRModel, conv, device: torch.device, train: bool):
        self.cfg, self.model, self.conv, self.train = cfg, model, conv, train
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        init = torch.Generator().manual_seed(cfg.seed + 3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=init)))
            self.head = linear(model.spec.hidden_sizes[-1], PROJECTION_SIZE).to(device)
            self.aux_decoder = AuxDecoder().to(device).eval().requires_grad_(False) if conv is not None else None
        if self.aux_decoder is not None and cfg.aux_decoder == "trained":
            from tune_bir.nets import load_aux_decoder

            self.aux_decoder.load_state_dict(load_aux_decoder(cfg.pretrained_conv, device))
        self.optimizer = adam(list(model.fcE.parameters()) + list(self.head.parameters()), cfg.c_lr, device)

    @torch.no_grad()
    def second_view(self, h: torch.Tensor) -> torch.Tensor:
        """v2: CIFAR conv(augment(D_aux(h))) with the frozen conv in eval mode; MNIST augment(h)."""
        if self.conv is None:
            return augment_mnist(h, self.generator)
        return self.conv(augment_cifar(self.aux_decoder(h), self.generator))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout (p = c_drop; only called in training, F17) drawing from the plugin's own generator:
        the engine's results never depend on the process-wide torch RNG."""
        keep = 1.0 - self.cfg.c_drop
        if keep == 1.0:
            return x
        mask = torch.rand(x.shape, generator=self.generator, device=x.device) < keep
        return x * mask / keep

    def loss(self, e_views: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """SupCon over [v1; v2] (2*Br anchors); labels / soft positives from the previous model's scores."""
        features = F.normalize(self.head(self._dropout(e_views)), dim=1)
        both = torch.cat([scores, scores])
        if self.cfg.c_scores:
            weights = losses.soft_positive_weights(both, self.cfg.temp)
        else:
            weights = losses.label_positive_weights(both.argmax(1))
        if self.cfg.c_hard:
            return losses.hard_negative_supcon_loss(features, weights, self.cfg.c_temp,
                                                    base_temperature=BASE_TEMPERATURE)
        return losses.supcon_loss(features, weights, self.cfg.c_temp, base_temperature=BASE_TEMPERATURE)

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "aux_decoder": None if self.aux_decoder is None else self.aux_decoder.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.aux_decoder is not None:
            self.aux_decoder.load_state_dict(state["aux_decoder"])


def build_terms(cfg: BIRConfig, recon_loss) -> list[ExaggerationTerm]:
    """The enabled additive exaggeration terms of a config, in a fixed order."""
    terms: list[ExaggerationTerm] = []
    if cfg.repulsion:
        terms.append(DistributionRepulsion(cfg.lamda_rep, cfg.kl_js, cfg.rep_target, cfg.d_min))
    if cfg.recon_repulsion:
        terms.append(ReconRepulsion(cfg.lamda_recon_rep, cfg.recon_rep_aver, recon_loss, cfg.d_min))
    if cfg.recon_attraction:
        terms.append(ReconAttraction(cfg.lamda_recon_atr, cfg.recon_rep_aver, recon_loss, cfg.d_min))
    return terms


def build_contrastive(cfg: BIRConfig, engine: Engine) -> ContrastiveReplay | None:
    if not (cfg.contrastive or cfg.not_hidden):
        return None
    return ContrastiveReplay(cfg, engine.model, engine.conv, engine.device, train=cfg.contrastive)
