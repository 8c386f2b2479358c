"""Bad input on the real command lines: one line on stderr saying what is wrong and how to fix it, exit code 2,
no traceback, nothing trained, nothing created.

Each row of `CASES` breaks one rule of one command (`tune_bir.train`, `tune_bir.pretrain`, `tune_bir.sweep`,
`tune_bir.sweep --confirm`, `analysis`); no two rows break the same rule. Every command runs in a subprocess
with an empty working directory of its own (plus the files its row prepares), with downloads sent to a
loopback port where nothing listens and the default MLflow store in that directory: afterwards the directory
must hold exactly what the row prepared (no `results/`, `ray_results/`, `mlflow.db`, `models/`, `data/`).
The commands start in parallel, once per test session, for the rows selected.

Each command runs in a process of its own, run as `python -m` runs it (`runpy.run_module` as `__main__`, with
the row's argv, working directory and environment, its stdout and stderr in files, its exit code the
process's), forked from a server that has imported torch, numpy and torchvision once (multiprocessing's
forkserver): a fresh interpreter would spend over a second of the suite's two cores importing torch for each of
the 160 rows. Nothing of the project is imported before the fork, so every module of a command runs its import
under the row's environment. `test_the_forked_commands_are_the_python_dash_m_commands` runs rows of each
command both ways and requires the same outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import forked_command

ROOT = Path(__file__).resolve().parent.parent
DEAD_PROXY = "http://127.0.0.1:9"   # the discard port: nothing listens, every download is refused at once
FAIL_WITHIN_S = 60.0                 # generous: the machine is shared; a hang would take minutes
PARALLEL = 3
TIMEOUT_S = 120


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Case:
    """One bad input: the command, its arguments ({cwd} is the working directory), the files it needs, the
    words the error line must hold, and the rule it breaks."""

    id: str
    module: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    rule: str
    files: dict[str, str | None] = field(default_factory=dict)    # name -> text (None: an empty folder)
    prepare: Callable[[Path], None] | None = None                    # builds what `files` cannot
    env: dict[str, str] = field(default_factory=dict)


def case(id: str, module: str, argv: list[str] | str, expect: list[str] | str, rule: str, **kw) -> Case:
    argv = argv.split() if isinstance(argv, str) else argv
    expect = [expect] if isinstance(expect, str) else expect
    return Case(id, module, tuple(argv), tuple(expect), rule, **kw)


T, P, S, A = "tune_bir.train", "tune_bir.pretrain", "tune_bir.sweep", "analysis"
BIR = "--replay=generative --brain-inspired"
SPACE_HEAD = "fixed: {repulsion: true}\nparams:\n"


def optuna_study(file: str, name: str) -> Callable[[Path], None]:
    """An Optuna SQLite file holding a study `name`."""
    def prepare(cwd: Path) -> None:
        import optuna

        optuna.create_study(storage=f"sqlite:///{cwd / file}", study_name=name)
    return prepare


# --- sweep folders for --confirm and analysis -------------------------------------------------------------
def _sweep_json(cwd: Path, name: str = "s", mlflow: bool = True) -> dict:
    """The sweep.json a real (tiny) sweep plan writes, with a made-up MLflow parent run."""
    from tune_bir.sweep.plan import MlflowLocation, build_parser, plan_from_args

    plan = plan_from_args(build_parser().parse_args(["--iters", "8", "--storage-path", str(cwd / "rr"),
                                                     "--name", name]))
    if mlflow:
        plan.mlflow = MlflowLocation(f"sqlite:///{cwd / 'mlflow.db'}", "1", "tune_bir-sweep", "0" * 32)
    return plan.to_json()


def sweep_folder(*, mlflow: bool = True, results: list[dict] | None = None, confirm: bool = False,
                 text: str | None = None) -> Callable[[Path], None]:
    def prepare(cwd: Path) -> None:
        folder = cwd / "rr" / "s"
        folder.mkdir(parents=True)
        (folder / "sweep.json").write_text(text if text is not None else json.dumps(_sweep_json(cwd, mlflow=mlflow)))
        if results is not None:
            import pandas as pd

            pd.DataFrame(results).to_csv(folder / "results.csv", index=False)
        if confirm:
            (folder / "confirm").mkdir()
            (folder / "confirm" / "confirm.json").write_text("{}")
    return prepare


ONLY_BASELINE = [{"trial_id": "t0", "status": "completed", "baseline": True, "val_acc_avg": 0.5,
                  "trial_status": "completed"}]


def sequential_confirmation(mutate: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """A finished sequential confirmation folder at {cwd}/rr/c (tests/sequential_fixtures.py), then `mutate`d."""
    def prepare(cwd: Path) -> None:
        from tests.sequential_fixtures import write_confirmation

        folder = write_confirmation(cwd / "rr" / "c", looks=(8, 16))
        if mutate is not None:
            mutate(folder)
    return prepare


def _edit_plan(folder: Path) -> None:
    (folder / "plan.json").write_text((folder / "plan.json").read_text().replace('"alpha": 0.05', '"alpha": 0.1'))


def _unregister(folder: Path) -> None:
    (folder / "state.json").unlink()
    (folder.parent / "seed_ledger.json").unlink()


def _add_row(**row) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        with (folder / "results.csv").open("a") as f:
            header = (folder / "results.csv").read_text().splitlines()[0].split(",")
            f.write(",".join(str(row.get(h, "")) for h in header) + "\n")
    return mutate


def analysis_sweep(*, name: str = "fake", trials: dict | None = None, confirm_without_baseline: bool = False,
                   sweep_json: str | None = None) -> Callable[[Path], None]:
    """A finished hand-made sweep folder (tests/test_analysis_cli.py), possibly broken."""
    def prepare(cwd: Path) -> None:
        from tests.test_analysis_cli import make_sweep

        folder = make_sweep(cwd, name=name, trials=trials, statuses=trials != {})
        if sweep_json is not None:
            (folder / "sweep.json").write_text(sweep_json)
        if confirm_without_baseline:
            import pandas as pd

            (folder / "confirm").mkdir()
            (folder / "confirm" / "confirm.json").write_text(json.dumps(
                {"sweep": name, "seeds": [1, 2], "n_tasks": 3, "configs": [{"config": "top1"}]}))
            pd.DataFrame([{"config": "top1", "seed": s, "trial_id": f"x{s}", "status": "completed",
                           "acc_avg": 0.5} for s in (1, 2)]).to_csv(folder / "confirm" / "results.csv", index=False)
    return prepare


# --- chosen and sequential confirmations (confirmation/) -----------------------------------------------------
ONE_CONFIG = json.dumps([{"label": "rep", "values": {"repulsion": True, "lamda_rep": 1.0}, "source": "a test"}])
SEQ = "--sequential --max-seeds 8 --looks 2 --margin 0.005"


def ranked_sweep(cwd: Path) -> None:
    """A finished sweep with one completed config besides the baseline (ranking: top1 only)."""
    sweep_folder(results=[*ONLY_BASELINE, {"trial_id": "t1", "status": "completed", "baseline": False,
                                           "val_acc_avg": 0.6, "trial_status": "completed"}])(cwd)


def sweeps_with_other_bases(cwd: Path) -> None:
    """Two sweeps whose base configs differ (--iters 8 and 9), and a config file taking one config from each."""
    from tune_bir.sweep.plan import build_parser, plan_from_args

    for name, iters in (("a", "8"), ("b", "9")):
        plan = plan_from_args(build_parser().parse_args(["--iters", iters, "--storage-path", str(cwd / "rr"),
                                                         "--name", name]))
        (cwd / "rr" / name).mkdir(parents=True)
        (cwd / "rr" / name / "sweep.json").write_text(json.dumps(plan.to_json()))
    (cwd / "configs.json").write_text(json.dumps([
        {"label": f"from-{n}", "values": {"repulsion": True, "lamda_rep": 1.0}, "source": {"sweep": f"rr/{n}"}}
        for n in ("a", "b")]))


def tampered_plan(cwd: Path) -> None:
    """A registered confirmation whose plan.json was edited after its sha256 was recorded."""
    folder = cwd / "c"
    folder.mkdir()
    text = json.dumps({"format": 1, "label": "c", "margin": 0.005}, indent=2) + "\n"
    (folder / "state.json").write_text(json.dumps({"plan_sha256": hashlib.sha256(text.encode()).hexdigest()}))
    (folder / "plan.json").write_text(text.replace("0.005", "0.01"))


def mlflow_store_without_sweeps(cwd: Path) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{cwd / 'store.db'}").create_experiment("tune_bir-sweep")


CASES: list[Case] = [
    # ---- python -m tune_bir.train: values -------------------------------------------------------------------
    case("train-iters-negative", T, "--iters=-5", "--iters must be > 0", "a count below its minimum"),
    case("train-iters-not-int", T, "--iters=abc", ["--iters", "invalid int value"], "an integer flag given text"),
    case("train-lr-not-float", T, "--lr=fast", ["--lr", "invalid float value"], "a float flag given text"),
    case("train-lr-nan", T, "--lr=nan", "--lr must be > 0", "a float that is not finite"),
    case("train-seed-fractional", T, "--seed=1.5", ["--seed", "invalid int value"],
         "an integer flag given a fraction"),
    case("train-unknown-experiment", T, "--experiment=imagenet", ["--experiment", "invalid choice"],
         "a choice that is not offered"),
    case("train-unknown-flag", T, "--lamda-repp=3", ["unrecognized arguments", "--lamda-repp"], "a misspelt flag"),
    case("train-tasks-not-dividing", T, "--tasks=3", "does not divide", "tasks that do not split the classes"),
    case("train-val-fraction-one", T, "--val-fraction=1", "--val-fraction must be in [0, 1)",
         "a validation share that leaves nothing to train"),
    case("train-dg-prop-range", T, f"{BIR} --dg-prop=1.5", "--dg-prop must be in [0, 1)", "a proportion above 1"),
    case("train-c-negative", T, "--si --c=-1", "--c must be >= 0", "a negative SI strength"),
    case("train-fc-layers-one", T, "--fc-layers=1", "--fc-layers must be >= 2", "a network without a hidden layer"),
    case("train-device-unknown", T, "--device=tpu", "--device must be", "a device name torch does not have"),
    case("train-device-index-text", T, "--device=cuda:x", "--device must be", "a device index that is no number"),
    case("train-cuda-missing", T, "--iters=2 --device=cuda:99", "--device=cuda:99", "a CUDA device this machine lacks"),
    case("train-segment-iters-negative", T, "--segment-iters=-1", "--segment-iters must be >= 0",
         "a negative segment length"),
    case("train-n-rep-zero", T, f"{BIR} --repulsion --n-rep=0", "--n-rep must be >= 1", "zero competing neighbours"),
    case("train-rep-f-not-above-one", T, f"{BIR} --repulsion --use-rep-f --rep-f=1", "--rep-f must be > 1",
         "a repulsion-factor gate that admits nothing"),
    case("train-c-drop-one", T, f"{BIR} --contrastive --c-drop=1", "--c-drop must be in [0, 1)",
         "a dropout that drops everything"),
    case("train-lamda-negative", T, f"{BIR} --repulsion --lamda-rep=-1", "--lamda-rep must be >= 0",
         "a negative term weight"),
    # ---- python -m tune_bir.train: combinations -------------------------------------------------------------
    case("train-bi-without-generative", T, "--brain-inspired", "--brain-inspired needs --replay=generative",
         "BI-R without generative replay"),
    case("train-term-without-feedback", T, "--repulsion", "needs --replay=generative",
         "an exaggeration term without replay through feedback"),
    case("train-prior-target-without-gmm", T, "--replay=generative --feedback --repulsion",
         "--rep-target=prior needs the per-class GMM prior", "a prior target without the GMM prior"),
    case("train-gate-without-term", T, f"{BIR} --use-rep-f", "--use-rep-f needs", "a sub-switch without its term"),
    case("train-scores-and-hard", T, f"{BIR} --contrastive --c-scores --c-hard", "alternatives",
         "two alternatives at once"),
    case("train-bce-on-cifar", T, f"--experiment=CIFAR100 {BIR} --recon-loss=BCE", "--recon-loss=BCE needs targets",
         "BCE on targets outside [0, 1]"),
    case("train-replay-task-scenario", T, "--scenario=task --replay=current", "--scenario=class only",
         "replay outside the class scenario"),
    case("train-gates-without-per-class", T, "--replay=generative --prior=GMM --dg-gates", "needs --per-class",
         "class gates without a mode per class"),
    # ---- python -m tune_bir.train: files and services -------------------------------------------------------
    case("train-config-missing", T, "--config={cwd}/nope.json", "config file not found",
         "a config file that is not there"),
    case("train-config-is-folder", T, "--config={cwd}/cfgdir", ["cfgdir", "is a folder"],
         "a folder where a config file is expected", files={"cfgdir": None}),
    case("train-config-not-json", T, "--config={cwd}/c.json", "is not valid JSON", "a config file that is not JSON",
         files={"c.json": "{iters: 3"}),
    case("train-config-not-object", T, "--config={cwd}/c.json", "must hold a JSON object",
         "a config file that holds a list", files={"c.json": "[1, 2]"}),
    case("train-config-unknown-field", T, "--config={cwd}/c.json", ["unknown config field", "iterz"],
         "a config file with an unknown field", files={"c.json": '{"iterz": 3}'}),
    case("train-config-retired-field", T, "--config={cwd}/c.json", ["config field tuning is retired", "drop it"],
         "a config file that switches on a field that never acted", files={"c.json": '{"tuning": true}'}),
    case("train-config-wrong-type", T, "--config={cwd}/c.json", "--iters must be an integer, got 'ten'",
         "a config file with a count given as text", files={"c.json": '{"iters": "ten"}'}),
    case("train-config-bool-as-text", T, "--config={cwd}/c.json", "--si must be true or false, got 'no'",
         "a config file with a switch given as text", files={"c.json": '{"si": "no"}'}),
    case("train-config-null", T, "--config={cwd}/c.json", "--seed must be an integer, got None",
         "a config file that empties a field without a default", files={"c.json": '{"seed": null}'}),
    case("train-config-bad-choice", T, "--config={cwd}/c.json", "--kl-js must be one of kl, js, js_ref",
         "a config file with a value outside its choices", files={"c.json": '{"kl_js": "jsd"}'}),
    case("train-config-bad-precision", T, "--config={cwd}/c.json", "--precision must be one of fp32, tf32, bf16",
         "a precision that does not exist (fp16)", files={"c.json": '{"precision": "fp16"}'}),
    case("train-config-bad-compile", T, "--config={cwd}/c.json",
         "--compile must be one of off, default, reduce-overhead", "a compile mode torch has but the engine does "
         "not offer", files={"c.json": '{"compile": "max-autotune"}'}),
    case("train-missing-conv-layers", T, f"--experiment=CIFAR100 {BIR} --pretrained-conv={{cwd}}/none.pt",
         "tune_bir.pretrain", "CIFAR-100 without pre-trained conv layers"),
    case("train-results-dir-is-file", T, "--iters=2 --results-dir={cwd}/afile", ["--results-dir", "is a file"],
         "a file where the results folder is expected", files={"afile": "x"}),
    case("train-data-offline", T, "--experiment=splitMNIST --iters=2 --data-dir={cwd}/nodata", ["nodata", "fill"],
         "a data set that is neither there nor downloadable"),
    case("train-mlflow-unreachable", T, "--iters=2 --mlflow", ["127.0.0.1:{port}", "MLFLOW_TRACKING_URI"],
         "live logging to an MLflow server where nothing listens",
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
    # ---- python -m tune_bir.train: flags that would change nothing in this combination ------------------------
    case("idle-hidden-on-mnist", T, "--replay=generative --feedback --hidden", "--hidden (internal replay",
         "internal replay where there are no conv layers"),
    case("idle-per-class-standard-prior", T, "--replay=generative --per-class", "--per-class (one prior mode",
         "a mode per class without a mixture prior"),
    case("idle-gmm-without-per-class", T, "--replay=generative --prior=GMM", "add --per-class",
         "a mixture prior without its modes per class"),
    case("idle-dg-prop-without-gates", T, "--replay=generative --dg-prop=0.5", "--dg-prop (the share",
         "a gate share without gates"),
    case("idle-c-without-si", T, "--c=5", "--c (the SI strength) acts only with --si", "an SI strength without SI"),
    case("idle-epsilon-without-si", T, "--epsilon=0.5", "--epsilon (the SI damping)", "an SI damping without SI"),
    case("idle-distill-without-replay", T, "--distill", "--distill (soft targets", "distillation without replay"),
    case("idle-temp-without-distill", T, "--replay=current --temp=4", "--temp (the distillation temperature)",
         "a temperature nothing is softened with"),
    case("idle-batch-replay-lwf", T, "--replay=current --batch-replay=64", "--batch-replay acts only",
         "a replay batch size where nothing is generated"),
    case("idle-z-dim-classifier", T, "--z-dim=32", "--z-dim (the latent size)", "a latent size without a latent"),
    case("idle-recon-loss-classifier", T, "--recon-loss=MSE", "--recon-loss acts only",
         "a reconstruction loss without reconstruction"),
    case("idle-pretrained-conv-mnist", T, "--pretrained-conv={cwd}/c.pt", "--pretrained-conv acts on CIFAR-100",
         "conv layers for a protocol without conv layers"),
    case("idle-term-weight", T, f"{BIR} --lamda-rep=5", "--lamda-rep acts only with --repulsion",
         "a term weight without its term"),
    case("idle-term-option", T, f"{BIR} --kl-js=kl", "--kl-js acts only with --repulsion",
         "a term option without its term"),
    case("idle-shared-option", T, f"{BIR} --recon-attraction --d-min=0.1",
         "--d-min acts only with --repulsion or --recon-repulsion", "a floor of inverse terms without one"),
    case("idle-contrastive-option", T, f"{BIR} --c-temp=0.5", "--c-temp acts only with --contrastive",
         "a contrastive option without contrastive replay"),
    case("idle-aux-decoder-mnist", T, f"{BIR} --contrastive --aux-decoder=trained", "acts on CIFAR-100 only",
         "an auxiliary decoder where views need none"),
    case("idle-segment-iters-train", T, "--segment-iters=5", "--segment-iters cuts a sweep",
         "Tune steps in a run that has none"),
    case("idle-sweep-base-option", S, "--c-temp 0.5", "no trial of space repulsion",
         "a base option no trial of the space uses"),
    case("idle-sweep-num-cpus-cluster", S, "--num-cpus 2 --address 127.0.0.1:{port}", "--num-cpus sizes a local Ray",
         "local Ray CPUs for a cluster"),
    case("idle-analysis-uri-without-mlflow", A, "{cwd}/fake --no-mlflow --mlflow-uri sqlite:///{cwd}/x.db",
         "drop --mlflow-uri or --no-mlflow", "an MLflow URI that is never read", prepare=analysis_sweep()),
    # ---- python -m tune_bir.pretrain ------------------------------------------------------------------------
    case("pretrain-epochs-zero", P, "--epochs=0", "--epochs must be >= 1", "pre-training for no epoch"),
    case("pretrain-lr-negative", P, "--lr=-1", "--lr must be > 0", "a negative pre-training learning rate"),
    case("pretrain-batch-not-int", P, "--batch=big", ["--batch", "invalid int value"],
         "a pre-training batch size given text"),
    case("pretrain-max-iters-negative", P, "--max-iters=-1", "--max-iters must be >= 0",
         "a negative iteration limit (it wrote untrained layers)"),
    case("pretrain-experiment-cifar100", P, "--experiment=CIFAR100", ["--experiment", "invalid choice"],
         "pre-training on a protocol it does not support"),
    case("pretrain-out-under-file", P, "--max-iters=1 --out={cwd}/afile/conv.pt", ["--out", "is a file"],
         "an output path under a file (found after training before)", files={"afile": "x"}),
    case("pretrain-out-is-folder", P, "--max-iters=1 --out={cwd}/models", ["--out", "is a folder"],
         "a folder where the output file is expected", files={"models": None}),
    case("pretrain-device-unknown", P, "--device=tpu", "--device must be", "a pre-training device torch lacks"),
    case("pretrain-data-offline", P, "--max-iters=1 --data-dir={cwd}/nodata", ["nodata", "fill"],
         "CIFAR-10 neither there nor downloadable"),
    # ---- python -m tune_bir.sweep ---------------------------------------------------------------------------
    case("sweep-unknown-space", S, "--space bogus", "unknown search space 'bogus'", "a search space nobody named"),
    case("sweep-space-not-yaml", S, "--space {cwd}/s.yaml", ["is not valid YAML", "line"],
         "a space that is not YAML", files={"s.yaml": "params: [oops"}),
    case("sweep-space-unknown-field", S, "--space {cwd}/s.yaml", ["unknown parameter 'lamda_repp'", "lamda_rep?"],
         "a space with a parameter that is no config field",
         files={"s.yaml": SPACE_HEAD + "  lamda_repp: {loguniform: [1, 2]}\n"}),
    case("sweep-space-empty-range", S, "--space {cwd}/s.yaml", "empty range", "a space with low >= high",
         files={"s.yaml": SPACE_HEAD + "  lamda_rep: {loguniform: [5, 1]}\n"}),
    case("sweep-space-unknown-distribution", S, "--space {cwd}/s.yaml", "needs exactly one of",
         "a space with a distribution nobody offers",
         files={"s.yaml": SPACE_HEAD + "  lamda_rep: {normal: [0, 1]}\n"}),
    case("sweep-space-never-condition", S, "--space {cwd}/s.yaml", "can never hold",
         "a space whose condition cannot hold",
         files={"s.yaml": SPACE_HEAD + "  use_rep_f: {choice: [true]}\n"
                                       "  rep_f: {uniform: [2, 3], when: {use_rep_f: false}}\n"}),
    case("sweep-space-fixed-and-searched", S, "--space {cwd}/s.yaml", "both fixed and searched",
         "a space that fixes and samples one field",
         files={"s.yaml": "fixed: {repulsion: true, lamda_rep: 1.0}\nparams:\n  lamda_rep: {loguniform: [1, 2]}\n"}),
    case("sweep-space-invalid-bound", S, "--space {cwd}/s.yaml", ["n_rep=0", "--n-rep must be >= 1"],
         "a space whose bound is an invalid config", files={"s.yaml": SPACE_HEAD + "  n_rep: {int: [0, 3]}\n"}),
    case("sweep-space-is-folder", S, "--space {cwd}/sp.yaml", ["sp.yaml", "is a folder"],
         "a folder where a space file is expected", files={"sp.yaml": None}),
    case("sweep-space-clashes-base", S, "--lamda-rep 5", "sets lamda_rep itself", "a base flag the space samples"),
    case("sweep-val-fraction-zero", S, "--val-fraction 0", "--val-fraction must be > 0",
         "a sweep with nothing to select on"),
    case("sweep-grace-period", S, "--grace-period 9", "--grace-period must be 1..5",
         "a grace period beyond the last task"),
    case("sweep-reduction-factor", S, "--reduction-factor 1", "--reduction-factor must be > 1",
         "ASHA that keeps everyone"),
    case("sweep-share-first-task-with-segments", S, "--share-first-task --iters 20 --segment-iters 5",
         ["--share-first-task", "--segment-iters=5", "drop one"], "sharing a whole task 1 with segmented steps"),
    case("sweep-num-samples", S, "--num-samples 0", "--num-samples must be >= 1", "a sweep of no trial"),
    case("sweep-max-concurrent", S, "--max-concurrent 0", "--max-concurrent must be >= 1", "no trial at a time"),
    case("sweep-cpus-per-trial", S, "--cpus-per-trial 0", "--cpus-per-trial must be > 0", "a trial without CPU"),
    case("sweep-cpus-more-than-local", S, "--cpus-per-trial 4 --num-cpus 2", ["--cpus-per-trial=4", "--num-cpus"],
         "more CPUs per trial than the local Ray has"),
    case("sweep-gpus-negative", S, "--gpus-per-trial -1", "--gpus-per-trial must be >= 0", "negative GPUs"),
    case("sweep-gpus-more-than-any-node", S, "--gpus-per-trial 64", ["--gpus-per-trial=64", "GPU(s)"],
         "more GPUs per trial than any node has"),
    case("sweep-time-budget", S, "--time-budget 0", "--time-budget must be > 0", "a sweep with no time"),
    case("sweep-max-failures", S, "--max-failures -1", "--max-failures must be >= 0", "negative retries"),
    case("sweep-startup-trials", S, "--n-startup-trials 0", "--n-startup-trials must be >= 1",
         "TPE with no random start"),
    case("sweep-seeds-per-trial", S, "--seeds-per-trial 0", "--seeds-per-trial must be >= 1", "a trial of no seed"),
    case("sweep-baseline-invalid", S, "--no-brain-inspired", "acts on replayed memories",
         "a base config the space's terms cannot act on"),
    case("sweep-config-missing", S, "--config {cwd}/nope.json", "config file not found",
         "a sweep config file that is not there"),
    case("sweep-ray-unreachable", S, "--address 127.0.0.1:{port}", ["127.0.0.1:{port}", "ray start --head"],
         "a Ray address where nothing listens"),
    case("sweep-mlflow-unreachable", S, "--mlflow-uri http://127.0.0.1:{port}", ["127.0.0.1:{port}", "mlflow server"],
         "a sweep's MLflow server where nothing listens"),
    case("sweep-mlflow-sqlite-folder", S, "--mlflow-uri sqlite:///{cwd}/nowhere/mlflow.db", "does not exist",
         "an MLflow store in a folder that is not there"),
    case("sweep-storage-under-file", S, "--storage-path {cwd}/afile/rr", "is a file", "a storage path under a file",
         files={"afile": "x"}),
    case("sweep-storage-unknown-scheme", S, "--storage-path nosuchfs://bucket/rr", "nosuchfs://bucket/rr",
         "a storage URI of an unknown file system"),
    case("sweep-dashboard-with-address", S, "--dashboard --address 127.0.0.1:{port}", "--dashboard starts",
         "a local dashboard for a remote cluster"),
    case("sweep-exists-without-resume", S, "--name s --storage-path {cwd}/rr", "add --resume",
         "a new sweep over an existing one", prepare=sweep_folder()),
    case("sweep-resume-unknown-name", S, "--resume --name nope --storage-path {cwd}/rr", "no sweep to resume",
         "resuming a sweep that is not there", files={"rr": None}),
    case("sweep-resume-other-space", S, "--resume --name s --storage-path {cwd}/rr --space recon",
         ["--space recon contradicts", "repulsion"], "a setting that contradicts the resumed sweep's own",
         prepare=sweep_folder()),
    case("sweep-resume-store-gone", S, "--resume --name s --storage-path {cwd}/rr", ["mlflow.db", "is gone"],
         "resuming a sweep whose MLflow store is gone", prepare=sweep_folder()),
    case("sweep-optuna-storage-not-a-url", S, "--optuna-storage notaurl", ["--optuna-storage notaurl", "database URL"],
         "an Optuna storage that is no database URL"),
    case("sweep-optuna-storage-relative", S, "--optuna-storage sqlite:///o.db", "absolute SQLite path",
         "a relative SQLite path for the Optuna study (a resumed sweep may run elsewhere)"),
    case("sweep-optuna-storage-folder", S, "--optuna-storage sqlite:///{cwd}/nowhere/o.db", "does not exist",
         "an Optuna SQLite file in a folder that is not there"),
    case("sweep-optuna-study-taken", S, "--name s --optuna-storage sqlite:///{cwd}/o.db", "already holds a study 's'",
         "a new sweep whose study name its Optuna storage holds already", prepare=optuna_study("o.db", "s")),
    case("sweep-top-k-without-confirm", S, "--top-k 2", ["--top-k", "--confirm SWEEP"],
         "a --confirm option without --confirm"),
    # ---- python -m tune_bir.sweep --confirm -----------------------------------------------------------------
    case("confirm-no-sweep", S, "--confirm {cwd}/nowhere", "no sweep at", "confirming a folder that holds no sweep"),
    case("confirm-top-k-zero", S, "--confirm {cwd}/rr/s --top-k 0", "--top-k must be >= 1", "confirming no config",
         prepare=sweep_folder()),
    case("confirm-one-seed", S, "--confirm {cwd}/rr/s --seeds 1", "--seeds must be >= 2",
         "a paired test of one seed", prepare=sweep_folder()),
    case("confirm-unfinished-sweep", S, "--confirm {cwd}/rr/s", ["no results.csv", "--resume"],
         "confirming a sweep that never finished", prepare=sweep_folder()),
    case("confirm-nothing-completed", S, "--confirm {cwd}/rr/s", "nothing to confirm",
         "confirming a sweep whose only completed trial is the baseline", prepare=sweep_folder(results=ONLY_BASELINE)),
    case("confirm-exists", S, "--confirm {cwd}/rr/s", ["add --resume", "confirm"],
         "a new confirmation over an existing one", prepare=sweep_folder(results=ONLY_BASELINE, confirm=True)),
    case("confirm-resume-nothing", S, "--confirm {cwd}/rr/s --resume", "no confirmation to resume",
         "resuming a confirmation that never began", prepare=sweep_folder(results=ONLY_BASELINE)),
    case("confirm-no-parent-run", S, "--confirm {cwd}/rr/s", "names no MLflow parent run",
         "confirming a sweep that never started", prepare=sweep_folder(mlflow=False)),
    case("confirm-sweep-json-broken", S, "--confirm {cwd}/rr/s", "is not valid JSON",
         "confirming a sweep whose sweep.json is not JSON", prepare=sweep_folder(text="{oops")),
    case("confirm-sweep-json-foreign", S, "--confirm {cwd}/rr/s", "is not one this version wrote",
         "a sweep.json of another format", prepare=sweep_folder(text='{"name": "s"}')),
    case("confirm-with-sweep-option", S, "--confirm {cwd}/rr/s --num-samples 9",
         ["--num-samples does not apply to --confirm"], "a sweep option that a confirmation does not use",
         prepare=sweep_folder(results=ONLY_BASELINE)),
    # ---- python -m tune_bir.sweep --confirm DIR --config-file / --configs / --sequential ---------------------
    case("seqconf-label-not-ranked", S, "--confirm {cwd}/rr/s --configs top1,top3", ["top3 is not in", "ranking"],
         "a label that is not in the sweep's ranking", prepare=ranked_sweep),
    case("seqconf-config-file-not-a-list", S, "--confirm {cwd}/c --config-file {cwd}/configs.json",
         ["must hold a JSON list of configs"], "a config file that is not a list of configs",
         files={"configs.json": '{"label": "rep", "values": {"repulsion": true}, "source": "x"}'}),
    case("seqconf-config-not-a-field", S, "--confirm {cwd}/c --config-file {cwd}/configs.json",
         ["'lamda_repp' is not a config field"], "a config file whose config sets a field that does not exist",
         files={"configs.json": ONE_CONFIG.replace("lamda_rep", "lamda_repp")}),
    case("seqconf-bases-differ", S, "--confirm {cwd}/c --config-file {cwd}/configs.json --iters 8",
         ["from-b comes from sweep b", "base configs must be equal"], "configs from sweeps with different base configs",
         prepare=sweeps_with_other_bases),
    case("seqconf-margin-zero", S, f"--confirm {{cwd}}/c --config-file {{cwd}}/configs.json {SEQ} --margin 0",
         "--margin must be > 0", "a sequential confirmation with no equivalence margin",
         files={"configs.json": ONE_CONFIG}),
    case("seqconf-looks-above-seeds", S, f"--confirm {{cwd}}/c --config-file {{cwd}}/configs.json {SEQ} --looks 9",
         "--looks must be 1..4", "more looks than seeds", files={"configs.json": ONE_CONFIG}),
    case("seqconf-too-few-seeds", S, f"--confirm {{cwd}}/c --config-file {{cwd}}/configs.json {SEQ} --max-seeds 3",
         "--max-seeds must be >= 4", "a sequential confirmation of under 4 seeds", files={"configs.json": ONE_CONFIG}),
    case("seqconf-seeds-used", S, f"--confirm {{cwd}}/c --config-file {{cwd}}/configs.json {SEQ} --first-seed 4",
         ["seeds already used: 5 (confirmation old", "--first-seed 13", "--reuse-seeds"],
         "seeds that the ledger knows, without --reuse-seeds",
         files={"configs.json": ONE_CONFIG, "seed_ledger.json": json.dumps({"format": 1, "entries": [
             {"kind": "confirmation", "label": "old", "folder": "/elsewhere/old", "seeds": list(range(5, 13)),
              "plan_sha256": "0" * 64}]})}),
    case("then-confirm-one-sample", S, "--then-confirm --num-samples 1 --margin 0.005",
         ["--then-confirm needs --num-samples >= 2", "baseline"], "a sweep and confirmation with nothing to confirm"),
    case("then-confirm-no-margin", S, "--then-confirm --num-samples 4", "--then-confirm needs --margin D",
         "a sequential confirmation without its equivalence margin"),
    case("seqconf-plan-tampered", S, "--confirm {cwd}/c --resume", "no longer matches its registered sha256",
         "resuming a confirmation whose plan.json changed after it was registered", prepare=tampered_plan),
    # ---- python -m analysis ---------------------------------------------------------------------------------
    case("analysis-missing-folder", A, "{cwd}/nope", "does not exist", "analysing a folder that is not there"),
    case("analysis-not-a-sweep", A, "{cwd}/empty", "no sweep.json", "analysing a folder that holds no sweep",
         files={"empty": None}),
    case("analysis-sweep-is-file", A, "{cwd}/afile", "afile is a file, not a sweep folder",
         "a file where a sweep folder is expected", files={"afile": "x"}),
    case("analysis-no-trials", A, "{cwd}/bare --no-mlflow", "nothing to analyse", "analysing a sweep that never ran",
         prepare=analysis_sweep(name="bare", trials={})),
    case("analysis-top-k-zero", A, "{cwd}/fake --top-k 0", "--top-k: must be an integer >= 1",
         "an empty top table", prepare=analysis_sweep()),
    case("analysis-top-k-text", A, "{cwd}/fake --top-k many", ["--top-k", "'many'"], "a top-k given text",
         prepare=analysis_sweep()),
    case("analysis-both-sources", A, "{cwd}/fake --sweep fake", "not both", "two sources at once",
         prepare=analysis_sweep()),
    case("analysis-no-source", A, "", "no sweep given", "no source at all"),
    case("analysis-no-store", A, "--mlflow-uri sqlite:///{cwd}/none.db --sweep fake", "no MLflow store at",
         "an MLflow store that is not there"),
    case("analysis-unknown-sweep-in-store", A, "--mlflow-uri sqlite:///{cwd}/store.db --sweep nope", "nope",
         "a sweep name the MLflow store does not hold", prepare=mlflow_store_without_sweeps),
    case("analysis-no-parent-run", A, "{cwd}/fake", "names no MLflow parent run; add --no-mlflow",
         "attaching to a sweep without an MLflow run", prepare=analysis_sweep()),
    case("analysis-mlflow-unreachable", A, "--mlflow-uri http://127.0.0.1:{port} --sweep fake",
         ["127.0.0.1:{port}", "mlflow server"],
         "reading a sweep from an MLflow server where nothing listens"),
    case("analysis-uri-out", A, "{cwd}/fake --out s3://bucket/x", "is not a local folder",
         "MLflow attachments from a remote folder", prepare=analysis_sweep()),
    case("analysis-out-is-file", A, "{cwd}/fake --no-mlflow --out {cwd}/afile", ["--out", "is a file"],
         "a file where the report folder is expected", prepare=analysis_sweep(), files={"afile": "x"}),
    case("analysis-sweep-json-broken", A, "{cwd}/fake --no-mlflow", ["sweep.json is not valid JSON"],
         "analysing a sweep whose sweep.json is not JSON", prepare=analysis_sweep(sweep_json="{not json")),
    case("analysis-sweep-json-foreign", A, "{cwd}/fake --no-mlflow", ["not one tune_bir.sweep wrote", "space"],
         "analysing a sweep.json that lacks what a sweep writes", prepare=analysis_sweep(sweep_json='{"name": "x"}')),
    case("analysis-confirmation-without-baseline", A, "{cwd}/fake --no-mlflow", ["no 'baseline' config", "--resume"],
         "a confirmation without its baseline", prepare=analysis_sweep(confirm_without_baseline=True)),
    case("analysis-sequential-plan-changed", A, "{cwd}/rr/c --no-mlflow",
         ["plan.json no longer matches its registered sha256", "no verdicts"],
         "verdicts from a plan.json edited after it was registered", prepare=sequential_confirmation(_edit_plan)),
    case("analysis-sequential-plan-unregistered", A, "{cwd}/rr/c --no-mlflow", "has no registered sha256",
         "verdicts from a plan.json that was never registered", prepare=sequential_confirmation(_unregister)),
    case("analysis-sequential-foreign-config", A, "{cwd}/rr/c --no-mlflow",
         ["config(s) ['other']", "does not name"], "verdicts with results of a config outside the plan",
         prepare=sequential_confirmation(_add_row(config="other", seed=100, status="completed", acc_avg=0.8))),
    case("analysis-sequential-foreign-seed", A, "{cwd}/rr/c --no-mlflow", ["seed(s) [999]", "does not name"],
         "verdicts with results of a seed outside the plan",
         prepare=sequential_confirmation(_add_row(config="baseline", seed=999, status="completed", acc_avg=0.8))),
    case("analysis-power-no-source", A, "power --dz 0.5", ["give --pilot FOLDER", "./power"],
         "planning without a pilot or an sd"),
    case("analysis-power-looks-above-max", A, "power --sd 0.01 --dz 0.5 --looks 60 --max-seeds 48",
         "--looks 60 is above --max-seeds 48", "planning more looks than seeds"),
    case("analysis-power-sd-zero", A, "power --sd 0 --dz 0.5", "--sd: must be a number > 0", "a paired sd of 0"),
    case("analysis-power-pilot-not-a-confirmation", A, "power --pilot {cwd}/empty", "not a confirmation folder",
         "a pilot folder without per-seed results", files={"empty": None}),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"
_dup = [r for r in {c.rule for c in CASES} if sum(c.rule == r for c in CASES) > 1]
assert not _dup, f"each case breaks a rule of its own: {_dup}"


@dataclass
class Outcome:
    out: subprocess.CompletedProcess
    elapsed: float
    before: set[str]
    after: set[str]
    port: int


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _case_command(c: Case, cwd: Path, cache: Path) -> tuple[list[str], dict[str, str], int]:
    """The row's argv and environment, in its working directory (its files made), and its port."""
    cwd.mkdir(parents=True)
    port = free_port()
    for name, text in c.files.items():
        if text is None:
            (cwd / name).mkdir(parents=True)
        else:
            (cwd / name).write_text(text)
    if c.prepare is not None:
        c.prepare(cwd)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"TUNE_BIR_CACHE_DIR": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
            "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1"}
    env |= {k: v.format(port=port, cwd=cwd) for k, v in c.env.items()}
    return [a.format(cwd=cwd, port=port) for a in c.argv], env, port


