"""The command lines: real runs on splitMNIST5k, one-line errors with exit code 2."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pdf_check import read_pages

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iters=3", "--batch=32", "--device=cpu"]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("flags", [
    ["--replay=none"],
    ["--replay=generative"],
    ["--replay=generative", "--brain-inspired"],
    ["--replay=generative", "--brain-inspired", "--si", "--c=0.1", "--pdf"],
    ["--replay=current", "--si"],
], ids=["none", "generative", "bir", "bir-si-pdf", "lwf-si"])
def test_train_cli_runs_each_replay_mode(tmp_path, flags):
    out = run("tune_bir.train", *FAST, *flags, "--run-name=r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("acc_avg=")
    acc = float(last.split("=")[1])
    record = json.loads((tmp_path / "results" / "r.json").read_text())
    assert record["final"]["acc_avg"] == pytest.approx(acc, abs=1e-6)
    assert len(record["acc_matrix"]) == 5 and len(record["metrics_per_task"]) == 5
    assert {"config", "versions", "git_commit", "device"} <= set(record)
    assert "after task" in out.stdout and "forgetting_avg" in out.stdout
    if "--pdf" in flags:
        assert_run_report(tmp_path / "results" / "r.pdf", samples=True)


def assert_run_report(path: Path, samples: bool) -> None:
    """The run's PDF: the accuracy plot (5 task curves with their markers, the average, labels), then, where the
    model generates pixels, a page of 10 x 8 decoded samples, each an image that is neither blank nor a copy."""
    pages = read_pages(path)
    assert len(pages) == (2 if samples else 1)
    plot = pages[0].operators
    assert plot["S"] >= 6 and plot["TJ"] >= 15, plot   # >= 6 stroked curves, tick and axis labels, title, legend
    assert plot["Do"] >= 10, plot   # markers of the 5 + 4 + 3 + 2 + 1 accuracies (one on a frame edge may be cut)
    if samples:
        images = pages[1].images
        assert len(images) == 80 and all(im.ndim == 2 and min(im.shape) >= 28 for im in images)
        assert all(im.std() > 0 for im in images), "a blank sample"
        assert len({im.tobytes() for im in images}) == 80, "samples repeat"


def test_config_file_is_read_and_flags_override_it(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"replay": "generative", "brain_inspired": True, "iters": 2, "seed": 5}))
    out = run("tune_bir.train", f"--config={cfg}", "--iters=3", "--batch=16", "--device=cpu", "--run-name=c",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "results" / "c.json").read_text())
    assert record["config"]["iters"] == 3 and record["config"]["seed"] == 5
    assert record["config"]["brain_inspired"] and record["config"]["dg_gates"]


def test_records_written_with_the_retired_fields_still_load_and_the_flags_are_gone():
    """plan.json and sweep.json of the results hold --tuning / --apply-mask (off); they never acted and are gone."""
    from tune_bir.config import RETIRED_FIELDS, BIRConfig

    for record in ("sequential/plan.json", "repulsion/sweep.json"):
        stored = json.loads((ROOT / "docs" / "results" / record).read_text())["resolved_base_config"]
        assert set(RETIRED_FIELDS) <= set(stored)
        loaded = BIRConfig.from_dict(stored).to_dict()
        assert all(loaded[k] == v for k, v in stored.items() if k not in RETIRED_FIELDS)
    assert not set(RETIRED_FIELDS) & set(BIRConfig.field_names())   # so no flag: the command lines refuse them


@pytest.mark.parametrize("args, message", [
    (["--iters=-5"], "--iters must be > 0"),
    (["--experiment=imagenet"], "invalid choice"),
    (["--brain-inspired"], "--brain-inspired needs --replay=generative"),
    (["--iters=abc"], "invalid int value"),
    (["--dg-prop=1.5", "--replay=generative", "--brain-inspired"], "--dg-prop must be in [0, 1)"),
    (["--tasks=3"], "does not divide"),
    (["--kl-js=jss"], "invalid choice"),
    (["--config=/nonexistent.json"], "config file not found"),
    (["--experiment=CIFAR100", "--pretrained-conv=/nonexistent.pt"], "tune_bir.pretrain"),
    (["--repulsion"], "needs --replay=generative"),
    (["--device=tpu"], "--device must be"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    out = run("tune_bir.train", *args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert message in out.stderr


def test_pretrain_writes_conv_layers_that_a_cifar100_run_loads(tmp_path, fake_cifar_dir, capsys):
    # in-process: the fixture patches torchvision's md5 check of the generated files in this process
    from tune_bir import pretrain, train

    conv = tmp_path / "conv.pt"
    assert pretrain.main([f"--data-dir={fake_cifar_dir}", "--max-iters=2", "--batch=16", "--device=cpu",
                          f"--out={conv}"]) == 0
    assert conv.is_file()
    code = train.main(["--experiment=CIFAR100", f"--data-dir={fake_cifar_dir}", f"--pretrained-conv={conv}",
                       "--replay=generative", "--brain-inspired", "--si", "--c=1e8", "--dg-prop=0.6",
                       "--iters=2", "--batch=8", "--tasks=2", "--fc-units=64", "--device=cpu",
                       f"--results-dir={tmp_path}", "--run-name=cifar"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("acc_avg=")


# The original research README's experiment lines (common part + each variant), issue 3 item 6.
README_COMMON = ["--scenario=class", "--replay=generative", "--brain-inspired", "--si", "--dg-prop=0.6", "--pdf"]
README_VARIANTS = {
    "baseline": [],
    "repulsion": ["--repulsion"],
    "recon": ["--recon-repulsion", "--recon-attraction", "--recon-rep-aver"],
    "not-hidden": ["--not-hidden"],
    "contrastive": ["--contrastive", "--c-scores"],
}


@pytest.mark.parametrize("variant", README_VARIANTS)
def test_original_readme_lines_run_on_split_mnist(tmp_path, variant):
    out = run("tune_bir.train", "--experiment=splitMNIST5k", *README_COMMON, "--c=0.1", *README_VARIANTS[variant],
              *FAST, "--run-name=line", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("acc_avg=")
    assert_run_report(tmp_path / "results" / "line.pdf", samples=True)
    # each term of the line is built and computed on the replayed memories of every task from task 2 on
    per_task = json.loads((tmp_path / "results" / "line.json").read_text())["metrics_per_task"]
    for name in README_LOGGED[variant]:
        assert name not in per_task[0], name                                       # task 1: no replay
        assert all(math.isfinite(m[name]) for m in per_task[1:]), (name, per_task[1:])


# what each README line logs (a term that is not built logs nothing); the not-hidden control trains nothing
README_LOGGED = {"baseline": [], "repulsion": ["loss/repulsion"],
                 "recon": ["loss/recon_repulsion", "loss/recon_attraction"], "not-hidden": [],
                 "contrastive": ["loss/contrastive"]}
# the weights that make each README line's term act (the README's own defaults are inert on purpose)
ACTIVE_WEIGHTS = {"repulsion": ["--lamda-rep=1e4"], "recon": ["--lamda-recon-rep=10", "--lamda-recon-atr=10"],
                  "contrastive": ["--c-lr=1e-2"], "not-hidden": []}


def test_readme_terms_with_active_weights_change_the_learner_and_not_hidden_does_not(tmp_path, capsys):
    # in-process (one import for the six runs); the replay distillation loss of tasks 3-5 depends on the
    # weights learnt in tasks 2-4, so it differs from the baseline's exactly when the term reached the gradient
    from tune_bir import train

    def run(variant: str) -> list[dict]:
        flags = ["--experiment=splitMNIST5k", *README_COMMON[:-1], "--c=0.1", *README_VARIANTS[variant],
                 *ACTIVE_WEIGHTS.get(variant, []), *FAST, f"--results-dir={tmp_path}", f"--run-name={variant}"]
        assert train.main(flags) == 0
        summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task 5: ")]
        plugins = summary[0].partition(" | plugins: ")[2]   # the per-task console line: main losses, then plugins'
        shown = {"baseline": ["si"], "recon": ["si", "recon_repulsion", "recon_attraction"]}.get(
            variant, ["si"] if variant == "not-hidden" else ["si", variant])
        assert "losses: " in summary[0] and "distillation" in summary[0].partition(" | ")[0]
        assert [part.split()[0] for part in plugins.split(", ")] == shown, summary
        return json.loads((tmp_path / f"{variant}.json").read_text())["metrics_per_task"]

    distill = lambda m: [t["loss/distillation"] for t in m[2:]]   # noqa: E731
    baseline = run("baseline")
    for variant in ACTIVE_WEIGHTS:
        metrics = run(variant)
        if variant == "not-hidden":   # a control: the views are built, nothing is trained on them
            assert distill(metrics) == distill(baseline)
        else:
            assert distill(metrics) != distill(baseline), variant
    capsys.readouterr()


@pytest.mark.parametrize("variant", README_VARIANTS)
def test_original_readme_lines_run_on_cifar100(tmp_path, fake_cifar_dir, capsys, variant):
    # in-process: the fixture patches torchvision's md5 check of the generated CIFAR files in this process
    import torch

    from tune_bir import train
    from tune_bir.nets import ConvLayers

    conv = tmp_path / "conv.pt"
    torch.save({"state": ConvLayers().state_dict()}, conv)
    code = train.main(["--experiment=CIFAR100", *README_COMMON, "--c=1e8", *README_VARIANTS[variant],
                       f"--data-dir={fake_cifar_dir}", f"--pretrained-conv={conv}", "--iters=2", "--batch=16",
                       "--device=cpu", f"--results-dir={tmp_path}", "--run-name=cifar"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("acc_avg=")
    record = json.loads((tmp_path / "cifar.json").read_text())
    assert "acc_task_10" in record["final"] and len(record["acc_matrix"]) == 10
    assert_run_report(tmp_path / "cifar.pdf", samples=False)   # features are replayed, not pixels: no sample page
    for name in README_LOGGED[variant]:
        assert all(math.isfinite(m[name]) for m in record["metrics_per_task"][1:]), name
