"""The one training loop of tune_bir: BI-R (+SI) on a continual-learning protocol.

`Engine` is built from one resolved config; `train_segment()` trains up to N iterations of the
current task (finishing the task runs evaluation, the plugins' `after_task` and the previous-model
snapshot); `evaluate()` returns the metrics of docs/algorithm.md "Evaluation metrics";
`state_dict()` / `load_state_dict()` cover everything needed for a bit-identical continuation.
Everything optional (SI, the exaggeration terms) is a plugin (`tune_bir.plugin`, built by `tune_bir.terms`):
the engine calls their life-cycle hooks and knows none of them by name. No Ray and no MLflow in here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from tune_bir import losses
from tune_bir.config import BIRConfig
from tune_bir.data import Protocol, Split, load_protocol
from tune_bir.errors import ConfigError
from tune_bir.generators import restore_generator
from tune_bir.model import BIRModel, ModelSpec
from tune_bir.nets import ConvLayers, adam, load_conv_layers
from tune_bir.plugin import Plugin, PluginContext, TaskInfo
from tune_bir.replay_batch import ReplayBatch, ReplayState
from tune_bir.terms import build_plugins

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 4   # 3: every term's state under "terms"; 4: every plugin's (SI's too) under "plugins"
EVAL_BATCH = 1000


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda[:N]` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 autocast needs a CUDA device that supports it (the CPU always does, natively or emulated)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch's float32 matmul precision ("highest" | "high" = TF32 | "medium") inside the block, restored after:
    `--precision tf32` must not leak into evaluation or into other code of the process."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def tf32_matmuls(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`--precision tf32`: float32 matrix products on a CUDA device's TF32 units inside the block; elsewhere (and
    on the CPU, which has no TF32 units) nothing changes."""
    if precision == "tf32" and device.type == "cuda":
        return float32_matmul_precision("high")
    return contextlib.nullcontext()


def compiled(fn: Callable, mode: str) -> Callable:
    """`fn` itself (`--compile off`), or torch.compile of it in that mode (reduce-overhead: CUDA graphs on a GPU)."""
    if mode == "off":
        return fn
    return torch.compile(fn, mode=mode)


# ---------------------------------------------------------------------------------------------
# Data in "hidden" space: pixels (MNIST) or frozen conv features (CIFAR), cached once on the device.


@dataclass
class HiddenData:
    """Per-task train / val / test inputs in the space the fc network sees, on one device."""

    train: list[Split]
    val: list[Split]
    test: list[Split]
    in_shape: tuple[int, ...]
    image_pixels: int          # P: image pixels, even for feature replay (docs/algorithm.md "Variational loss")
    n_classes: int
    classes_per_task: int


