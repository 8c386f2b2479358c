"""One dataclass with every flag of a run, the per-protocol defaults, and validation.

Field names are the snake_case of the original research code's CLI flags (ALGORITHM.md section 7);
the same names are used by the CLI, JSON config files, search spaces, Tune configs and MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_bir.errors import ConfigError

EXPERIMENTS = ("splitMNIST", "splitMNIST5k", "CIFAR100")
SCENARIOS = ("class", "task", "domain")
REPLAY_MODES = ("none", "generative", "current", "offline")
PRIORS = ("standard", "GMM")
DIVERGENCE_NAMES = ("kl", "js", "js_ref")
REP_TARGETS = ("prior", "sample", "class_mean")
CONTR_GRAD_MODES = ("separate", "reference")
AUX_DECODERS = ("random", "trained")
PRECISIONS = ("fp32", "bf16")

# Per-protocol defaults (ALGORITHM.md 3.1, 3.8, 4 and 7): one table, not branches through the code.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "splitMNIST": dict(tasks=5, iters=2000, batch=128, lr=1e-3, fc_units=400, recon_loss="BCE"),
    "splitMNIST5k": dict(tasks=5, iters=2000, batch=128, lr=1e-3, fc_units=400, recon_loss="BCE"),
    "CIFAR100": dict(tasks=10, iters=5000, batch=256, lr=1e-4, fc_units=2000, recon_loss="MSE"),
}
# Fields that act only on replayed memories, i.e. from task 2 on: two configs that differ only in
# these train task 1 identically (Engine.adopt_first_task relies on it; a test checks it).
REPLAY_ONLY_FIELDS = (
    "repulsion", "lamda_rep", "kl_js", "use_rep_f", "rep_f", "n_rep", "rep_target", "d_min",
    "recon_repulsion", "lamda_recon_rep", "recon_attraction", "lamda_recon_atr", "recon_rep_aver",
    "contrastive", "c_temp", "c_lr", "c_drop", "c_scores", "c_hard", "not_hidden", "lamda_contr",
    "contr_grad_mode", "aux_decoder")
# Fields that say where the results of one run go (a sweep does not take them per trial).
RUN_OUTPUT_FIELDS = ("pdf", "visdom", "mlflow", "results_dir", "run_name", "tuning")
# Fields that change where results go or how training is cut into segments, never what is computed.
OUTPUT_FIELDS = (*RUN_OUTPUT_FIELDS, "apply_mask", "segment_iters")
# SI strength when --c is omitted: the SI-alone values of the reference, by (protocol family, scenario).
SI_C_DEFAULTS = {("MNIST", "task"): 10.0, ("MNIST", "class"): 0.1, ("MNIST", "domain"): 0.1,
                 ("CIFAR", "task"): 100.0, ("CIFAR", "class"): 1.0, ("CIFAR", "domain"): 1.0}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: `lamda_rep` -> `--lamda-rep` (the original code's spelling)."""
    return "--" + field_name.replace("_", "-")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field carrying its CLI help (and optional choices / flag name) as metadata."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class BIRConfig:
    """Every option of one BI-R(+SI) run. `None` means: take the per-protocol default (resolve())."""

    # -- protocol
    experiment: str = _opt("splitMNIST5k", "protocol", choices=EXPERIMENTS)
    scenario: str = _opt("class", "continual-learning scenario", choices=SCENARIOS)
    tasks: int | None = _opt(None, "number of tasks (default 5 MNIST, 10 CIFAR-100)")
    data_dir: str = _opt("./data", "where torchvision data sets live / are downloaded")
    val_fraction: float = _opt(0.0, "share of each task's training data held out for validation")
    seed: int = _opt(0, "run seed (class order, weights, replay, noise)")
    # -- training
    iters: int | None = _opt(None, "iterations per task (default 2000 MNIST, 5000 CIFAR-100)")
    batch: int | None = _opt(None, "current-task batch size (default 128 MNIST, 256 CIFAR-100)")
    batch_replay: int | None = _opt(None, "replay batch size (default: --batch)")
    lr: float | None = _opt(None, "learning rate of the main Adam optimiser (default 1e-3 MNIST, 1e-4 CIFAR)")
    segment_iters: int = _opt(0, "iterations per engine segment / Tune step (0 = one whole task)")
    grad_clip: float = _opt(0.0, "max gradient norm of the main step, 0 = off")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _opt("fp32", "arithmetic of the training passes: fp32 (as the original), or bf16 autocast "
                          "(mixed precision: weights, optimiser, SI and evaluation stay fp32)", choices=PRECISIONS)
    # -- model
    fc_units: int | None = _opt(None, "units of the fully connected layers (default 400 MNIST, 2000 CIFAR)")
    fc_layers: int = _opt(3, "fully connected layers (encoder has fc_layers - 1 hidden layers)")
    z_dim: int = _opt(100, "latent size")
    recon_loss: str | None = _opt(None, "reconstruction loss (default BCE MNIST, MSE CIFAR)",
                                  choices=("BCE", "MSE"))
    pretrained_conv: str = _opt("./models/conv-CIFAR10.pt", "pre-trained conv layers for CIFAR-100")
    # -- replay and BI-R components
    replay: str = _opt("none", "replay mode", choices=REPLAY_MODES)
    brain_inspired: bool = _opt(False, "all BI-R components (needs --replay=generative)")
    feedback: bool = _opt(False, "replay-through-feedback: the classifier is part of the VAE")
    prior: str = _opt("standard", "VAE prior", choices=PRIORS)
    per_class: bool = _opt(False, "one prior mode per class (conditional replay)")
    dg_gates: bool = _opt(False, "gating of the decoder based on internal context")
    dg_prop: float | None = _opt(None, "fraction of decoder units gated per class")
    hidden: bool = _opt(False, "internal replay: replay conv features, not pixels (CIFAR-100)")
    distill: bool = _opt(False, "distillation: soft targets for replayed samples")
    temp: float = _opt(2.0, "distillation temperature")
    # -- Synaptic Intelligence
    si: bool = _opt(False, "Synaptic Intelligence")
    c: float | None = _opt(None, "SI strength (default: SI-alone value of the protocol)")
    epsilon: float = _opt(0.1, "SI damping")
    # -- exaggeration: distribution repulsion (ALGORITHM.md 5.1)
    repulsion: bool = _opt(False, "distribution-based repulsion of replayed memories")
    lamda_rep: float = _opt(1e-6, "weight of the distribution repulsion")
    kl_js: str = _opt("js", "divergence of the repulsion", choices=DIVERGENCE_NAMES)
    use_rep_f: bool = _opt(False, "apply the repulsion-factor gate")
    rep_f: float = _opt(20.0, "repulsion factor f")
    n_rep: int = _opt(1, "competing neighbours per replayed sample (clamped per task)")
    rep_target: str = _opt("prior", "what a replayed memory is pushed away from", choices=REP_TARGETS)
    d_min: float = _opt(1e-3, "floor on divergences and distances inside inverse terms")
    apply_mask: bool = _opt(False, "accepted for compatibility; has no effect")
    tuning: bool = _opt(False, "accepted for compatibility; results go to the JSON record / MLflow")
    # -- exaggeration: reconstruction repulsion / attraction (5.2)
    recon_repulsion: bool = _opt(False, "reconstruction-based repulsion")
    lamda_recon_rep: float = _opt(1e-6, "weight of the reconstruction repulsion")
    recon_attraction: bool = _opt(False, "reconstruction-based attraction")
    lamda_recon_atr: float = _opt(1e-6, "weight of the reconstruction attraction")
    recon_rep_aver: bool = _opt(False, "class-mean targets for both reconstruction terms")
    # -- exaggeration: contrastive replay (5.3)
    contrastive: bool = _opt(False, "supervised contrastive learning on replayed memories")
    c_temp: float = _opt(1.0, "SupCon temperature")
    c_lr: float = _opt(1e-8, "learning rate of the encoder optimiser of the contrastive loss")
    c_drop: float = _opt(0.5, "dropout before the projection head")
    c_scores: bool = _opt(False, "soft positives from the previous model's scores")
    c_hard: bool = _opt(False, "hard-negative reweighting")
    not_hidden: bool = _opt(False, "augmented-view baseline for contrastive runs")
    lamda_contr: float = _opt(1.0, "weight of the contrastive loss")
    contr_grad_mode: str = _opt("separate", "how the two optimisers share gradients",
                                choices=CONTR_GRAD_MODES)
    aux_decoder: str = _opt("random", "auxiliary decoder of the second view (CIFAR)", choices=AUX_DECODERS)
    # -- outputs
    pdf: bool = _opt(False, "write a PDF report")
    visdom: bool = _opt(False, "accepted for --mlflow (live metrics in MLflow)")
    mlflow: bool = _opt(False, "log the run live to MLflow")
    results_dir: str = _opt("./results", "where the JSON record (and PDF) of a run go")
    run_name: str | None = _opt(None, "name of the run's record (default: derived from the flags)")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BIRConfig:
        """Build from a flat dict; unknown keys are a ConfigError naming them."""
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> dict[str, Any]:
        """Read a JSON object of config fields (not yet validated)."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err.msg} (line {err.lineno})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of config fields")
        cls.from_dict(values)  # unknown keys
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def protocol_family(self) -> str:
        return "CIFAR" if self.experiment.startswith("CIFAR") else "MNIST"

    def first_task_fields(self) -> dict[str, Any]:
        """The fields that determine what task 1 computes (everything but replay-only and output fields)."""
        skip = set(REPLAY_ONLY_FIELDS) | set(OUTPUT_FIELDS)
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @property
    def uses_exaggeration(self) -> bool:
        return self.repulsion or self.recon_repulsion or self.recon_attraction or self.contrastive

    def resolved(self) -> BIRConfig:
        """Validate and fill every `None` with its per-protocol default; --brain-inspired sets its parts."""
        validate_choices(self)
        cfg = dataclasses.replace(self)
        if cfg.brain_inspired:
            if cfg.replay != "generative":
                raise ConfigError("--brain-inspired needs --replay=generative")
            cfg.feedback = cfg.per_class = cfg.dg_gates = cfg.hidden = cfg.distill = True
            cfg.prior = "GMM"
        if cfg.visdom:
            cfg.mlflow = True
        defaults = PROTOCOL_DEFAULTS[cfg.experiment]
        for name, value in defaults.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        if cfg.batch_replay is None:
            cfg.batch_replay = cfg.batch
        if cfg.c is None:
            cfg.c = SI_C_DEFAULTS[(cfg.protocol_family, cfg.scenario)]
        if cfg.dg_prop is None:
            if cfg.protocol_family == "MNIST":
                cfg.dg_prop = 0.8
            elif cfg.scenario == "task":
                cfg.dg_prop = 0.0
            else:
                cfg.dg_prop = 0.6 if cfg.si else 0.7
        validate_values(cfg)
        return cfg


def validate_choices(cfg: BIRConfig) -> None:
    """Every field with a fixed set of choices holds one of them."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                              f"got {value!r}")


