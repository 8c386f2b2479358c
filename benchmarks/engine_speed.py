"""Speed of one training step against this machine's FLOP floor, measured in one run
(docs/architecture.md "Tests and benchmarks", "GPU").

Prints, for (a) splitMNIST5k BI-R (and BI-R+SI) and (b) CIFAR-100 BI-R+SI on generated CIFAR-shaped
data: ms per step while replay is active, in each precision asked for (fp32, tf32, bf16), this device's
measured matrix-product rate in each precision, the step's FLOP count from the layer sizes, and step
time / FLOP floor (the floor at the rate of the step's own precision); optionally the same step under
torch.compile (`--compile default,reduce-overhead`: inductor, and inductor with CUDA graphs), side by
side; the step's own matrix products timed alone against the floor (what the matmul library reaches at
the model's shapes, the part of step/floor no change to the step can remove); the kernels (CUDA) or
aten ops (CPU) one step launches; the gain from caching the frozen conv layers' features; and the cost
of each exaggeration term over plain BI-R+SI, its range over rounds, and (splitMNIST5k, eager fp32 on a CPU)
its budget, `CPU_TERM_BUDGETS`. Ratios only, no asserts: a term over its budget is printed, not failed.
`--out FILE` writes all of it as JSON (device name, torch version, settings), rewritten after each protocol.

bf16 on a CPU: torch multiplies bf16 matrices fast only through oneDNN's bf16 kernels, which need AVX-512
(avx512_core), AMX or AVX2-VNNI-2 within the instruction set oneDNN may use (ONEDNN_MAX_CPU_ISA caps it);
elsewhere (an AVX2-only CPU: older Xeons, many laptops) it falls back to generic loops at a few GFLOP/s, and
the bf16 variant with its 2048 x 2048 rate probe would take minutes. There bf16 is skipped with a line
saying why (`--slow-bf16` times it anyway); the JSON's `bf16_check` keeps the reason and a 256 x 256 product's
rate in fp32 and bf16 (a few ms even on the slow path).

Timing: on a CPU each timed segment is paired with a matrix-rate probe of its precision taken just before
it (a shared machine's speed drifts by tens of per cent within a minute), and step/floor is the median
over segments of (segment's ms per step) / (floor at the rate probed beside it). On a CUDA device steps
are timed with CUDA events between iterations (the device's own clock; a step that never waits for the
host is measured as the device runs it), after warm-up segments, medians over rounds.

  python benchmarks/engine_speed.py [--device cpu|cuda] [--precisions fp32,tf32,bf16] [--compile off,default]
                                    [--steps N] [--rounds N] [--skip-cifar] [--terms repulsion,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tune_bir.config import COMPILE_MODES, PRECISIONS, BIRConfig
from tune_bir.data import Protocol, Split
from tune_bir.device import float32_matmul_precision
from tune_bir.engine import Engine
from tune_bir.model import ModelSpec
from tune_bir.nets import ConvLayers
from tune_bir.record import cpu_fingerprint, cpu_model

TERMS = {
    "repulsion": dict(repulsion=True, lamda_rep=1e3),
    "recon_repulsion": dict(recon_repulsion=True, lamda_recon_rep=1e-2),
    "recon_attraction": dict(recon_attraction=True, lamda_recon_atr=1e-2),
    "contrastive": dict(contrastive=True, c_lr=1e-5),
}
# each term's cost budget over BI-R+SI on splitMNIST5k on a CPU (eager fp32, 2 threads): what a term may cost
# before it needs work (issue #20's goals); a run prints each term's ratio against it, and never fails on it
CPU_TERM_BUDGETS = {"repulsion": 1.15, "recon_repulsion": 1.15, "recon_attraction": 1.15, "contrastive": 1.5}
# the matrix-rate probe's operand dtype and torch float32 matmul precision, per --precision
PROBE_DTYPES = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"), "bf16": (torch.bfloat16, None)}


# ---------------------------------------------------------------------------------------------------------------
# Timing on either device


class Clock:
    """Wall time of work on one device: perf_counter on a CPU, CUDA events (after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def seconds(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000

    def mark(self) -> float | torch.cuda.Event:
        """A point in time now: the host clock, or an event in the device's stream (read after the work)."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, a: float | torch.cuda.Event, b: float | torch.cuda.Event) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1000


class MatmulProbe:
    """A large n x n matrix product in one precision whose best-of-`reps` throughput gives the device's FLOP/s now."""

    def __init__(self, device: torch.device, precision: str = "fp32", n: int | None = None):
        dtype, self.matmul_precision = PROBE_DTYPES[precision]
        self.n = n or (8192 if device.type == "cuda" else 2048)
        self.clock = Clock(device)
        self.best = 0.0
        self.a = torch.randn(self.n, self.n, dtype=dtype, device=device)
        self.b = torch.randn(self.n, self.n, dtype=dtype, device=device)
        self.rate(reps=2)   # warm-up: thread pool, packing buffers, cuBLAS handles and heuristics

    def _product(self) -> None:
        if self.matmul_precision is None:
            self.a @ self.b
            return
        with float32_matmul_precision(self.matmul_precision):
            self.a @ self.b

    def rate(self, reps: int = 2) -> float:
        rate = 2 * self.n**3 / min(self.clock.seconds(self._product) for _ in range(reps))
        self.best = max(self.best, rate)
        return rate


def cpu_bf16_check(n: int = 256) -> dict:
    """Whether torch multiplies bf16 matrices on this CPU with oneDNN's bf16 kernels (`fast`), why not, and an
    n x n product's rate in fp32 and bf16 beside it (on the slow path a 256 x 256 bf16 product takes ~15 ms).

    The decision is the predicate torch's own matmul dispatch uses (oneDNN's bf16 support for the instruction
    set it may use: follows ONEDNN_MAX_CPU_ISA, not /proc/cpuinfo, which lists what the CPU has), not the timed
    rates: a shared machine's speed drifts by tens of per cent, a dispatch rule does not.
    """
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    fast = bool(mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cpu = torch.device("cpu")
    rates = {p: MatmulProbe(cpu, p, n).rate(reps=3) for p in ("fp32", "bf16")}
    if fast:
        reason = None
    elif not mkldnn:
        reason = "torch.backends.mkldnn is off, so bf16 matrix products run in torch's generic loops"
    else:
        isa = cpu_fingerprint()["cpu_isa_onednn"] or "unknown"
        reason = (f"oneDNN has no bf16 kernels for the instruction set it uses here ({isa}; they need AVX-512, "
                  "AMX or AVX2-VNNI-2), so bf16 matrix products run in torch's generic loops")
    return {"fast": fast, "reason": reason, "n": n, "fp32_flops": rates["fp32"], "bf16_flops": rates["bf16"]}


def matmul_flops(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`reps` CPU matmul throughput (FLOP/s) now, fp32 or bf16."""
    return MatmulProbe(torch.device("cpu"), "bf16" if dtype == torch.bfloat16 else "fp32", n).rate(reps)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs of a step


def linear_layers(spec: ModelSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) of the encoder+classifier, latent and decoder linear layers of a BI-R model."""
    sizes = spec.hidden_sizes
    enc = list(zip(sizes[:-1], sizes[1:], strict=True)) + [(sizes[-1], spec.n_classes)]
    latent = [(sizes[-1], spec.z_dim)] * 2
    down = [spec.z_dim] + list(reversed(sizes))
    dec = list(zip(down[:-1], down[1:], strict=True))
    return enc, latent, dec


def step_gemms(spec: ModelSpec, batch: int, batch_replay: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product of one BI-R step with replay, from the layer sizes.

    Forward and backward over current + replayed samples (no input gradient for the first layer),
    and the previous model generating the replay: decode, then encode and classify.
    """
    enc, latent, dec = linear_layers(spec)
    n = batch + batch_replay
    gemms = []
    for i, (a, b) in enumerate(enc + latent + dec):
        gemms += [(n, a, b), (b, n, a)]        # forward; weight gradient
        if i > 0:
            gemms.append((n, b, a))            # input gradient
    gemms += [(batch_replay, a, b) for a, b in dec + enc]
    return gemms


def gemm_flops(gemms: list[tuple[int, int, int]]) -> float:
    """FLOPs of a list of (m, k, n) matrix products: 2 m k n each."""
    return float(sum(2 * m * k * n for m, k, n in gemms))


def step_flops(spec: ModelSpec, batch: int, batch_replay: int) -> float:
    """FLOPs of one BI-R step with replay, from the products of `step_gemms`."""
    return gemm_flops(step_gemms(spec, batch, batch_replay))


def gemms_alone_ms(gemms: list[tuple[int, int, int]], device: torch.device, reps: int = 5) -> float:
    """ms that the step's own fp32 matrix products take, each timed alone (best of `reps`) and summed.

    Against the floor, this splits step/floor into what the matmul library reaches at the model's
    shapes and what the rest of the step (autograd, elementwise ops, optimiser) adds.
    """
    clock, total = Clock(device), 0.0
    for m, k, n in gemms:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        a @ b
        total += min(clock.seconds(lambda a=a, b=b: a @ b) for _ in range(reps))
    return 1000 * total


def conv_flops(n_images: int, size: int = 32) -> float:
    """Forward FLOPs of the frozen conv layers on n images."""
    total, hw = 0, size
    for i, (c_in, c_out) in enumerate(zip(ConvLayers.channels[:-1], ConvLayers.channels[1:], strict=True)):
        hw = hw if i == 0 else (hw + 1) // 2
        total += 2 * 9 * c_in * c_out * hw * hw
    return float(total * n_images)


# ---------------------------------------------------------------------------------------------------------------
# Variants and their timings


@dataclass(frozen=True)
class Variant:
    """One engine configuration to time: its flags, precision, compile mode and exaggeration term (if any)."""

    name: str
    flags: dict
    precision: str = "fp32"
    compile: str = "off"
    term: str | None = None

    def config_flags(self) -> dict:
        return self.flags | {"precision": self.precision, "compile": self.compile}


@dataclass
class Timing:
    """ms per step of one variant's segments, each with its precision's matmul rate probed just before it."""

    ms: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def floor_ratio(self, flops: float) -> float:
        """Median over segments of step time / FLOP floor at the rate measured beside that segment."""
        return statistics.median(ms / (1000 * flops / rate) for ms, rate in zip(self.ms, self.rates, strict=True))


def timed_segment(engine: Engine, steps: int, clock: Clock) -> float:
    """Median ms per iteration over `steps` iterations of the current task (replay active after task 1)."""
    marks: list = []
    engine.train_segment(steps, on_iteration=lambda: marks.append(clock.mark()))
    return 1000 * statistics.median(clock.seconds_between(a, b) for a, b in zip(marks[:-1], marks[1:], strict=True))


OPS_STEPS = 3


def ops_per_step(engine: Engine, steps: int = OPS_STEPS) -> float:
    """Kernels one step launches on a GPU (aten ops the CPU dispatches at top level, on a CPU), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        engine.train_segment(steps)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        count = sum(1 for e in events if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    # the segment's end (evaluation) is counted too when the task ends; budgets leave it inside the task
    return count / steps


def interleaved(engines: dict[str, Engine], variants: dict[str, Variant], steps: int, rounds: int,
                probes: dict[str, MatmulProbe], clock: Clock) -> dict[str, Timing]:
    """Each engine's segment timings, measured round-robin, each right after a rate probe of its precision.

    This machine may be noisy: timing every variant in each round, each segment right after a matmul
    probe, keeps both the ratios between variants and the ratio to the floor fair when the load changes.
    """
    timings = {name: Timing() for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            timings[name].rates.append(probes[variants[name].precision].rate())
            timings[name].ms.append(timed_segment(engine, steps, clock))
    return timings


def trained_to_task_2(engine: Engine, warmup: int) -> Engine:
    """Train task 1 (no replay), then `warmup` iterations of task 2 (replay; compiles and allocates for its shapes)."""
    engine.train_segment(None)
    if warmup:
        engine.train_segment(warmup)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return engine


def mnist_engine(iters: int, device: str, warmup: int, **flags) -> Engine:
    cfg = BIRConfig(experiment="splitMNIST5k", replay="generative", brain_inspired=True,
                    iters=iters, device=device, **({"si": True, "c": 0.1} | flags))
    return trained_to_task_2(Engine(cfg), warmup)


def synthetic_cifar(n_train: int = 300, n_test: int = 50, seed: int = 0) -> Protocol:
    """CIFAR-100-shaped protocol of generated images (10 tasks x 10 classes)."""
    g = torch.Generator().manual_seed(seed)

    def split(task: int, n: int) -> Split:
        y = torch.arange(10 * task, 10 * task + 10).repeat_interleave(n // 10)
        return Split(torch.randn(len(y), 3, 32, 32, generator=g), y)

    return Protocol(name="CIFAR100", image_shape=(3, 32, 32), n_classes=100, classes_per_task=10, n_tasks=10,
                    class_order=list(range(100)), train=[split(t, n_train) for t in range(10)],
                    val=[Split(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)) for _ in range(10)],
                    test=[split(t, n_test) for t in range(10)], input_normalisation=None)


def cifar_engine(iters: int, device: str, warmup: int, conv_path: Path, protocol: Protocol, **flags) -> Engine:
    cfg = BIRConfig(experiment="CIFAR100", replay="generative", brain_inspired=True, si=True, c=1e8,
                    dg_prop=0.6, iters=iters, device=device, pretrained_conv=str(conv_path), **flags)
    return trained_to_task_2(Engine(cfg, protocol=protocol), warmup)


# ---------------------------------------------------------------------------------------------------------------
# One protocol: build, time, report


def variants_of(base_flags: dict, precisions: list[str], compile_modes: list[str], compile_precisions: list[str],
                terms: dict, with_bir: bool) -> dict[str, Variant]:
    """BI-R+SI in each precision (eager), under each compile mode in `compile_precisions`, and with each term
    (eager, in the first precision)."""
    first = precisions[0]
    variants: dict[str, Variant] = {}
    if with_bir:
        variants["BI-R"] = Variant("BI-R", base_flags | {"si": False}, first)
    for precision in precisions:
        name = "BI-R+SI" if precision == first else f"BI-R+SI {precision}"
        variants[name] = Variant(name, base_flags, precision)
        for mode in compile_modes:
            if mode != "off" and precision in compile_precisions:
                label = f"BI-R+SI {precision} compile={mode}"
                variants[label] = Variant(label, base_flags, precision, mode)
    for term, flags in terms.items():
        variants[f"+ {term}"] = Variant(f"+ {term}", base_flags | flags, first, term=term)
    return variants


def measure_protocol(label: str, variants: dict[str, Variant], build: Callable[[Variant], Engine],
                     spec_of: Callable[[Engine], ModelSpec], batch: int, args, device: torch.device,
                     probes: dict[str, MatmulProbe], budgets: dict[str, float]) -> dict:
    """Time every variant of one protocol; print its lines, each term's against its entry in `budgets`; return its
    JSON record."""
    clock = Clock(device)
    engines = {name: build(variant) for name, variant in variants.items()}
    timings = interleaved(engines, variants, args.steps, args.rounds, probes, clock)
    base_name = next(name for name, v in variants.items() if v.name.startswith("BI-R+SI") and v.term is None)
    base = engines[base_name]
    spec = spec_of(base)
    gemms = step_gemms(spec, batch, batch)
    flops = gemm_flops(gemms)
    best_rates = {p: max(r for n, t in timings.items() if variants[n].precision == p for r in t.rates)
                  for p in {v.precision for v in variants.values()}}
    record: dict = {"batch": batch, "batch_replay": batch, "step_gflop": flops / 1e9, "variants": {}}
    print(f"{label}: {flops / 1e9:.2f} GFLOP per step (batch {batch} + replay {batch})")
    for name, variant in variants.items():
        timing = timings[name]
        ratio = timing.floor_ratio(flops)
        best_floor_ms = 1000 * flops / best_rates[variant.precision]
        entry = {"precision": variant.precision, "compile": variant.compile, "term": variant.term,
                 "ms_per_step": timing.median_ms, "ms_per_step_rounds": timing.ms,
                 "matmul_rate_flops_rounds": timing.rates, "step_over_floor": ratio,
                 "step_over_floor_best_rate": timing.median_ms / best_floor_ms}
        if args.count_ops:
            entry["ops_per_step"] = ops_per_step(engines[name])
        extra = ""
        if variant.term is not None:
            rounds = relative_rounds(timings, name, base_name)
            entry["relative_to_bir_si"], entry["relative_to_bir_si_rounds"] = statistics.median(rounds), rounds
            extra = (f"   x{entry['relative_to_bir_si']:5.2f} of BI-R+SI (rounds "
                     f"{min(rounds):.2f}-{max(rounds):.2f})")
            budget = budgets.get(variant.term)
            if budget is not None:
                entry["budget_relative_to_bir_si"] = budget
                entry["within_budget"] = entry["relative_to_bir_si"] <= budget
                extra += f", budget x{budget:.2f}" + ("" if entry["within_budget"] else ": OVER BUDGET")
        record["variants"][name] = entry
        ops = f"   {entry['ops_per_step']:6.0f} {'kernels' if device.type == 'cuda' else 'aten ops'}/step" \
            if "ops_per_step" in entry else ""
        print(f"    {name:<38} {timing.median_ms:8.2f} ms/step   step/floor {ratio:6.2f} "
              f"(floor {best_floor_ms:.3f} ms at {variant.precision}){extra}{ops}")
    budgeted = {entry["term"]: entry for entry in record["variants"].values() if "within_budget" in entry}
    if budgeted:
        over = [term for term, entry in budgeted.items() if not entry["within_budget"]]
        record["terms_within_budget"] = not over
        print(f"    term costs: {len(budgeted) - len(over)} of {len(budgeted)} within their CPU budget"
              + (f"; over: {', '.join(over)}" if over else ""))
    alone = gemms_alone_report(gemms, device, probes["fp32"] if "fp32" in probes else None)
    if alone is not None:
        record["gemms_alone"] = alone
    del engines
    return record


def gemms_alone_report(gemms: list[tuple[int, int, int]], device: torch.device, probe: MatmulProbe | None,
                       rounds: int = 3) -> dict | None:
    """The step's own fp32 matrix products timed alone, against the floor at the rate probed beside them."""
    if probe is None:
        return None
    flops = gemm_flops(gemms)
    pairs = [(probe.rate(), gemms_alone_ms(gemms, device)) for _ in range(rounds)]
    ms = statistics.median(ms for _, ms in pairs)
    ratio = statistics.median(ms / (1000 * flops / rate) for rate, ms in pairs)
    print(f"    its {len(gemms)} matrix products alone (fp32) {ms:8.2f} ms   step/floor {ratio:5.2f} "
          f"(the matmul library at the model's shapes; the rest of a step is autograd, elementwise ops, optimiser)")
    return {"count": len(gemms), "ms": ms, "step_over_floor": ratio}


def relative_rounds(timings: dict[str, Timing], name: str, base: str) -> list[float]:
    """The step-time ratio of two variants in each round (timed side by side); a term's cost is their median."""
    return [a / b for a, b in zip(timings[name].ms, timings[base].ms, strict=True)]


def term_budgets(device: torch.device, precision: str) -> dict[str, float]:
    """The terms' cost budgets for splitMNIST5k timed in `precision` on this device: CPU_TERM_BUDGETS for fp32 on
    a CPU; none in another precision, nor on a GPU, whose step is launch-bound (a term's cost there is its kernel
    count, not its FLOPs)."""
    return CPU_TERM_BUDGETS if device.type == "cpu" and precision == "fp32" else {}


def device_record(device: torch.device, threads: int) -> dict:
    record = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
              "threads": threads}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record |= {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                   "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30}
    else:
        record["name"] = cpu_model()
    return record


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--steps", type=int, default=10, help="iterations per timed segment")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the variants")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations of task 2 before timing (default 2 on a CPU, 10 on a GPU)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,tf32,bf16 (default fp32,bf16 on a CPU, fp32,tf32,bf16 on a GPU)")
    parser.add_argument("--compile", default="off",
                        help="comma-separated compile modes timed beside eager: off, default, reduce-overhead")
    parser.add_argument("--compile-precisions", default=None,
                        help="the precisions the compile modes are timed in (default: all of --precisions)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count kernels (GPU) or top-level aten ops (CPU; code torch.compile generated is "
                             "not an aten op) per step with the profiler")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-terms", action="store_true")
    parser.add_argument("--terms", default=",".join(TERMS), help=f"comma-separated terms to time ({', '.join(TERMS)})")
    parser.add_argument("--skip-bf16", action="store_true", help="drop bf16 from --precisions")
    parser.add_argument("--slow-bf16", action="store_true",
                        help="time bf16 on a CPU also where torch has no fast bf16 kernels (minutes; else skipped)")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    precisions = parse_list(args.precisions or ("fp32,tf32,bf16" if cuda else "fp32,bf16"), PRECISIONS, "precisions")
    if args.skip_bf16:
        precisions = [p for p in precisions if p != "bf16"] or ["fp32"]
    bf16_check = cpu_bf16_check() if "bf16" in precisions and not cuda else None
    bf16_skipped = bf16_check is not None and not bf16_check["fast"] and not args.slow_bf16
    if bf16_skipped:
        precisions = [p for p in precisions if p != "bf16"] or ["fp32"]
    compile_modes = parse_list(args.compile, COMPILE_MODES, "compile")
    compile_precisions = parse_list(args.compile_precisions, PRECISIONS, "compile-precisions") \
        if args.compile_precisions else precisions
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    terms = {} if args.skip_terms else {t: TERMS[t] for t in parse_list(args.terms, tuple(TERMS), "terms")}
    probes = {p: MatmulProbe(device, p) for p in sorted(set(precisions) | {"fp32"})}
    result: dict = {"device": device_record(device, args.threads),
                    "settings": {"steps": args.steps, "rounds": args.rounds, "warmup": warmup,
                                 "precisions": precisions, "compile": compile_modes,
                                 "compile_precisions": compile_precisions, "terms": list(terms)},
                    "protocols": {}}
    if bf16_check is not None:
        result["bf16_check"] = bf16_check | {"skipped": bf16_skipped}
    print(f"torch {torch.__version__} on {result['device']['name']} ({device.type}), {args.threads} CPU threads, "
          f"{args.rounds} rounds x {args.steps} steps, warm-up {warmup}")
    if bf16_check is not None and not bf16_check["fast"]:
        rates = (f"a {bf16_check['n']} x {bf16_check['n']} product: bf16 {bf16_check['bf16_flops'] / 1e9:.1f} "
                 f"GFLOP/s, fp32 {bf16_check['fp32_flops'] / 1e9:.1f} GFLOP/s")
        print(f"bf16 skipped: {bf16_check['reason']} ({rates}); --slow-bf16 times it anyway" if bf16_skipped
              else f"bf16 timed on torch's slow path (--slow-bf16): {bf16_check['reason']} ({rates})")
    # task 2 never ends inside the timed or profiled steps (its end runs evaluation)
    iters = warmup + args.steps * args.rounds + (OPS_STEPS if args.count_ops else 0) + 2

    def write() -> None:
        result["matmul_rate_flops"] = {p: probe.best for p, probe in probes.items()}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, allow_nan=False))

    print_rates(probes)
    if not args.skip_mnist:
        variants = variants_of({}, precisions, compile_modes, compile_precisions, terms, with_bir=True)
        result["protocols"]["splitMNIST5k"] = measure_protocol(
            "(a) splitMNIST5k", variants,
            lambda v: mnist_engine(iters, args.device, warmup, **v.config_flags()),
            lambda e: e.model.spec, 128, args, device, probes, term_budgets(device, precisions[0]))
        write()

    if not args.skip_cifar:
        protocol = synthetic_cifar()
        with tempfile.TemporaryDirectory() as tmp:
            conv_path = Path(tmp) / "conv.pt"
            torch.save({"state": ConvLayers().state_dict()}, conv_path)
            variants = variants_of({}, precisions, compile_modes, compile_precisions, terms, with_bir=False)
            record = measure_protocol(
                "(b) CIFAR-100", variants,
                lambda v: cifar_engine(iters, args.device, warmup, conv_path, protocol, **v.config_flags()),
                lambda e: e.model.spec, 256, args, device, probes, {})
            record["conv_cache"] = conv_cache_gain(conv_path, device, record)
            result["protocols"]["CIFAR100"] = record
        write()
    write()
    print_rates(probes)
    return result


def conv_cache_gain(conv_path: Path, device: torch.device, record: dict) -> dict:
    """The frozen conv layers on one batch of images, against the cached-feature step."""
    from tune_bir.nets import load_conv_layers

    conv = load_conv_layers(str(conv_path), device)
    images = torch.randn(256, 3, 32, 32, device=device)
    clock = Clock(device)
    with torch.no_grad():
        conv(images)
        conv_ms = 1000 * statistics.median(clock.seconds(lambda: conv(images)) for _ in range(5))
    base_ms = record["variants"]["BI-R+SI"]["ms_per_step"]
    print(f"    conv layers on 256 images: {conv_ms:.2f} ms ({conv_flops(256) / 1e9:.2f} GFLOP); caching the "
          f"frozen features makes a step x{(base_ms + conv_ms) / base_ms:.2f} faster")
    return {"conv_ms": conv_ms, "conv_gflop": conv_flops(256) / 1e9, "speedup": (base_ms + conv_ms) / base_ms}


def print_rates(probes: dict[str, MatmulProbe]) -> None:
    print("matrix-product rate (best probe so far): " + "; ".join(
        f"{p} matmul {probe.best / 1e9:.1f} GFLOP/s" for p, probe in probes.items()))


if __name__ == "__main__":
    main()
