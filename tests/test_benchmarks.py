"""The benchmarks stay runnable, and the sweep-efficiency arithmetic matches Ray's own ASHA."""

import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune.schedulers import ASHAScheduler

from benchmarks.engine_speed import step_flops, step_gemms
from benchmarks.sweep_efficiency import asymptotic_ratio, rung_milestones
from tune_bir.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("grace", "rf", "max_t"), [(2, 4, 5), (2, 4, 10), (1, 3, 5), (2, 3, 10), (4, 4, 40)])
def test_rung_milestones_are_where_ray_puts_them(grace, rf, max_t):
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=max_t,
                              grace_period=grace, reduction_factor=rf)
    assert rung_milestones(grace, rf, max_t) == sorted(m for m, _ in scheduler._brackets[0]._rungs)


def test_asymptotic_ratio_by_hand():
    # 5 tasks, rung after task 2: everyone trains 2 tasks, a quarter trains the other 3
    assert asymptotic_ratio(2, 4, 5) == pytest.approx((2 + 3 / 4) / 5)
    # 10 tasks, rungs after tasks 2 and 8: a quarter trains 6 more, a sixteenth the last 2
    assert asymptotic_ratio(2, 4, 10) == pytest.approx((2 + 6 / 4 + 2 / 16) / 10)


def test_engine_speed_benchmark_prints_its_ratios():
    out = subprocess.run([sys.executable, "benchmarks/engine_speed.py", "--steps", "2", "--rounds", "1",
                          "--skip-cifar", "--skip-terms", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    for label in ("(a) splitMNIST5k BI-R ", "splitMNIST5k BI-R+SI ", "splitMNIST5k BI-R+SI bf16"):
        line = next(line for line in out.splitlines() if label in line)
        assert "ms/step" in line and "step/floor" in line
    assert "fp32 matmul" in out and "bf16 matmul" in out
    assert "matrix products alone" in out


@pytest.mark.slow
def test_shared_cores_benchmark_prints_its_ratios():
    out = subprocess.run([sys.executable, "benchmarks/shared_cores.py", "--iters", "2", "--tasks", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, check=True).stdout
    for label in ("two together / one alone:", "worker beside a default run / worker alone:",
                  "one run alone, default threads / every core:"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        float(line.split(":", 1)[1].split("x")[0])


def test_step_gemms_count_the_flops_of_the_layer_sizes_by_hand():
    spec = ModelSpec((1, 4, 4), n_classes=3, fc_units=5, fc_layers=2, z_dim=2)
    # layers (in, out): encoder 16->5, classifier 5->3, latent 5->2 twice, decoder 2->5, 5->16
    layers = [(16, 5), (5, 3), (5, 2), (5, 2), (2, 5), (5, 16)]
    n, replay = 6, 4
    trained = sum(6 * n * a * b for a, b in layers) - 2 * n * 16 * 5   # no input gradient into the data
    generation = 2 * replay * (2 * 5 + 5 * 16 + 16 * 5 + 5 * 3)       # decode, then encode + classify
    assert step_flops(spec, 2, replay) == trained + generation
    assert len(step_gemms(spec, 2, replay)) == 3 * len(layers) - 1 + 4
