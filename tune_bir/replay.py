"""Replay modes as strategies (docs/algorithm.md "Generating replay", "The training step").

Each `--replay` mode is one small class with one interface the engine calls: `train_data(t)` (what a
task trains on), `objectives(h, y, t)` (the forward half of a step: every objective it optimises),
`step_generator(objectives)` (a separate generator's own optimiser), `after_task()` (the previous-model
snapshot) and `state_dict` / `load_state_dict`. `build_replay(cfg, ...)` picks the class from the config;
the engine compares no replay-mode strings.

| `--replay` | class | replayed inputs | scored by |
|---|---|---|---|
| `none` | `NoReplay` | - | - |
| `offline` | `JointTraining` | - (every task seen so far is trained on) | - |
| `current` | `CurrentReplay` (LwF) | the current inputs | the previous model |
| `generative` | `GenerativeReplay` | a separate VAE generator's samples | the previous model |
| `generative --feedback` | `FeedbackReplay` (BI-R) | the model's own decoder's samples | the previous model |
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from tune_bir import losses
from tune_bir.data import Split
from tune_bir.model import BIRModel
from tune_bir.nets import adam
from tune_bir.plugin import Plugin
from tune_bir.replay_batch import ReplayBatch, ReplayState

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig
    from tune_bir.scenario import Scenario


@dataclass
class VAEPass:
    """What one pass through a BI-R model gives, per sample (docs/algorithm.md "The model", "Losses")."""

    e: torch.Tensor            # encoder features
    mu: torch.Tensor           # posterior mean
    logvar: torch.Tensor       # posterior log-variance
    raw: torch.Tensor          # decoder output before its non-linearity (`BIRModel.activate` gives the reconstruction)
    recon_loss: torch.Tensor   # [N] reconstruction loss
    variational: torch.Tensor  # [N] (log q(z|h) - log p(z)) / image pixels
    encoder_inputs: tuple[torch.Tensor, ...]  # each fcE layer's input (`MLP.rows_alone`)


def vae_forward(model: BIRModel, h: torch.Tensor, class_weights: torch.Tensor, eps: torch.Tensor, n_active: int,
                image_pixels: int, recon_loss_from_raw: Callable) -> tuple[torch.Tensor, ...]:
    """The VAE pass as a pure function of its inputs (the noise `eps` drawn by the caller), so that torch.compile
    can take it whole: encoder features, posterior, decoder output, per-sample reconstruction and variational
    terms (docs/algorithm.md "Losses"), and the encoder layers' inputs."""
    e, encoder_inputs = model.encode_keeping_inputs(h)
    mu, logvar = model.posterior(e)
    z = model.reparameterise(mu, logvar, eps)
    raw = model.decode_raw(z, class_weights if model.gated else None)
    if model.spec.gmm_prior:
        log_prior = losses.gmm_log_prob(z, model.z_class_means[:n_active], model.z_class_logvars[:n_active],
                                        class_weights[:, :n_active])
    else:
        log_prior = losses.log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
    variational = losses.variational_per_sample(z, mu, logvar, log_prior, image_pixels)
    return e, mu, logvar, raw, recon_loss_from_raw(h, raw), variational, encoder_inputs


@dataclass
class Objectives:
    """The losses one training step minimises; each has its own optimiser (None = not this step)."""

    main: torch.Tensor                 # the model's objective (SI enters as its gradient)
    own: tuple[Plugin, torch.Tensor] | None = None   # a plugin's own objective (unweighted); it owns the step
    generator: torch.Tensor | None = None            # the separate VAE generator's objective


@dataclass
class Learner:
    """What a replay strategy works on: the parts of the engine a step reads."""

    cfg: BIRConfig
    model: BIRModel
    scenario: Scenario
    train: list[Split]                 # every task's training data, in the space the fc network sees
    image_pixels: int
    rng: torch.Generator               # the learner's stream: batches, replay, latent noise
    exaggeration_rng: torch.Generator  # the exaggeration terms' shared draws (class representatives)
    terms: list[Plugin]                # the replay-acting plugins, in registration order
    vae_forward: Callable              # `vae_forward`, compiled or not (`--compile`)
    recon_loss_from_raw: Callable
    log: Callable[[str, torch.Tensor], None]


