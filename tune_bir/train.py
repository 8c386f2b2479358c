"""`python -m tune_bir.train`: one continual-learning run with the original research code's flags.

Examples:
  python -m tune_bir.train --replay=generative --brain-inspired --si --c=0.1 --iters=500
  python -m tune_bir.train --experiment=CIFAR100 --scenario=class --replay=generative --brain-inspired \
      --si --c=1e8 --dg-prop=0.6 --pdf --repulsion
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tune_bir.cli import OneLineArgumentParser, add_config_flags, config_overrides, run_main
from tune_bir.config import BIRConfig
from tune_bir.cpu import cpu_threads
from tune_bir.errors import ConfigError
from tune_bir.fields import check_creatable_folder
from tune_bir.record import cpu_fingerprint, git_commit, package_versions
from tune_bir.terms import check_idle_fields, enabled

PROG = "python -m tune_bir.train"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="JSON object of config fields; flags override it")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads of torch (default 0: a fair share, $OMP_NUM_THREADS when set, else half "
                             "the usable cores, at least 1; see README 'Benchmarks', shared_cores)")
    add_config_flags(parser)
    return parser


def config_from_args(argv: list[str] | None) -> BIRConfig:
    """Defaults <- --config file <- flags, resolved and validated (raises ConfigError)."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = BIRConfig.from_json(args.config) if args.config else {}
    values |= config_overrides(args)
    given = BIRConfig.from_dict(values)
    cfg = given.resolved()
    check_idle_fields(given)   # a plugin's weight or option given without the plugin would change nothing
    if cfg.segment_iters:
        raise ConfigError("--segment-iters cuts a sweep's trials into Tune steps; a single run trains whole tasks: "
                          "drop it")
    return cfg


def method_label(cfg: BIRConfig) -> str:
    """Short name of the method a config runs, for run names and reports."""
    if cfg.brain_inspired:
        label = "BI-R"
    elif cfg.replay == "generative":
        label = "GR" + ("+FB" if cfg.feedback else "")
    elif cfg.replay == "current":
        label = "LwF"
    elif cfg.replay == "offline":
        label = "joint"
    else:
        label = "none"
    return "+".join([label, *(plugin.method_label() for plugin in enabled(cfg))])


def format_losses(metrics: dict[str, float], plugins: tuple[str, ...]) -> str:
    """A task's mean losses in one line: the learner's own, then each plugin's (`loss/<name>`, in `plugins` order)."""
    losses = {k.removeprefix("loss/"): v for k, v in metrics.items() if k.startswith("loss/")}
    main = ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if k not in plugins)
    own = ", ".join(f"{k} {losses[k]:.4g}" for k in plugins if k in losses)   # in registration order
    return f"losses: {main}" + (f" | plugins: {own}" if own else "")


def format_table(acc_history: list[list[float]]) -> str:
    """Accuracy of each task (columns) after training each task (rows)."""
    n = len(acc_history)
    lines = ["after task | " + " ".join(f"task {k + 1:>2}" for k in range(n)) + " |   avg"]
    for t, row in enumerate(acc_history):
        cells = " ".join(f"{a:7.4f}" for a in row) + " " * 8 * (n - len(row))
        lines.append(f"{t + 1:>10} | {cells} | {sum(row) / len(row):.4f}")
    return "\n".join(lines)


def check_outputs(cfg: BIRConfig) -> Path:
    """What a run needs besides its config, checked before any work: the results folder can be made, the
    pre-trained conv layers of a CIFAR run exist, MLflow answers (`--mlflow`). Returns the results folder."""
    results_dir = Path(cfg.results_dir).expanduser().resolve()
    check_creatable_folder(cfg.results_dir, "--results-dir")
    if cfg.protocol_family == "CIFAR" and not Path(cfg.pretrained_conv).expanduser().is_file():
        raise ConfigError(f"pre-trained conv layers not found at {Path(cfg.pretrained_conv).expanduser().resolve()}: "
                          "run `python -m tune_bir.pretrain --experiment CIFAR10` or pass --pretrained-conv PATH")
    if cfg.mlflow:
        from tune_bir.tracking import check_mlflow, default_tracking_uri

        check_mlflow(default_tracking_uri(), where="MLFLOW_TRACKING_URI")
    return results_dir


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    threads = build_parser().parse_args(argv).threads
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: a fair share of the cores), got {threads}")
    results_dir = check_outputs(cfg)
    with cpu_threads(threads) as n_threads:
        return _run(cfg, results_dir, n_threads)