def _positive(cfg: BIRConfig, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        bad = value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
        if bad:
            rule = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def validate_values(cfg: BIRConfig) -> None:
    """Ranges and combinations (ALGORITHM.md section 7); raises ConfigError with a one-line reason."""
    _positive(cfg, "tasks", "iters", "batch", "batch_replay", "lr", "fc_units", "fc_layers", "z_dim",
              "temp", "epsilon", "c_temp", "d_min")
    _positive(cfg, "c", "lamda_rep", "lamda_recon_rep", "lamda_recon_atr", "lamda_contr", "c_lr",
              "grad_clip", "segment_iters", allow_zero=True)
    for name in ("tasks", "iters", "batch", "batch_replay", "fc_units", "fc_layers", "z_dim",
                 "segment_iters", "n_rep", "seed"):
        if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer, got {getattr(cfg, name)!r}")
    if cfg.fc_layers < 2:
        raise ConfigError("--fc-layers must be >= 2 (an encoder layer plus the output)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if not 0.0 <= cfg.dg_prop < 1.0:
        raise ConfigError(f"--dg-prop must be in [0, 1), got {cfg.dg_prop}")
    if not 0.0 <= cfg.c_drop < 1.0:
        raise ConfigError(f"--c-drop must be in [0, 1), got {cfg.c_drop}")
    if cfg.n_rep < 1:
        raise ConfigError(f"--n-rep must be >= 1, got {cfg.n_rep}")
    if cfg.use_rep_f and cfg.rep_f <= 1:
        raise ConfigError(f"--rep-f must be > 1 with --use-rep-f (f <= 1 gates out every sample), "
                          f"got {cfg.rep_f}")
    n_classes = 100 if cfg.protocol_family == "CIFAR" else 10
    if n_classes % cfg.tasks:
        raise ConfigError(f"--tasks={cfg.tasks} does not divide the {n_classes} classes of {cfg.experiment}")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    # recon loss: BCE needs targets in [0, 1] (defect O1 of the reference, which never checked it)
    if cfg.recon_loss == "BCE" and cfg.protocol_family == "CIFAR":
        raise ConfigError("--recon-loss=BCE needs targets in [0, 1]; CIFAR-100 features are not: use MSE")
    generative = cfg.replay == "generative"
    for name in ("feedback", "dg_gates", "per_class", "hidden"):
        if getattr(cfg, name) and not generative:
            raise ConfigError(f"--{name.replace('_', '-')} needs --replay=generative")
    if cfg.prior == "GMM" and not generative:
        raise ConfigError("--prior=GMM needs --replay=generative")
    if cfg.dg_gates and not cfg.per_class and cfg.prior == "GMM":
        raise ConfigError("--dg-gates with --prior=GMM needs --per-class (gates are chosen by class)")
    if generative and cfg.protocol_family == "CIFAR" and not cfg.hidden:
        raise ConfigError("generative replay on CIFAR100 is implemented as internal replay: add --hidden "
                          "(or use --brain-inspired)")
    if cfg.replay != "none" and cfg.scenario != "class":
        raise ConfigError(f"--replay={cfg.replay} is implemented for --scenario=class only")
    # exaggeration terms act on replayed memories of the BI-R model (ALGORITHM.md section 5)
    exaggeration_flags = [n for n in ("repulsion", "recon_repulsion", "recon_attraction", "contrastive",
                                      "not_hidden") if getattr(cfg, n)]
    if exaggeration_flags and not (generative and cfg.feedback):
        raise ConfigError(f"--{exaggeration_flags[0].replace('_', '-')} acts on replayed memories: it needs "
                          "--replay=generative with --feedback (e.g. --brain-inspired)")
    if cfg.rep_target == "prior" and cfg.repulsion and cfg.prior != "GMM":
        raise ConfigError("--rep-target=prior needs the per-class GMM prior (--brain-inspired)")
    if cfg.recon_rep_aver and not (cfg.recon_repulsion or cfg.recon_attraction):
        raise ConfigError("--recon-rep-aver needs --recon-repulsion or --recon-attraction")
    for flag in ("c_scores", "c_hard"):
        if getattr(cfg, flag) and not cfg.contrastive:
            raise ConfigError(f"--{flag.replace('_', '-')} needs --contrastive")
    if cfg.c_scores and cfg.c_hard:
        raise ConfigError("--c-scores and --c-hard are alternatives; choose one")
    if cfg.use_rep_f and not (cfg.repulsion or cfg.recon_repulsion):
        raise ConfigError("--use-rep-f gates the repulsion terms: add --repulsion or --recon-repulsion")


def config_from_mapping(values: dict[str, Any]) -> BIRConfig:
    """Build and resolve a config from a flat mapping (JSON file, Tune config); raises ConfigError."""
    return BIRConfig.from_dict(values).resolved()
