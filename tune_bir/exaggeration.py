"""The built-in memory-exaggeration terms (docs/algorithm.md "Memory exaggeration"), one class each.

Every term is a registered `tune_bir.plugin.ExaggerationTerm`: its class attributes name its config fields
(declared once below, as `tune_bir.fields.Field`s; `BIRConfig` lists them in this order), `from_config` builds
it, and the engine calls its plugin hooks with the step's shared `ReplayBatch` (whose `ReplayState` is computed
once, on first use). The additive terms return a scalar from `replay_loss` that the engine adds to the replay
loss as `weight * value`; contrastive replay has its own head and optimiser, so it returns an `objective` and
owns the optimiser step (`optimise`).
Everything is vectorised over the batch; invalid anchors are masked, an empty set gives exactly 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from tune_bir import losses
from tune_bir.augment import AuxDecoder, augment_cifar, augment_mnist
from tune_bir.errors import ConfigError
from tune_bir.fields import Field
from tune_bir.nets import adam, linear
from tune_bir.plugin import ExaggerationTerm, LearnerStep, PluginContext, register
from tune_bir.rng_state import restore_rng

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig
    from tune_bir.model import BIRModel
    from tune_bir.replay_batch import ReplayBatch

PROJECTION_SIZE = 100
BASE_TEMPERATURE = 0.07

# The terms' config fields, each declared once (several are shared: the repulsion gate and floor by both repulsion
# terms, the class-mean targets by both reconstruction terms, the auxiliary decoder by the contrastive views), in
# the order `BIRConfig` lists them (docs/algorithm.md "Memory exaggeration").
# -- distribution repulsion (docs/algorithm.md "Distribution repulsion")
REPULSION = Field.switch("repulsion", "distribution-based repulsion of replayed memories")
LAMDA_REP = Field.weight("lamda_rep", 1e-6, "weight of the distribution repulsion")
KL_JS = Field("kl_js", str, "js", "divergence of the repulsion", choices=("kl", "js", "js_ref"))
USE_REP_F = Field("use_rep_f", bool, False, "apply the repulsion-factor gate")
REP_F = Field("rep_f", float, 20.0, "repulsion factor f")
N_REP = Field("n_rep", int, 1, "competing neighbours per replayed sample (clamped per task)", minimum=1)
REP_TARGET = Field("rep_target", str, "prior", "what a replayed memory is pushed away from",
                   choices=("prior", "sample", "class_mean"))
D_MIN = Field("d_min", float, 1e-3, "floor on divergences and distances inside inverse terms", minimum=0.0,
              minimum_inclusive=False)
# -- reconstruction repulsion / attraction (docs/algorithm.md "Reconstruction repulsion and attraction")
RECON_REPULSION = Field.switch("recon_repulsion", "reconstruction-based repulsion")
LAMDA_RECON_REP = Field.weight("lamda_recon_rep", 1e-6, "weight of the reconstruction repulsion")
RECON_ATTRACTION = Field.switch("recon_attraction", "reconstruction-based attraction")
LAMDA_RECON_ATR = Field.weight("lamda_recon_atr", 1e-6, "weight of the reconstruction attraction")
RECON_REP_AVER = Field("recon_rep_aver", bool, False, "class-mean targets for both reconstruction terms")
# -- contrastive replay (docs/algorithm.md "Supervised contrastive replay") and its not-hidden control
CONTRASTIVE = Field.switch("contrastive", "supervised contrastive learning on replayed memories")
C_TEMP = Field("c_temp", float, 1.0, "SupCon temperature", minimum=0.0, minimum_inclusive=False)
C_LR = Field("c_lr", float, 1e-8, "learning rate of the encoder optimiser of the contrastive loss", minimum=0.0)
C_DROP = Field("c_drop", float, 0.5, "dropout before the projection head", minimum=0.0, maximum=1.0,
               maximum_inclusive=False)
C_SCORES = Field("c_scores", bool, False, "soft positives from the previous model's scores")
C_HARD = Field("c_hard", bool, False, "hard-negative reweighting")
NOT_HIDDEN = Field.switch("not_hidden", "augmented-view baseline for contrastive runs (kept with --contrastive, "
                          "where it changes nothing: the views are built anyway)")
LAMDA_CONTR = Field.weight("lamda_contr", 1.0, "weight of the contrastive loss")
CONTR_GRAD_MODE = Field("contr_grad_mode", str, "separate", "how the two optimisers share gradients",
                        choices=("separate", "reference"))
AUX_DECODER = Field("aux_decoder", str, "random", "auxiliary decoder of the second view (CIFAR)",
                    choices=("random", "trained"))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; exactly 0 (no NaN, no host sync) when the mask is empty."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


class _AdditiveTerm(ExaggerationTerm):
    """A term whose value (`term(batch)`) the engine adds to the replay loss as `weight * value`."""

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        raise NotImplementedError

    def replay_loss(self, batch: ReplayBatch) -> torch.Tensor:
        return self(batch)


class _GatedTerm(_AdditiveTerm):
    """The repulsion terms share the repulsion-factor gate and the divergence / distance floor."""

    options = (USE_REP_F, REP_F, D_MIN)

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        if cfg.use_rep_f and cfg.rep_f <= 1:
            raise ConfigError(f"--rep-f must be > 1 with --use-rep-f (f <= 1 gates out every sample), "
                              f"got {cfg.rep_f}")


@register
class DistributionRepulsion(_GatedTerm):
    """Mean over anchors of 1 / max(D(q_i || target_i), d_min), for each competing neighbour.

    docs/algorithm.md "Distribution repulsion".
    divergence: kl | js (moment-matched, zero iff equal) | js_ref (the original formula);
    target: prior (competing class's GMM mode, / P) | sample (posterior of a replayed member of the
    competing class) | class_mean (moment-matched posterior of the competing class group).
    """

    name = "repulsion"
    switch, weight_field = REPULSION, LAMDA_REP
    options = (KL_JS, USE_REP_F, REP_F, N_REP, REP_TARGET, D_MIN)

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> DistributionRepulsion:
        return cls(cfg.lamda_rep, cfg.kl_js, cfg.rep_target, cfg.d_min)

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        super().check(cfg)
        if cfg.rep_target == "prior" and cfg.repulsion and cfg.prior != "GMM":
            raise ConfigError("--rep-target=prior needs the per-class GMM prior (--brain-inspired)")

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
        # variance of the group mean: sum of variances / |G|^2 (the fork computed it but never used it)
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


class _ReconTarget:
    """Shared target choice (docs/algorithm.md "Reconstruction repulsion and attraction"): a replayed member of a
    class (default) or the class mean."""

    averaged: bool

    def __init__(self, weight: float, averaged: bool, recon_loss, d_min: float):
        self.weight, self.averaged, self.recon_loss, self.d_min = weight, averaged, recon_loss, d_min

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> _ReconTarget:
        return cls(getattr(cfg, cls.weight_field.name), cfg.recon_rep_aver, context.recon_loss, cfg.d_min)

    def _target(self, batch: ReplayBatch, classes: torch.Tensor) -> torch.Tensor:
        h = batch.h.detach()  # targets are constants; gradients flow through the reconstruction only
        if self.averaged:
            return batch.state.class_mean(h)[classes]
        return h[batch.state.representative[classes]]


@register
class ReconRepulsion(_ReconTarget, _GatedTerm):
    """Mean over anchors of 1 / max(R(target of the competing class, reconstruction), d_min)
    (docs/algorithm.md "Reconstruction repulsion and attraction")."""

    name = "recon_repulsion"
    switch, weight_field = RECON_REPULSION, LAMDA_RECON_REP
    options = (RECON_REP_AVER, *_GatedTerm.options)

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        if batch.state.competitors.shape[1] == 0:  # a single previous class: nothing to repel from
            return batch.recon.sum() * 0.0
        competitor = batch.state.competitors[:, 0]
        distance = self.recon_loss(self._target(batch, competitor), batch.recon)
        return masked_mean(losses.inverse_clamped(distance, self.d_min), batch.state.anchors[:, 0])

    def stats(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        anchors = batch.state.anchors
        return {"stats/recon_rep_valid_anchors": anchors[:, :1].sum().float()}


@register
class ReconAttraction(_ReconTarget, _AdditiveTerm):
    """Mean over ALL replayed samples of R(target of the own class, reconstruction)
    (docs/algorithm.md "Reconstruction repulsion and attraction")."""

    name = "recon_attraction"
    switch, weight_field = RECON_ATTRACTION, LAMDA_RECON_ATR
    options = (RECON_REP_AVER,)

    def __call__(self, batch: ReplayBatch) -> torch.Tensor:
        return self.recon_loss(self._target(batch, batch.state.own), batch.recon).mean()


@register
class ContrastiveReplay(ExaggerationTerm):
    """Second views of replayed memories, projection head, SupCon loss and the encoder optimiser
    (docs/algorithm.md "Supervised contrastive replay").

    Its objective L_con is optimised by its own optimiser (encoder and head, `--c-lr`); `optimise` runs
    that step beside the learner's main step, as `--contr-grad-mode` says. With `train=False`
    (`NotHiddenViews`) the views are built exactly as for contrastive runs but nothing is trained on them.
    """

    name = "contrastive"
    switch, weight_field = CONTRASTIVE, LAMDA_CONTR
    options = (C_TEMP, C_LR, C_DROP, C_SCORES, C_HARD, CONTR_GRAD_MODE, AUX_DECODER)
    train = True

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> ContrastiveReplay | None:
        return cls(cfg, context.model, context.conv, context.device, train=cls.train)

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        if cfg.c_scores and cfg.c_hard:
            raise ConfigError("--c-scores and --c-hard are alternatives; choose one")
        if cfg.aux_decoder != "random" and cfg.protocol_family != "CIFAR":
            raise ConfigError(f"--aux-decoder={cfg.aux_decoder} acts on CIFAR-100 only: {cfg.experiment}'s second "
                              "views are augmented images, without an auxiliary decoder; drop it")

    def __init__(self, cfg: BIRConfig, model: BIRModel, conv, device: torch.device, train: bool):
        self.cfg, self.model, self.conv, self.train = cfg, model, conv, train
        self.weight = cfg.lamda_contr
        self.rng = torch.Generator(device=device).manual_seed(cfg.stream_seed("contrastive"))
        init = torch.Generator().manual_seed(cfg.stream_seed("contrastive_init"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=init)))
            self.head = linear(model.spec.hidden_sizes[-1], PROJECTION_SIZE).to(device)
            self.aux_decoder = AuxDecoder().to(device).eval().requires_grad_(False) if conv is not None else None
        if self.aux_decoder is not None and cfg.aux_decoder == "trained":
            from tune_bir.nets import load_aux_decoder, load_matching_state

            load_matching_state(self.aux_decoder, load_aux_decoder(cfg.pretrained_conv, device),
                                cfg.pretrained_conv, "the auxiliary decoder")
        self.optimizer = adam(list(model.fcE.parameters()) + list(self.head.parameters()), cfg.c_lr, device)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def objective(self, batch: ReplayBatch) -> torch.Tensor | None:
        """L_con on [v1; v2]: the replayed memories' own features and those of their second views."""
        view = self.second_view(batch.h)
        if not self.train:
            return None
        # its own backward: through the replayed rows of the shared pass only (e_alone), not the current ones' zeros
        e_views = torch.cat([batch.e_alone, batch.model.encode(view)])
        return self.loss(e_views, batch.scores)

    def optimise(self, main: torch.Tensor, own: torch.Tensor, step: LearnerStep) -> None:
        """Own the step: the main step on L and the encoder step on `own` = lamda_contr * L_con; the other plugins
        (SI) see the main objective's gradient only (docs/algorithm.md "Supervised contrastive replay")."""
        step.zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.contr_grad_mode == "reference":
            # the original: fcE's gradient holds grad L + grad L_con and both optimisers step it
            main.backward(retain_graph=True)  # L_con shares the replay pass through fcE
            step.after_backward(main)
            own.backward()
            self.optimizer.step()
            step.step()
            step.after_step()
            return
        main_grads = torch.autograd.grad(main, step.params, allow_unused=True, retain_graph=True)
        own_grads = torch.autograd.grad(own, self.params, allow_unused=True)
        for p, g in zip(step.params, main_grads, strict=True):
            p.grad = g
        step.after_backward(main)
        step.step()
        # what the main step used, before the encoder's own gradients replace fcE's .grad
        used = {p: p.grad for p in step.params}
        for p, g in zip(self.params, own_grads, strict=True):
            p.grad = g
        self.optimizer.step()
        step.after_step(used)

    @torch.no_grad()
    def second_view(self, h: torch.Tensor) -> torch.Tensor:
        """v2: CIFAR conv(augment(D_aux(h))) with the frozen conv in eval mode; MNIST augment(h)."""
        if self.conv is None:
            return augment_mnist(h, self.rng)
        return self.conv(augment_cifar(self.aux_decoder(h), self.rng))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout (p = c_drop; only called in training: difference "dropout-train-only",
        docs/algorithm.md) drawing from the plugin's own random stream:
        the engine's results never depend on the process-wide torch RNG."""
        keep = 1.0 - self.cfg.c_drop
        if keep == 1.0:
            return x
        mask = torch.rand(x.shape, generator=self.rng, device=x.device) < keep
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
                "rng": self.rng.get_state(),
                "aux_decoder": None if self.aux_decoder is None else self.aux_decoder.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(self.rng, state["rng"])
        if self.aux_decoder is not None:
            self.aux_decoder.load_state_dict(state["aux_decoder"])


@register
class NotHiddenViews(ContrastiveReplay):
    """`--not-hidden`: the augmentation-matched baseline of contrastive runs (docs/algorithm.md "Not-hidden
    baseline"): the second views are built as for contrastive replay, nothing is trained on them. A control,
    not an exaggeration: a sweep's baseline keeps it; with --contrastive on it adds nothing.
    """

    name = "not_hidden"
    switch, weight_field = NOT_HIDDEN, None
    options = (AUX_DECODER,)
    off_in_baseline = False
    train = False

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> ContrastiveReplay | None:
        return None if cfg.contrastive else super().from_config(cfg, context)

    @classmethod
    def check(cls, cfg: BIRConfig) -> None:
        """Its options are the contrastive plugin's, checked there."""