@torch.no_grad()
def _through_conv(conv: ConvLayers | None, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if conv is None:
        return x.to(device)
    if len(x) == 0:
        return torch.empty(0, *ConvLayers.out_shape, device=device)
    # conv layers are frozen (eval, no grad): their features of real images are deterministic -> cache
    return torch.cat([conv(x[i:i + EVAL_BATCH].to(device)) for i in range(0, len(x), EVAL_BATCH)])


def prepare_hidden_data(protocol: Protocol, conv: ConvLayers | None, device: torch.device) -> HiddenData:
    """Move a protocol onto the device, through the frozen conv layers when there are any."""
    def convert(splits):
        return [Split(_through_conv(conv, s.x, device), s.y.to(device)) for s in splits]

    in_shape = ConvLayers.out_shape if conv is not None else tuple(protocol.image_shape)
    return HiddenData(convert(protocol.train), convert(protocol.val), convert(protocol.test),
                      tuple(in_shape), int(torch.tensor(protocol.image_shape).prod()),
                      protocol.n_classes, protocol.classes_per_task)


@dataclass
class VAEPass:
    """What one pass through a BI-R model gives, per sample (docs/algorithm.md "The model", "Losses")."""

    e: torch.Tensor            # encoder features
    mu: torch.Tensor           # posterior mean
    logvar: torch.Tensor       # posterior log-variance
    raw: torch.Tensor          # decoder output before its non-linearity (`BIRModel.activate` gives the reconstruction)
    recon_loss: torch.Tensor   # [N] reconstruction loss
    variational: torch.Tensor  # [N] (log q(z|h) - log p(z)) / image pixels


def vae_forward(model: BIRModel, h: torch.Tensor, class_weights: torch.Tensor, eps: torch.Tensor, n_active: int,
                image_pixels: int, recon_loss_from_raw: Callable) -> tuple[torch.Tensor, ...]:
    """The VAE pass as a pure function of its inputs (the noise `eps` drawn by the caller), so that torch.compile
    can take it whole: encoder features, posterior, decoder output, per-sample reconstruction and variational
    terms (docs/algorithm.md "Losses")."""
    e = model.encode(h)
    mu, logvar = model.posterior(e)
    z = model.reparameterise(mu, logvar, eps)
    raw = model.decode_raw(z, class_weights if model.gated else None)
    if model.spec.gmm_prior:
        log_prior = losses.gmm_log_prob(z, model.z_class_means[:n_active], model.z_class_logvars[:n_active],
                                        class_weights[:, :n_active])
    else:
        log_prior = losses.log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
    variational = losses.variational_per_sample(z, mu, logvar, log_prior, image_pixels)
    return e, mu, logvar, raw, recon_loss_from_raw(h, raw), variational


@dataclass
class SplitScores:
    """Per-task scores on one split, tasks 1..seen."""

    accuracy: list[float]       # share of samples whose argmax over the active columns is right
    probability: list[float]    # mean softmax probability (over the active columns) of the true class


@dataclass
class Objectives:
    """The losses one training step minimises; each has its own optimiser (None = not this step)."""

    main: torch.Tensor                 # the model's objective (SI enters as its gradient)
    own: tuple[Plugin, torch.Tensor] | None   # a plugin's own objective (unweighted); it owns the step
    generator: torch.Tensor | None     # the separate VAE generator's objective (`--replay=generative` alone)


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


# ---------------------------------------------------------------------------------------------
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

    def __init__(self, n: int, batch: int, generator: torch.Generator, device: torch.device):
        self.n, self.batch, self.generator, self.device = n, batch, generator, device
        self.perm = torch.empty(0, dtype=torch.long, device=device)
        self.cursor = 0

    def next_indices(self) -> torch.Tensor:
        if self.cursor + self.batch > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.generator, device=self.device)
            self.cursor = 0
        idx = self.perm[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"].to(self.device), int(state["cursor"])


# ---------------------------------------------------------------------------------------------
class Engine:
    """BI-R(+SI) learner over a whole protocol; one instance per run (or per Tune trial)."""

    def __init__(self, config: BIRConfig, data: HiddenData | None = None, protocol: Protocol | None = None):
        self.cfg = cfg = config.resolved()   # free when the caller resolved it already
        self.device = resolve_device(cfg.device)
        check_precision(cfg.precision, self.device)
        # the random streams of config.SEED_STREAMS; the global seed (--seed itself) once, at the start of a run:
        # weight init (never inside the loop: difference "seed-once", docs/algorithm.md)
        torch.manual_seed(cfg.seed)
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.stream_seed("learner"))
        # the exaggeration terms' own draws (class representatives): switching a term on, or weighting it by
        # zero, leaves the learner's batches, replay and noise as they are, i.e. the baseline's
        self.exaggeration_rng = torch.Generator(device=self.device).manual_seed(cfg.stream_seed("exaggeration"))
        init_rng = torch.Generator().manual_seed(cfg.stream_seed("init"))   # CPU, device-free
        self.conv = self._load_conv(cfg)
        if data is None:
            protocol = protocol or load_protocol(cfg.experiment, data_dir=cfg.data_dir, seed=cfg.seed,
                                                 n_tasks=cfg.tasks, val_fraction=cfg.val_fraction)
            data = prepare_hidden_data(protocol, self.conv, self.device)
        self.data = data
        self.scenario = Scenario(cfg.scenario, data.classes_per_task, data.n_classes)
        smallest = min(len(t.y) for t in data.train)
        if cfg.batch > smallest:
            raise ConfigError(f"--batch={cfg.batch} exceeds the {smallest} training samples of a task")
        self.recon_loss = losses.RECON_LOSSES[cfg.recon_loss]
        self.recon_loss_from_raw = losses.RECON_LOSSES_FROM_RAW[cfg.recon_loss]
        self._vae_forward = compiled(vae_forward, cfg.compile)

        generative = cfg.replay == "generative"
        decoder_out = "sigmoid" if cfg.recon_loss == "BCE" else "linear"
        n_out = self.scenario.n_outputs
        self.model = BIRModel(ModelSpec(
            data.in_shape, n_out, cfg.fc_units, cfg.fc_layers, cfg.z_dim, classifier=True,
            decoder=generative and cfg.feedback, gmm_prior=cfg.prior == "GMM",
            dg_prop=cfg.dg_prop if cfg.dg_gates else 0.0, output=decoder_out), init_rng).to(self.device)
        # separate VAE generator: `--replay=generative` without replay-through-feedback
        self.generator_model = BIRModel(ModelSpec(
            data.in_shape, n_out, cfg.fc_units, cfg.fc_layers, cfg.z_dim, classifier=False, decoder=True,
            gmm_prior=cfg.prior == "GMM", dg_prop=cfg.dg_prop if cfg.dg_gates else 0.0, output=decoder_out),
            init_rng).to(self.device) if generative and not cfg.feedback else None

        # the plugins the config switches on (tune_bir.terms), in registration order; the replay-acting ones
        # (exaggeration terms) also get every replay step's batch
        self.plugins: list[Plugin] = build_plugins(
            cfg, PluginContext(model=self.model, conv=self.conv, device=self.device, recon_loss=self.recon_loss))
        self.terms = [p for p in self.plugins if p.acts_on_replay]
        # the main optimiser holds every trainable model parameter (a term's own parameters are not ones)
        self.optimizer = adam(self.model.parameters(), cfg.lr, self.device)
        self.generator_optimizer = adam(
            self.generator_model.parameters(), cfg.lr, self.device) if self.generator_model else None
        self.main_step = OptimiserStep(self.model, self.optimizer, self.plugins, cfg.grad_clip, self._log)

        self.previous: BIRModel | None = None            # frozen snapshot M' after the last task
        self.previous_generator: BIRModel | None = None
        self.task = 0                                    # tasks finished
        self.iter_in_task = 0
        self.iters_done = 0
        self.acc_history: list[list[float]] = []         # a[t][k] on the test split after each task
        self.val_acc_history: list[list[float]] = []
        self.sampler: BatchSampler | None = None
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0

    # -- construction helpers
    def _load_conv(self, cfg: BIRConfig) -> ConvLayers | None:
        if cfg.protocol_family != "CIFAR":
            return None
        return load_conv_layers(cfg.pretrained_conv, self.device)

    @property
    def n_tasks(self) -> int:
        return len(self.data.train)

    @property
    def done(self) -> bool:
        return self.task >= self.n_tasks

    @property
    def current_task(self) -> int:
        """1-based task being trained (or the last task when done)."""
        return min(self.task + 1, self.n_tasks)

    def _task_train_data(self, t: int) -> Split:
        if self.cfg.replay == "offline":  # joint training on everything seen so far
            parts = self.data.train[:t]
            return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
        return self.data.train[t - 1]

    # -- the training step ---------------------------------------------------------------------
    def train_segment(self, n_iters: int | None = None,
                      on_iteration: Callable[[], None] | None = None) -> dict[str, float]:
        """Train up to `n_iters` iterations (default: the rest of the current task); return metrics."""
        if self.done:
            raise RuntimeError("all tasks are trained already")
        start = time.perf_counter()
        t = self.task + 1
        remaining = self.cfg.iters - self.iter_in_task
        n = remaining if n_iters is None or n_iters <= 0 else min(n_iters, remaining)
        train = self._task_train_data(t)
        if self.sampler is None:
            self.sampler = BatchSampler(len(train.y), self.cfg.batch, self.rng, self.device)
            if self.iter_in_task == 0:
                info = self._task_info(t)
                for plugin in self.plugins:
                    plugin.before_task(info)
        self._loss_sums, self._loss_count = {}, 0
        self.model.train()
        for _ in range(n):
            idx = self.sampler.next_indices()
            self._train_iteration(train.x[idx], train.y[idx], t)
            self.iter_in_task += 1
            self.iters_done += 1
            if on_iteration is not None:
                on_iteration()
        finished = self.iter_in_task >= self.cfg.iters
        metrics = self._segment_metrics(t, finished)
        if finished:
            self._end_task()
        metrics["time_this_step_s"] = time.perf_counter() - start
        return metrics

    def train_task(self, on_iteration: Callable[[], None] | None = None) -> dict[str, float]:
        """Train the rest of the current task."""
        return self.train_segment(None, on_iteration)

    def _task_info(self, t: int) -> TaskInfo:
        return TaskInfo(t, self._task_train_data(t), self.scenario.columns(t, t),
                        lambda y: self.scenario.targets(y, t))

    def _log(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        self._loss_sums[name] = self._loss_sums[name] + value if name in self._loss_sums else value

    def _train_iteration(self, h: torch.Tensor, y: torch.Tensor, t: int) -> None:
        if self.cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # the last step's graph outputs are no longer read
        with tf32_matmuls(self.cfg.precision, self.device):   # the backward pass's products too
            self._train_step(h, y, t)

    def _train_step(self, h: torch.Tensor, y: torch.Tensor, t: int) -> None:
        # autocast wraps the forward passes only; backward and the optimisers run outside it
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            objectives = self._objectives(h, y, t)
        main = objectives.main
        for plugin in self.plugins:
            value = plugin.before_backward()
            if value is not None:
                self._log(plugin.name, value)
                main = main + plugin.weight * value
        # the SI penalty enters as its gradient, added after backward (OptimiserStep.after_backward)
        if objectives.own is None:
            self.main_step.run(main)
        else:
            owner, value = objectives.own
            owner.optimise(main, owner.weight * value, self.main_step)
        if objectives.generator is not None:
            self.generator_optimizer.zero_grad(set_to_none=True)
            objectives.generator.backward()
            self.generator_optimizer.step()
        self._loss_count += 1

    def _objectives(self, h: torch.Tensor, y: torch.Tensor, t: int) -> Objectives:
        """The forward half of a step: every objective this step optimises."""
        cfg = self.cfg
        cols = self.scenario.columns(t, t)
        target = self.scenario.targets(y, t)
        rnt = 1.0 / t
        replay = self._replay(h, t) if t > 1 and cfg.replay in ("generative", "current") else None
        own = generator_loss = None
        if cfg.replay == "generative" and cfg.feedback:
            total, own = self._feedback_loss(h, y, target, cols, rnt, replay, t)
        else:
            total = self._classifier_loss(h, target, cols, rnt, replay)
            if self.generator_model is not None:
                generator_loss = self._generator_loss(h, y, rnt, replay, t)
        return Objectives(total, own, generator_loss)

    @torch.no_grad()
    def _replay(self, h: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replayed inputs and the previous model's scores over previous classes
        (docs/algorithm.md "Generating replay")."""
        k_prev = self.scenario.cpt * (t - 1)
        if self.cfg.replay == "current":  # LwF: the current inputs, scored by the previous model
            return h, self.previous.predict(h)[:, :k_prev]
        source = self.previous if self.generator_model is None else self.previous_generator
        h_replay = source.generate(self._replay_classes(t), self.rng)
        return h_replay, self.previous.predict(h_replay)[:, :k_prev]

    def _replay_classes(self, t: int) -> torch.Tensor:
        """Classes to replay: uniform over the classes of tasks before `t`, with replacement."""
        k_prev = self.scenario.cpt * (t - 1)
        return torch.randint(0, k_prev, (self.cfg.batch_replay,), generator=self.rng, device=self.device)

    def _replay_class_weights(self, scores: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Soft (distillation) or hard class weights of replayed samples, zero-padded to all classes."""
        if self.cfg.distill:
            q = torch.softmax(scores / self.cfg.temp, dim=1)
        else:
            q = F.one_hot(scores.argmax(1), scores.shape[1]).float()
        return F.pad(q, (0, n_classes - q.shape[1]))

    def _with_replay(self, h: torch.Tensor, y: torch.Tensor,
                     replay: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Current inputs stacked with replayed ones, and their class weights (one-hot / replay weights)."""
        n_classes = self.scenario.n_outputs
        weights = F.one_hot(y, n_classes).float()
        if replay is None:
            return h, weights
        h_replay, scores = replay
        return torch.cat([h, h_replay]), torch.cat([weights, self._replay_class_weights(scores, n_classes)])

    def _replay_prediction_loss(self, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cfg.distill:
            return losses.distillation_loss(logits, scores, self.cfg.temp)
        return F.cross_entropy(logits, scores.argmax(1))

    def _vae_pass(self, model: BIRModel, h: torch.Tensor, class_weights: torch.Tensor, n_active: int) -> VAEPass:
        """One pass through encoder, latent and decoder, with per-sample reconstruction / variational terms."""
        # the reparameterisation noise, drawn before the pass: nothing else draws from the engine generator in
        # between, so the numbers are those of drawing it where the latent is formed
        eps = model.latent_noise(len(h), self.rng, h.device)
        return VAEPass(*self._vae_forward(model, h, class_weights, eps, n_active, self.data.image_pixels,
                                          self.recon_loss_from_raw))

    def _feedback_loss(self, h, y, target, cols, rnt, replay, t
                       ) -> tuple[torch.Tensor, tuple[Plugin, torch.Tensor] | None]:
        """Replay-through-feedback: current and replayed samples in ONE pass through the model
        (docs/algorithm.md "The training step").

        Returns the model's objective and the (term, unweighted objective) of a term that steps itself.
        """
        cfg, model = self.cfg, self.model
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
            if self.terms:
                # the replay-batch state and the reconstruction are made on first use, by the terms that need them
                batch = ReplayBatch(
                    h=h_replay, scores=scores, e=vae.e[rep], mu=vae.mu[rep], logvar=vae.logvar[rep],
                    recon=lambda: model.activate(vae.raw[rep]), model=model, image_pixels=self.data.image_pixels,
                    state=lambda: ReplayState.build(scores, cfg.n_rep, cfg.rep_f if cfg.use_rep_f else None,
                                                    self.exaggeration_rng))
                for term in self.terms:
                    value = term.replay_loss(batch)
                    if value is not None:
                        terms[term.name] = value
                        loss_replay = loss_replay + term.weight * value
                    for name, stat in term.stats(batch).items():
                        self._log(name, stat)
                for term in self.terms:
                    value = term.objective(batch)
                    if value is not None:
                        own = term, value
                        logged_after[term.name] = value
            total = total + (1 - rnt) * loss_replay
        for name, value in (terms | logged_after).items():
            self._log(name, value)
        return total, own

    def _classifier_loss(self, h, target, cols, rnt, replay) -> torch.Tensor:
        """Classifier alone (no replay, LwF, joint) or beside a separate generator."""
        logits = self.model.predict(h)[:, cols]
        prediction = F.cross_entropy(logits, target)
        self._log("prediction", prediction)
        if replay is None:
            return prediction
        h_replay, scores = replay
        replay_logits = self.model.predict(h_replay)[:, cols]
        distillation = self._replay_prediction_loss(replay_logits, scores)
        self._log("distillation", distillation)
        return rnt * prediction + (1 - rnt) * distillation

    def _generator_loss(self, h, y, rnt, replay, t) -> torch.Tensor:
        """Loss of the separate VAE generator on current (+ replayed) inputs (it has its own optimiser)."""
        gen = self.generator_model
        inputs, weights = self._with_replay(h, y, replay)
        vae = self._vae_pass(gen, inputs, weights, self.scenario.cpt * t)
        per_sample = vae.recon_loss + vae.variational
        cur = per_sample[:len(y)].mean()
        self._log("generator_current", cur)
        loss = cur
        if replay is not None:
            rep = per_sample[len(y):].mean()
            self._log("generator_replay", rep)
            loss = rnt * cur + (1 - rnt) * rep
        return loss

    # -- end of a task -------------------------------------------------------------------------
    def _end_task(self) -> None:
        """The plugins' `after_task` (SI consolidation), previous-model snapshot, next task, in this order
        (docs/algorithm.md "The training step")."""
        info = self._task_info(self.task + 1)
        for plugin in self.plugins:
            plugin.after_task(info)
        self.previous = _frozen_copy(self.model)
        if self.generator_model is not None:
            self.previous_generator = _frozen_copy(self.generator_model)
        self.task += 1
        self.iter_in_task = 0
        self.sampler = None

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, split: str = "test", seen: int | None = None) -> SplitScores:
        """Accuracy and mean true-class probability on each task seen so far
        (docs/algorithm.md "Evaluation metrics").

        Predictions are the argmax over the active columns; probabilities are the softmax over them.
        """
        seen = seen if seen is not None else self.current_task
        tasks = getattr(self.data, split)
        was_training = self.model.training
        self.model.eval()
        accuracy, probability = [], []
        for k in range(1, seen + 1):
            cols = self.scenario.columns(k, seen)
            data = tasks[k - 1]
            logits = torch.cat([self.model.predict(data.x[i:i + EVAL_BATCH])[:, cols]
                                for i in range(0, len(data.y), EVAL_BATCH)])
            target = self.scenario.targets(data.y, k)
            acc = multiclass_accuracy(logits.argmax(1), target, num_classes=logits.shape[1], average="micro")
            accuracy.append(float(acc))
            probability.append(float(torch.softmax(logits, 1).gather(1, target[:, None]).mean()))
        self.model.train(was_training)
        return SplitScores(accuracy, probability)

    def accuracies(self, split: str = "test", seen: int | None = None) -> list[float]:
        """Accuracy on each task seen so far (argmax over the active columns;
        docs/algorithm.md "Evaluation metrics")."""
        return self.scores(split, seen).accuracy

    @torch.no_grad()
    def outputs_finite(self) -> bool:
        """Weights, and the model's outputs on a few current-task inputs, are all finite (no divergence)."""
        model = self.model
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return False
        task = self.data.train[min(self.task, self.n_tasks - 1)]
        h, y = task.x[:64], task.y[:64]
        e = model.encode(h)
        outputs = [e, model.classify(e)]
        if model.spec.decoder:
            mu, logvar = model.posterior(e)
            gate = F.one_hot(y, model.spec.n_classes).float() if model.gated else None
            outputs += [mu, logvar, model.decode(mu, gate)]
        return all(bool(torch.isfinite(o).all()) for o in outputs)

    def _segment_metrics(self, t: int, finished: bool) -> dict[str, float]:
        metrics: dict[str, float] = {"task": float(self.task + (1 if finished else 0)),
                                     "iters_done": float(self.iters_done)}
        splits = [("test", "", self.acc_history)]
        if len(self.data.val[0].y) > 0:
            splits.append(("val", "val_", self.val_acc_history))
        for split, prefix, history in splits:
            scores = self.scores(split, t)
            row = scores.accuracy
            metrics |= accuracy_metrics(row, history, prefix)
            metrics[f"{prefix}prob_avg"] = sum(scores.probability) / t
            if finished:
                history.append(row)
        count = max(self._loss_count, 1)
        # loss terms are reported as loss/<name>; diagnostics already carry their own prefix (stats/...)
        metrics |= {(name if "/" in name else f"loss/{name}"): float(value) / count
                    for name, value in self._loss_sums.items()}
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Accuracy metrics on the tasks seen so far, without training."""
        t = self.current_task if not self.done else self.n_tasks
        histories = self.acc_history[:t - 1]
        metrics = accuracy_metrics(self.accuracies("test", t), histories, "")
        if len(self.data.val[0].y) > 0:
            metrics |= accuracy_metrics(self.accuracies("val", t), self.val_acc_history[:t - 1], "val_")
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical continuation needs (model, previous model, plugins, optimisers, RNG, position)."""
        def sd(module):
            return None if module is None else module.state_dict()

        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "position": {"task": self.task, "iter_in_task": self.iter_in_task, "iters_done": self.iters_done},
            "model": self.model.state_dict(),
            "previous": sd(self.previous),
            "generator_model": sd(self.generator_model),
            "previous_generator": sd(self.previous_generator),
            "optimizer": self.optimizer.state_dict(),
            "generator_optimizer": sd(self.generator_optimizer),
            "plugins": self._plugins_state(self.plugins),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "rng": {"engine": self.rng.get_state(), "exaggeration": self.exaggeration_rng.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "acc_history": self.acc_history,
            "val_acc_history": self.val_acc_history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by `state_dict()` of an engine with the same config."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}: this code reads format "
                             f"{CHECKPOINT_FORMAT} only (a learner saved by other code cannot continue here)")
        missing = sorted(plugin.name for plugin in self.plugins if plugin.name not in state["plugins"])
        if missing:
            raise ValueError(f"the checkpoint holds no state of the plugin(s) {missing} of this config")
        pos = state["position"]
        self.task, self.iter_in_task, self.iters_done = pos["task"], pos["iter_in_task"], pos["iters_done"]
        self.model.load_state_dict(state["model"])
        self.previous = self._snapshot_from(self.model, state["previous"])
        if self.generator_model is not None:
            self.generator_model.load_state_dict(state["generator_model"])
            self.previous_generator = self._snapshot_from(self.generator_model, state["previous_generator"])
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        for plugin in self.plugins:
            plugin.load_state_dict(state["plugins"][plugin.name])
        self.sampler = None
        if state["sampler"] is not None:
            train = self._task_train_data(self.task + 1)
            self.sampler = BatchSampler(len(train.y), self.cfg.batch, self.rng, self.device)
            self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        # generator states are CPU byte tensors (map_location may have moved them); a GPU's cannot continue a CPU
        # generator or the reverse: those streams are reseeded (docs/architecture.md "GPU")
        restore_generator(self.rng, rng["engine"])
        restore_generator(self.exaggeration_rng, rng["exaggeration"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.acc_history = [list(r) for r in state["acc_history"]]
        self.val_acc_history = [list(r) for r in state["val_acc_history"]]

    def adopt_first_task(self, state: dict) -> None:
        """Continue from the end of task 1 as trained by another engine whose config differs only in fields
        that act on replay (`BIRConfig.first_task_fields`): the same learner this one would have become.

        This engine keeps what task 1 never touched and the other engine may lack: the state of its replay-acting
        plugins (e.g. the contrastive plugin's head, optimiser and generators).
        """
        if (self.task, self.iter_in_task) != (0, 0):
            raise ValueError("adopt_first_task needs an engine that has not trained yet")
        if (state["position"]["task"], state["position"]["iter_in_task"]) != (1, 0):
            raise ValueError("adopt_first_task needs a state saved right at the end of task 1")
        theirs = type(self.cfg).from_dict(state["config"]).first_task_fields()
        ours = self.cfg.first_task_fields()
        differing = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differing:
            raise ValueError(f"task 1 of this config differs from the saved one in {differing}")
        self.load_state_dict(state | {"plugins": state["plugins"] | self._plugins_state(self.terms)})

    @staticmethod
    def _plugins_state(plugins: list[Plugin]) -> dict[str, dict]:
        return {plugin.name: plugin.state_dict() for plugin in plugins}

    @staticmethod
    def _snapshot_from(template: BIRModel, state: dict | None) -> BIRModel | None:
        if state is None:
            return None
        snapshot = _frozen_copy(template)
        snapshot.load_state_dict(state)
        return snapshot


def _frozen_copy(model: nn.Module) -> BIRModel:
    snapshot = copy.deepcopy(model)
    snapshot.eval()
    snapshot.requires_grad_(False)
    return snapshot


def accuracy_metrics(row: list[float], history: list[list[float]], prefix: str) -> dict[str, float]:
    """acc_avg, acc_task_<k>, bwt and forgetting_avg from the current row and finished rows
    (docs/algorithm.md "Evaluation metrics")."""
    t = len(row)
    metrics = {f"{prefix}acc_task_{k + 1}": acc for k, acc in enumerate(row)}
    metrics[f"{prefix}acc_avg"] = sum(row) / t
    previous = range(t - 1)
    if t > 1:
        metrics[f"{prefix}bwt"] = sum(row[k] - history[k][k] for k in previous) / (t - 1)
        metrics[f"{prefix}forgetting_avg"] = sum(
            max(history[l][k] for l in range(k, t - 1)) - row[k] for k in previous) / (t - 1)
    else:
        metrics[f"{prefix}bwt"] = 0.0
        metrics[f"{prefix}forgetting_avg"] = 0.0
    return metrics