def frozen_copy(model: nn.Module) -> BIRModel:
    snapshot = copy.deepcopy(model)
    snapshot.eval()
    snapshot.requires_grad_(False)
    return snapshot


def snapshot_from(template: BIRModel, state: dict | None) -> BIRModel | None:
    if state is None:
        return None
    snapshot = frozen_copy(template)
    snapshot.load_state_dict(state)
    return snapshot


class NoReplay:
    """`--replay=none`: the classifier on the current task only."""

    replays: ClassVar[bool] = False

    def __init__(self, learner: Learner, init_rng: torch.Generator):
        self.learner = learner
        self.previous: BIRModel | None = None            # frozen snapshot M' after the last task

    def train_data(self, t: int) -> Split:
        return self.learner.train[t - 1]

    def objectives(self, h: torch.Tensor, y: torch.Tensor, t: int) -> Objectives:
        """The forward half of a step: every objective this step optimises."""
        scenario = self.learner.scenario
        replay = self._replay(h, t) if t > 1 and self.replays else None
        return Objectives(self._classifier_loss(h, scenario.targets(y, t), scenario.columns(t, t), 1.0 / t, replay))

    def step_generator(self, objectives: Objectives) -> None:
        """A separate generator's optimiser step (only `GenerativeReplay` has one)."""

    def after_task(self) -> None:
        self.previous = frozen_copy(self.learner.model)

    def state_dict(self) -> dict:
        return {"previous": None if self.previous is None else self.previous.state_dict(),
                "generator_model": None, "previous_generator": None, "generator_optimizer": None}

    def load_state_dict(self, state: dict) -> None:
        self.previous = snapshot_from(self.learner.model, state["previous"])

    # -- parts shared by the replaying strategies
    @torch.no_grad()
    def _replay(self, h: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replayed inputs and the previous model's scores over previous classes."""
        raise NotImplementedError

    def _replay_classes(self, t: int) -> torch.Tensor:
        """Classes to replay: uniform over the classes of tasks before `t`, with replacement."""
        k_prev = self.learner.scenario.cpt * (t - 1)
        rng = self.learner.rng
        return torch.randint(0, k_prev, (self.learner.cfg.batch_replay,), generator=rng, device=rng.device)

    def _replay_class_weights(self, scores: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Soft (distillation) or hard class weights of replayed samples, zero-padded to all classes."""
        cfg = self.learner.cfg
        if cfg.distill:
            q = torch.softmax(scores / cfg.temp, dim=1)
        else:
            q = F.one_hot(scores.argmax(1), scores.shape[1]).float()
        return F.pad(q, (0, n_classes - q.shape[1]))

    def _with_replay(self, h: torch.Tensor, y: torch.Tensor,
                     replay: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Current inputs stacked with replayed ones, and their class weights (one-hot / replay weights)."""
        n_classes = self.learner.scenario.n_outputs
        weights = F.one_hot(y, n_classes).float()
        if replay is None:
            return h, weights
        h_replay, scores = replay
        return torch.cat([h, h_replay]), torch.cat([weights, self._replay_class_weights(scores, n_classes)])

    def _replay_prediction_loss(self, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cfg = self.learner.cfg
        if cfg.distill:
            return losses.distillation_loss(logits, scores, cfg.temp)
        return F.cross_entropy(logits, scores.argmax(1))

    def _vae_pass(self, model: BIRModel, h: torch.Tensor, class_weights: torch.Tensor, n_active: int) -> VAEPass:
        """One pass through encoder, latent and decoder, with per-sample reconstruction / variational terms."""
        # the reparameterisation noise, drawn before the pass: nothing else draws from the learner's random stream in
        # between, so the numbers are those of drawing it where the latent is formed
        eps = model.latent_noise(len(h), self.learner.rng, h.device)
        return VAEPass(*self.learner.vae_forward(model, h, class_weights, eps, n_active, self.learner.image_pixels,
                                                 self.learner.recon_loss_from_raw))

    def _classifier_loss(self, h, target, cols, rnt, replay) -> torch.Tensor:
        """Classifier alone (no replay, LwF, joint) or beside a separate generator."""
        model, log = self.learner.model, self.learner.log
        logits = model.predict(h)[:, cols]
        prediction = F.cross_entropy(logits, target)
        log("prediction", prediction)
        if replay is None:
            return prediction
        h_replay, scores = replay
        replay_logits = model.predict(h_replay)[:, cols]
        distillation = self._replay_prediction_loss(replay_logits, scores)
        log("distillation", distillation)
        return rnt * prediction + (1 - rnt) * distillation


class JointTraining(NoReplay):
    """`--replay=offline`: joint training, every task seen so far stored and trained on (the upper bound)."""

    def train_data(self, t: int) -> Split:
        parts = self.learner.train[:t]
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


class CurrentReplay(NoReplay):
    """`--replay=current` (LwF): the current inputs, scored by the previous model."""

    replays = True

    @torch.no_grad()
    def _replay(self, h: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_prev = self.learner.scenario.cpt * (t - 1)
        return h, self.previous.predict(h)[:, :k_prev]


class GenerativeReplay(NoReplay):
    """`--replay=generative` without `--feedback`: a separate VAE generator with its own optimiser replays
    samples that the previous classifier scores."""

    replays = True

    def __init__(self, learner: Learner, init_rng: torch.Generator):
        super().__init__(learner, init_rng)
        device = learner.rng.device
        # the learner's sizes, prior and gates, without a classifier (drawn from `init_rng` after the learner's)
        spec = dataclasses.replace(learner.model.spec, classifier=False, decoder=True)
        self.generator_model = BIRModel(spec, init_rng).to(device)
        self.generator_optimizer = adam(self.generator_model.parameters(), learner.cfg.lr, device)
        self.previous_generator: BIRModel | None = None

    @torch.no_grad()
    def _replay(self, h: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_prev = self.learner.scenario.cpt * (t - 1)
        h_replay = self.previous_generator.generate(self._replay_classes(t), self.learner.rng)
        return h_replay, self.previous.predict(h_replay)[:, :k_prev]

    def objectives(self, h: torch.Tensor, y: torch.Tensor, t: int) -> Objectives:
        scenario = self.learner.scenario
        rnt = 1.0 / t
        replay = self._replay(h, t) if t > 1 else None
        main = self._classifier_loss(h, scenario.targets(y, t), scenario.columns(t, t), rnt, replay)
        return Objectives(main, generator=self._generator_loss(h, y, rnt, replay, t))

    def _generator_loss(self, h, y, rnt, replay, t) -> torch.Tensor:
        """Loss of the separate VAE generator on current (+ replayed) inputs (it has its own optimiser)."""
        log = self.learner.log
        inputs, weights = self._with_replay(h, y, replay)
        vae = self._vae_pass(self.generator_model, inputs, weights, self.learner.scenario.cpt * t)
        per_sample = vae.recon_loss + vae.variational
        cur = per_sample[:len(y)].mean()
        log("generator_current", cur)
        loss = cur
        if replay is not None:
            rep = per_sample[len(y):].mean()
            log("generator_replay", rep)
            loss = rnt * cur + (1 - rnt) * rep
        return loss

    def step_generator(self, objectives: Objectives) -> None:
        self.generator_optimizer.zero_grad(set_to_none=True)
        objectives.generator.backward()
        self.generator_optimizer.step()

    def after_task(self) -> None:
        super().after_task()
        self.previous_generator = frozen_copy(self.generator_model)

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "generator_model": self.generator_model.state_dict(),
            "previous_generator": None if self.previous_generator is None else self.previous_generator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator_model.load_state_dict(state["generator_model"])
        self.previous_generator = snapshot_from(self.generator_model, state["previous_generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])


class FeedbackReplay(NoReplay):
    """`--replay=generative --feedback` (BI-R): replay-through-feedback, the model's own decoder replays, current
    and replayed samples go through ONE pass, and the exaggeration terms act on the replayed part."""

    replays = True

    @torch.no_grad()
    def _replay(self, h: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_prev = self.learner.scenario.cpt * (t - 1)
        h_replay = self.previous.generate(self._replay_classes(t), self.learner.rng)
        return h_replay, self.previous.predict(h_replay)[:, :k_prev]

    def objectives(self, h: torch.Tensor, y: torch.Tensor, t: int) -> Objectives:
        """The model's objective and the (plugin, unweighted objective) of a plugin that owns the step."""
        learner = self.learner
        cfg, model, log = learner.cfg, learner.model, learner.log
        cols, target, rnt = learner.scenario.columns(t, t), learner.scenario.targets(y, t), 1.0 / t
        replay = self._replay(h, t) if t > 1 else None
        n_cur, n_active = len(y), cols.stop
        own, logged_after = None, {}
        inputs, weights = self._with_replay(h, y, replay)
        if replay is not None:
            h_replay, scores = replay
        vae = self._vae_pass(model, inputs, weights, n_active)
        logits = model.classify(vae.e)[:, cols]
        cur = slice(0, n_cur)
        terms = {"recon_current": vae.recon_loss[cur].mean(),
                 "variational_current": vae.variational[cur].mean(),
                 "prediction": F.cross_entropy(logits[cur], target)}
        loss_current = sum(terms.values())
        total = rnt * loss_current
        if replay is not None:
            rep = slice(n_cur, None)
            terms |= {"recon_replay": vae.recon_loss[rep].mean(),
                      "variational_replay": vae.variational[rep].mean(),
                      "distillation": self._replay_prediction_loss(logits[rep], scores)}
            loss_replay = terms["recon_replay"] + terms["variational_replay"] + terms["distillation"]
            if learner.terms:
                # the replay-batch state and the reconstruction are made on first use, by the terms that need them
                batch = ReplayBatch(
                    h=h_replay, scores=scores, e=vae.e[rep], mu=vae.mu[rep], logvar=vae.logvar[rep],
                    e_alone=lambda: model.fcE.rows_alone(vae.encoder_inputs, vae.e, rep),
                    recon=lambda: model.activate(vae.raw[rep]), model=model, image_pixels=learner.image_pixels,
                    state=lambda: ReplayState.build(scores, cfg.n_rep, cfg.rep_f if cfg.use_rep_f else None,
                                                    learner.exaggeration_rng))
                for term in learner.terms:
                    value = term.replay_loss(batch)
                    if value is not None:
                        terms[term.name] = value
                        loss_replay = loss_replay + term.weight * value
                    for name, stat in term.stats(batch).items():
                        log(name, stat)
                for term in learner.terms:
                    value = term.objective(batch)
                    if value is not None:
                        own = term, value
                        logged_after[term.name] = value
            total = total + (1 - rnt) * loss_replay
        for name, value in (terms | logged_after).items():
            log(name, value)
        return Objectives(total, own)


def replay_class(cfg: BIRConfig) -> type[NoReplay]:
    """The strategy of a config's `--replay` (and `--feedback`)."""
    if cfg.replay == "generative":
        return FeedbackReplay if cfg.feedback else GenerativeReplay
    return {"none": NoReplay, "offline": JointTraining, "current": CurrentReplay}[cfg.replay]


def model_has_decoder(cfg: BIRConfig) -> bool:
    """The learner's model has a decoder of its own: replay-through-feedback."""
    return replay_class(cfg) is FeedbackReplay