def _run(cfg: BIRConfig, results_dir: Path, n_threads: int) -> int:
    # heavy imports after validation: bad flags fail fast
    from tune_bir.engine import Engine

    run_name = cfg.run_name or (
        f"{cfg.experiment}-{cfg.scenario}-{method_label(cfg)}-s{cfg.seed}-"
        f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    engine = Engine(cfg)   # loads the data: a missing data set fails here, before anything is written
    results_dir.mkdir(parents=True, exist_ok=True)
    print(f"{method_label(cfg)} on {cfg.experiment} ({cfg.scenario}-IL, {engine.n_tasks} tasks, {cfg.iters} "
          f"iterations per task) on {engine.device}"
          + (f" ({n_threads} CPU thread{'s' if n_threads > 1 else ''})" if engine.device.type == "cpu" else ""))
    live = _MlflowLive(cfg, run_name) if cfg.mlflow else None
    per_task: list[dict[str, float]] = []
    plugin_names = tuple(plugin.name for plugin in engine.plugins)
    while not engine.done:
        t = engine.current_task
        with tqdm(total=cfg.iters, desc=f"task {t}/{engine.n_tasks}", unit="it", file=sys.stdout,
                  dynamic_ncols=True, leave=True) as bar:
            metrics = engine.train_task(on_iteration=lambda: bar.update(1))
            bar.set_postfix(acc_avg=f"{metrics['acc_avg']:.4f}")
        print(f"task {t}: acc_avg {metrics['acc_avg']:.4f}  " + format_losses(metrics, plugin_names))
        per_task.append(metrics)
        if live:
            live.log(metrics, step=t)
    final = per_task[-1]
    record = {
        "run_name": run_name,
        "config": cfg.to_dict(),
        "method": method_label(cfg),
        "device": str(engine.device),
        "cpu_threads": n_threads,
        # what the per-seed numbers reproduce on (docs/results.md "Which numbers reproduce where")
        "cpu_fingerprint": cpu_fingerprint(n_threads),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "acc_matrix": engine.acc_history,
        "val_acc_matrix": engine.val_acc_history,
        "metrics_per_task": per_task,
        "final": {k: v for k, v in final.items() if not k.startswith("loss/")},
    }
    record_path = results_dir / f"{run_name}.json"
    record_path.write_text(json.dumps(record, indent=2))
    print()
    print(format_table(engine.acc_history))
    print(f"acc_avg {final['acc_avg']:.4f}   forgetting_avg {final['forgetting_avg']:.4f}   bwt {final['bwt']:.4f}")
    print(f"record: {record_path}")
    if cfg.pdf:
        from tune_bir.run_pdf import write_run_pdf

        pdf_path = write_run_pdf(engine, record, results_dir / f"{run_name}.pdf")
        print(f"report: {pdf_path}")
    if live:
        live.finish(record_path)
    print(f"acc_avg={final['acc_avg']:.6f}")
    return 0


class _MlflowLive:
    """Live logging of a single run (`--mlflow` / `--visdom`); one batched call per task."""

    def __init__(self, cfg: BIRConfig, run_name: str):
        import mlflow

        from tune_bir.tracking import default_tracking_uri

        self.mlflow = mlflow
        mlflow.set_tracking_uri(default_tracking_uri())
        mlflow.set_experiment("tune_bir-train")
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: v for k, v in cfg.to_dict().items() if v is not None})
        print(f"mlflow: run {self.run.info.run_id} at {mlflow.get_tracking_uri()}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, record_path: Path) -> None:
        self.mlflow.log_artifact(str(record_path))
        self.mlflow.end_run()


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
