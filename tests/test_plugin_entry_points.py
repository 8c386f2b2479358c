"""A plugin in a package of its own registers through the entry-point group `tune_bir.plugins`, with no edit to
this repository (docs/extending.md "A plugin in a package of your own"): an installed package, written here as
a folder on PYTHONPATH with its `.dist-info` (what pip writes when it installs one), and the real command line.
Its fields join BIRConfig, the flags and the validation; a broken one is the command's one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import make_fake_mnist

ROOT = Path(__file__).resolve().parent.parent
PROG = "python -m tune_bir.train"

PLUGIN = '''
"""An L2 penalty on the classifier's weights, as a plugin of another package."""

import torch

from tune_bir.fields import Field
from tune_bir.plugin import Plugin, register


@register
class WeightDecay(Plugin):
    name = "weight_decay"
    switch = Field.switch("weight_decay", "an L2 penalty on the classifier's weights")
    weight_field = Field.weight("lamda_decay", 1e-4, "weight of the L2 penalty")

    def __init__(self, weight, params):
        self.weight, self.params = weight, params

    @classmethod
    def from_config(cls, cfg, context):
        return cls(cfg.lamda_decay, list(context.model.classifier.parameters()))

    def before_backward(self):
        return torch.stack([p.square().sum() for p in self.params]).sum()
'''
# a plugin whose field is a core one, and an entry point whose module does not exist
CLASHING = '''
from tune_bir.fields import Field
from tune_bir.plugin import Plugin, register


@register
class FastLearner(Plugin):
    name = "fast"
    switch = Field.switch("fast", "a plugin that takes a core field's name")
    options = (Field("lr", float, 1.0, "the learning rate, again"),)
'''
# three commands of `python -m tune_bir.train` in one process (each as its `__main__` runs it: its main through
# run_main), which saves two imports of torch: --help, a bad value of the plugin's weight, a run with it on
DRIVER = '''
import contextlib, io, json, sys
from tune_bir.cli import run_main
from tune_bir.train import PROG, main

shown = {}
for name, argv in (("help", ["--help"]), ("bad", ["--weight-decay", "--lamda-decay", "-1"]), ("run", sys.argv[1:])):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_main(PROG, main, argv)
        except SystemExit as done:   # argparse's --help
            code = done.code
    shown[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(shown))
'''


def install(site: Path, package: str, entry_points: dict[str, str], files: dict[str, str]) -> None:
    """What pip leaves in site-packages for a package: its modules and a .dist-info with its entry points."""
    for name, text in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text))
    info = site / f"{package}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[tune_bir.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


def start(site: Path, cwd: Path, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_plugin_of_another_package_joins_the_config_the_flags_and_the_validation(tmp_path):
    good, broken = tmp_path / "good", tmp_path / "broken"
    install(good, "my_tune_bir_plugin", {"decay": "my_tune_bir_plugin"}, {"my_tune_bir_plugin/__init__.py": PLUGIN})
    install(broken, "their_plugin", {"missing": "their_plugin_gone", "fast": "their_plugin"},
            {"their_plugin/__init__.py": CLASHING})
    data = make_fake_mnist(tmp_path / "data")   # split MNIST's files, 6 images a class: reading them is instant
    # both processes at once: each spends most of its time importing
    driver = start(good, tmp_path, "-c", DRIVER, "--experiment=splitMNIST", f"--data-dir={data}", "--tasks=2",
                   "--iters=20", "--batch=16", "--fc-units=50", "--threads=1", "--weight-decay", "--lamda-decay=0.1",
                   "--run-name=decay", f"--results-dir={tmp_path}")
    refused = start(broken, tmp_path, "-m", "tune_bir.train", "--iters=20")
    (driver_out, driver_err), (_, refused_err) = (p.communicate(timeout=300) for p in (driver, refused))
    assert driver.returncode == 0, driver_err
    shown = json.loads(driver_out.strip().splitlines()[-1])

    # --help lists its flags with their help; a bad weight is one line, exit 2
    assert shown["help"]["code"] == 0
    assert "--weight-decay" in shown["help"]["stdout"] and "--lamda-decay" in shown["help"]["stdout"]
    assert "weight of the L2 penalty (default: 0.0001)" in " ".join(shown["help"]["stdout"].split())
    assert shown["bad"]["code"] == 2
    assert shown["bad"]["stderr"] == f"{PROG}: error: --lamda-decay must be >= 0, got -1.0\n"

    # a run with the plugin on: its loss in every task's metrics and on the console, its fields in the record
    assert shown["run"]["code"] == 0, shown["run"]["stderr"]
    record = json.loads((tmp_path / "decay.json").read_text())
    assert record["method"] == "none+weight_decay"
    assert (record["config"]["weight_decay"], record["config"]["lamda_decay"]) == (True, 0.1)
    assert list(record["config"])[-5:] == ["pdf", "visdom", "mlflow", "results_dir", "run_name"]   # outputs last
    assert len(record["metrics_per_task"]) == 2
    assert all(task["loss/weight_decay"] > 0 for task in record["metrics_per_task"])
    assert "plugins: weight_decay " in shown["run"]["stdout"]

    # a broken entry point: one line naming it and its package, exit 2, nothing run
    assert refused.returncode == 2, refused_err
    assert refused_err.startswith(f"{PROG}: error: plugin entry point ") and refused_err.count("\n") == 1, refused_err
    assert "Traceback" not in refused_err
    for words in ("missing = their_plugin_gone", "package their_plugin 0.1", "ModuleNotFoundError",
                  "fast = their_plugin", "its field lr is a core field of BIRConfig"):
        assert words in refused_err, refused_err


def test_a_plugin_whose_field_another_plugin_declares_is_refused():
    from tune_bir import exaggeration
    from tune_bir.config import make_config_class
    from tune_bir.fields import Field
    from tune_bir.plugin import Plugin, register, unregister

    class Copy(Plugin):
        name = "copy"
        switch = Field.switch("copy", "a switch")
        options = (Field("d_min", float, 1.0, "another floor"),)   # the repulsion terms' d_min, declared anew

    with pytest.raises(TypeError, match="field d_min is declared by DistributionRepulsion already"):
        register(Copy)

    class Shared(Plugin):
        name = "shared"
        switch = Field.switch("shared", "a switch")
        options = (exaggeration.D_MIN,)   # the same declaration: shared, not declared twice

    register(Shared)
    try:
        assert Shared.fields() == ("shared", "d_min")
    finally:
        unregister("shared")

    class Core(Plugin):
        name = "core"
        switch = Field.switch("core", "a switch")
        options = (Field("seed", int, 1, "a seed"),)

    with pytest.raises(TypeError, match="declares seed, a core field of BIRConfig"):
        make_config_class((Core,))
