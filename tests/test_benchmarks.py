"""The benchmarks stay runnable, and the sweep-efficiency arithmetic matches Ray's own ASHA."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray.tune.schedulers import ASHAScheduler

from benchmarks.engine_speed import CPU_TERM_BUDGETS, TERMS, step_flops, step_gemms, term_budgets
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


def test_every_timed_term_has_a_cpu_fp32_budget_and_none_elsewhere():
    assert set(CPU_TERM_BUDGETS) == set(TERMS)
    assert term_budgets(torch.device("cpu"), "fp32") == CPU_TERM_BUDGETS
    assert term_budgets(torch.device("cpu"), "bf16") == {}
    assert term_budgets(torch.device("cuda"), "fp32") == {}


@pytest.fixture(scope="module")
def cpu_device_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """benchmarks/device_check.sh, the script a GPU session runs, dry on the CPU: every phase with tiny sizes.
    Its engine_speed and gpu_sharing phases are also the benchmarks' own CPU runs (the arguments are in the
    tests below), so each benchmark runs once in the suite."""
    out_dir = tmp_path_factory.mktemp("device-check")
    env = os.environ | {"DEVICE": "cpu", "OUT": str(out_dir), "PYTHON": sys.executable,
                        "PYTEST_SELECT": "-k guard_catches"}
    out = subprocess.run(["bash", "benchmarks/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900, check=True).stdout
    return out, out_dir


def phase_output(out: str, name: str) -> str:
    """What one phase of the device check printed."""
    return out[out.index(f"=== {name} (limit"):out.index(f"=== {name}: exit")]


@pytest.mark.slow
def test_engine_speed_benchmark_prints_and_writes_its_ratios(cpu_device_check):
    # engine_speed.py --device cpu --threads 1 --steps 2 --rounds 1 --warmup 1 --terms repulsion --skip-cifar
    # --precisions fp32,tf32,bf16 --count-ops (device_check.sh's CPU arguments)
    out, out_file = phase_output(cpu_device_check[0], "engine_speed"), cpu_device_check[1] / "engine_speed_cpu.json"
    result = json.loads(out_file.read_text())
    # bf16 is timed where torch has oneDNN's bf16 kernels for the instruction set it may use (AVX-512, AMX), and
    # skipped, saying why, where it has not (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2 here): this process
    # runs under the same caps as the benchmark's
    fast_bf16 = torch.backends.mkldnn.enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    check = result["bf16_check"]
    assert check["fast"] is bool(fast_bf16) and check["skipped"] is not fast_bf16
    assert _positive(check["fp32_flops"]) and _positive(check["bf16_flops"]) and check["n"] == 256
    precisions = ["fp32", "tf32", "bf16"] if fast_bf16 else ["fp32", "tf32"]
    expected = {"BI-R", "BI-R+SI", "BI-R+SI tf32", "+ repulsion"} | ({"BI-R+SI bf16"} if fast_bf16 else set())
    skip_lines = [line for line in out.splitlines() if line.startswith("bf16 skipped: ")]
    if fast_bf16:
        assert check["reason"] is None and not skip_lines
    else:
        assert "oneDNN has no bf16 kernels" in check["reason"] or "mkldnn is off" in check["reason"]
        assert len(skip_lines) == 1 and check["reason"] in skip_lines[0] and "--slow-bf16" in skip_lines[0]
        assert "GFLOP/s" in skip_lines[0]
        assert not any(line.startswith("    BI-R+SI bf16") for line in out.splitlines())
    for label in ("    BI-R ", "    BI-R+SI ", "    BI-R+SI tf32", "    + repulsion") + (
            ("    BI-R+SI bf16",) if fast_bf16 else ()):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert "ms/step" in line and "step/floor" in line and "aten ops/step" in line
    assert all(f"{p} matmul" in out for p in precisions)
    assert "matrix products alone" in out

    assert result["device"]["type"] == "cpu" and result["device"]["torch"] == torch.__version__
    assert result["settings"]["precisions"] == precisions
    assert set(result["matmul_rate_flops"]) == set(precisions)
    assert all(_positive(rate) for rate in result["matmul_rate_flops"].values())
    mnist = result["protocols"]["splitMNIST5k"]
    assert _positive(mnist["step_gflop"]) and mnist["batch"] == 128
    variants = mnist["variants"]
    assert set(variants) == expected
    for name, entry in variants.items():
        for key in ("ms_per_step", "step_over_floor", "step_over_floor_best_rate", "ops_per_step"):
            assert _positive(entry[key]), (name, key)
        assert entry["compile"] == "off"
    if fast_bf16:
        assert variants["BI-R+SI bf16"]["precision"] == "bf16"
    repulsion = variants["+ repulsion"]
    assert _positive(repulsion["relative_to_bir_si"]) and repulsion["term"] == "repulsion"
    assert len(repulsion["relative_to_bir_si_rounds"]) == result["settings"]["rounds"]
    # on a CPU the term's fp32 ratio is set against its budget, and the verdict is the ratio's, printed
    assert repulsion["budget_relative_to_bir_si"] == CPU_TERM_BUDGETS["repulsion"]
    assert repulsion["within_budget"] is (repulsion["relative_to_bir_si"] <= CPU_TERM_BUDGETS["repulsion"])
    assert mnist["terms_within_budget"] is repulsion["within_budget"]
    line = next(line for line in out.splitlines() if line.startswith("    + repulsion"))
    assert f"budget x{CPU_TERM_BUDGETS['repulsion']:.2f}" in line
    assert ("OVER BUDGET" in line) is not repulsion["within_budget"]
    assert f"term costs: {int(repulsion['within_budget'])} of 1 within their CPU budget" in out
    assert _positive(mnist["gemms_alone"]["ms"])


@pytest.mark.slow
def test_gpu_sharing_benchmark_runs_processes_side_by_side(cpu_device_check):
    # gpu_sharing.py --device cpu --processes 1,2 --experiment splitMNIST5k --iters 2 --seconds 2
    out, out_file = phase_output(cpu_device_check[0], "gpu_sharing"), cpu_device_check[1] / "gpu_sharing_cpu.json"
    assert "best:" in out and "--gpus-per-trial" in out
    result = json.loads(out_file.read_text())
    assert [row["processes"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert len(row["workers"]) == row["processes"]
        assert all(w["segments"] >= 1 and _positive(w["seconds"]) for w in row["workers"])
        assert _positive(row["segments_per_hour"])
    assert result["best_processes"] in (1, 2)
    assert result["best_gpus_per_trial"] == 1 / result["best_processes"]


@pytest.mark.slow
def test_device_check_script_runs_every_phase_on_the_cpu(cpu_device_check):
    out, tmp_path = cpu_device_check
    summary = out[out.index("=== summary"):].splitlines()[1:]
    assert [line.split()[0] for line in summary] == ["environment", "tests", "engine_speed", "gpu_sharing"]
    assert all("rc=0" in line for line in summary), summary
    assert {"device_check.log", "test_gpu_path.xml", "engine_speed_cpu.json", "gpu_sharing_cpu.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "engine_speed_cpu.json").read_text())["protocols"]["splitMNIST5k"]["variants"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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


def test_sequential_errors_benchmark_prints_its_table():
    out = subprocess.run([sys.executable, "benchmarks/sequential_errors.py", "--batches", "1", "--per-batch", "500",
                          "--configs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| obrien-fleming") or
            line.startswith("| pocock")]
    assert len(rows) == 4 and all("| 500 |" in row for row in rows)   # m = 2, and m = 1 without equivalence
