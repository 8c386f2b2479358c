"""The command lines: real runs on splitMNIST5k, one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert (tmp_path / "results" / "r.pdf").stat().st_size > 1000


def test_config_file_is_read_and_flags_override_it(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"replay": "generative", "brain_inspired": True, "iters": 2, "seed": 5}))
    out = run("tune_bir.train", f"--config={cfg}", "--iters=3", "--batch=16", "--device=cpu", "--run-name=c",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "results" / "c.json").read_text())
    assert record["config"]["iters"] == 3 and record["config"]["seed"] == 5
    assert record["config"]["brain_inspired"] and record["config"]["dg_gates"]


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
    assert (tmp_path / "results" / "line.pdf").is_file()


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
    record = (tmp_path / "cifar.json").read_text()
    assert '"acc_task_10"' in record
