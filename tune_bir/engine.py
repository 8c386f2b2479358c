"""The one training loop of tune_bir: BI-R (+SI) on a continual-learning protocol.

`Engine` is built from one resolved config; `train_segment()` trains up to N iterations of the
current task (finishing the task runs evaluation, the plugins' `after_task` and the previous-model
snapshot); `evaluate()` returns the metrics of docs/algorithm.md "Evaluation metrics";
`state_dict()` / `load_state_dict()` cover everything needed for a bit-identical continuation.
Everything optional (SI, the exaggeration terms) is a plugin (`tune_bir.plugin`, built by `tune_bir.terms`):
the engine calls their life-cycle hooks and knows none of them by name. No Ray and no MLflow in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tune_bir import evaluation, losses
from tune_bir.config import BIRConfig
from tune_bir.data import Protocol, load_protocol
from tune_bir.device import check_precision, compiled, resolve_device, tf32_matmuls
from tune_bir.errors import ConfigError
from tune_bir.evaluation import SplitScores, accuracy_metrics
from tune_bir.hidden import HiddenData, prepare_hidden_data
from tune_bir.model import BIRModel, ModelSpec
from tune_bir.nets import ConvLayers, adam, load_conv_layers
from tune_bir.optimiser_step import OptimiserStep
from tune_bir.plugin import Plugin, PluginContext, TaskInfo
from tune_bir.replay import Learner, model_has_decoder, replay_class, vae_forward
from tune_bir.rng_state import restore_rng
from tune_bir.scenario import BatchSampler, Scenario
from tune_bir.terms import build_plugins

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 4   # 3: every term's state under "terms"; 4: every plugin's (SI's too) under "plugins"


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

        self.model = BIRModel(ModelSpec(
            data.in_shape, self.scenario.n_outputs, cfg.fc_units, cfg.fc_layers, cfg.z_dim, classifier=True,
            decoder=model_has_decoder(cfg), gmm_prior=cfg.prior == "GMM",
            dg_prop=cfg.dg_prop if cfg.dg_gates else 0.0, output="sigmoid" if cfg.recon_loss == "BCE" else "linear"),
            init_rng).to(self.device)

        # the plugins the config switches on (tune_bir.terms), in registration order; the replay-acting ones
        # (exaggeration terms) also get every replay step's batch
        self.plugins: list[Plugin] = build_plugins(
            cfg, PluginContext(model=self.model, conv=self.conv, device=self.device,
                               recon_loss=losses.RECON_LOSSES[cfg.recon_loss]))
        self.terms = [p for p in self.plugins if p.acts_on_replay]
        # the replay mode (tune_bir.replay); a separate generator draws its initial weights after the model's
        self.replay = replay_class(cfg)(Learner(
            cfg, self.model, self.scenario, data.train, data.image_pixels, self.rng, self.exaggeration_rng, self.terms,
            compiled(vae_forward, cfg.compile), losses.RECON_LOSSES_FROM_RAW[cfg.recon_loss], self._log), init_rng)
        # the main optimiser holds every trainable model parameter (a plugin's own parameters are not ones)
        self.optimizer = adam(self.model.parameters(), cfg.lr, self.device)
        self.main_step = OptimiserStep(self.model, self.optimizer, self.plugins, cfg.grad_clip, self._log)

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
        train = self.replay.train_data(t)
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
        return TaskInfo(t, self.replay.train_data(t), self.scenario.columns(t, t),
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
            objectives = self.replay.objectives(h, y, t)
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
        self.replay.step_generator(objectives)
        self._loss_count += 1

    # -- end of a task -------------------------------------------------------------------------
    def _end_task(self) -> None:
        """The plugins' `after_task` (SI consolidation), previous-model snapshot, next task, in this order
        (docs/algorithm.md "The training step")."""
        info = self._task_info(self.task + 1)
        for plugin in self.plugins:
            plugin.after_task(info)
        self.replay.after_task()
        self.task += 1
        self.iter_in_task = 0
        self.sampler = None

    # -- evaluation ----------------------------------------------------------------------------
    def scores(self, split: str = "test", seen: int | None = None) -> SplitScores:
        """Accuracy and mean true-class probability on each task seen so far (`tune_bir.evaluation.scores`)."""
        seen = seen if seen is not None else self.current_task
        return evaluation.scores(self.model, getattr(self.data, split), self.scenario, seen)

    def accuracies(self, split: str = "test", seen: int | None = None) -> list[float]:
        """Accuracy on each task seen so far (argmax over the active columns;
        docs/algorithm.md "Evaluation metrics")."""
        return self.scores(split, seen).accuracy

    def outputs_finite(self) -> bool:
        """Weights, and the model's outputs on a few current-task inputs, are all finite (no divergence)."""
        return evaluation.outputs_finite(self.model, self.data.train[min(self.task, self.n_tasks - 1)])

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
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "position": {"task": self.task, "iter_in_task": self.iter_in_task, "iters_done": self.iters_done},
            "model": self.model.state_dict(),
            **self.replay.state_dict(),   # previous model; a separate generator, its snapshot and optimiser
            "optimizer": self.optimizer.state_dict(),
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
        self.replay.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        for plugin in self.plugins:
            plugin.load_state_dict(state["plugins"][plugin.name])
        self.sampler = None
        if state["sampler"] is not None:
            train = self.replay.train_data(self.task + 1)
            self.sampler = BatchSampler(len(train.y), self.cfg.batch, self.rng, self.device)
            self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        # random-stream states are CPU byte tensors (map_location may have moved them); a GPU's cannot continue a CPU
        # stream or the reverse: those streams are reseeded (docs/architecture.md "GPU")
        restore_rng(self.rng, rng["engine"])
        restore_rng(self.exaggeration_rng, rng["exaggeration"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.acc_history = [list(r) for r in state["acc_history"]]
        self.val_acc_history = [list(r) for r in state["val_acc_history"]]

    def adopt_first_task(self, state: dict) -> None:
        """Continue from the end of task 1 as trained by another engine whose config differs only in fields
        that act on replay (`BIRConfig.first_task_fields`): the same learner this one would have become.

        This engine keeps what task 1 never touched and the other engine may lack: the state of its replay-acting
        plugins (e.g. the contrastive plugin's head, optimiser and random stream).
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