def _run(c: Case, cwd: Path, cache: Path, forked: bool = True) -> Outcome:
    """Run one row: forked from the fork server (default), or as a fresh `python -m` interpreter."""
    argv, env, port = _case_command(c, cwd, cache)
    before = _tree(cwd)
    args = [sys.executable, "-m", c.module, *argv]
    start = time.monotonic()
    if forked:
        out, err = cwd.parent / f"{cwd.name}.stdout", cwd.parent / f"{cwd.name}.stderr"
        status = cwd.parent / f"{cwd.name}.status"
        proc = forked_command.context().Process(target=forked_command.run_module,
                                                args=(c.module, argv, str(cwd), env, str(out), str(err), str(status)))
        proc.start()
        proc.join(TIMEOUT_S)
        hung = proc.exitcode is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)   # leftovers of this command's session only
        proc.join()
        stdout, stderr = out.read_text(), err.read_text()
        returncode = forked_command.exit_code(proc, str(status))
    else:
        popen = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        hung = False
        try:
            stdout, stderr = popen.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)   # leftovers of this command's session only
        returncode = popen.returncode
    if hung:   # a hang: report it as the row's outcome
        stderr = f"hung for {TIMEOUT_S} s\n{stderr}"
    out = subprocess.CompletedProcess(args, returncode, stdout, stderr)
    return Outcome(out, time.monotonic() - start, before, _tree(cwd), port)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every selected case, run once, several at a time."""
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case_id" in item.callspec.params]
    root, cache = tmp_path_factory.mktemp("bad-input"), tmp_path_factory.mktemp("bad-input-cache")
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {i: pool.submit(_run, CASES_BY_ID[i], root / i, cache) for i in dict.fromkeys(selected)}
        return {i: f.result() for i, f in futures.items()}


@pytest.mark.parametrize("case_id", list(CASES_BY_ID))
def test_bad_input_is_one_line_exit_2_and_nothing_started(outcomes, case_id):
    c, o = CASES_BY_ID[case_id], outcomes[case_id]
    prog = "python -m " + c.module + (" power" if c.argv[:1] == ("power",) else "")   # analysis's subcommand
    shown = f"rule: {c.rule}\nstdout: {o.out.stdout[-1500:]}\nstderr: {o.out.stderr[-3000:]}"
    assert o.out.returncode == 2, shown
    assert o.out.stderr.startswith(f"{prog}: error: ") and o.out.stderr.count("\n") == 1, shown
    assert "Traceback" not in o.out.stderr + o.out.stdout, shown
    for words in c.expect:
        assert words.format(port=o.port) in o.out.stderr, shown
    assert o.after == o.before, f"created {sorted(o.after - o.before)}; {shown}"
    assert "Ray instance" not in o.out.stdout + o.out.stderr and "task 1/" not in o.out.stdout, shown
    assert o.elapsed < FAIL_WITHIN_S, (o.elapsed, shown)


def test_the_table_breaks_at_least_40_distinct_rules_on_every_command():
    assert len({c.rule for c in CASES}) >= 40
    modules = {c.module for c in CASES}
    assert modules == {T, P, S, A}
    assert any("--confirm" in c.argv for c in CASES)


# the first row of each command, and rows that go far: an environment naming a port, a download refused at the
# network boundary, a Ray address nobody answers; forked and fresh, each must give the same outcome
EMULATION_ROWS = (*dict.fromkeys(c.module for c in CASES), "train-mlflow-unreachable", "train-data-offline",
                  "sweep-ray-unreachable")


@pytest.mark.parametrize("row", EMULATION_ROWS)
def test_the_forked_commands_are_the_python_dash_m_commands(row, tmp_path):
    c = CASES_BY_ID.get(row) or next(c for c in CASES if c.module == row)

    def outcome(forked: bool) -> tuple:
        cwd = tmp_path / ("forked" if forked else "fresh")
        o = _run(c, cwd, tmp_path / "cache", forked=forked)
        text = (o.out.stdout + "\n" + o.out.stderr).replace(str(cwd), "{cwd}").replace(str(o.port), "{port}")
        return o.out.returncode, text, sorted(o.after - o.before)

    (tmp_path / "cache").mkdir()
    assert outcome(forked=True) == outcome(forked=False)
