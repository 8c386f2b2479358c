"""Speed of one training step against this machine's FLOP floor, measured in one run
(docs/architecture.md "Tests and benchmarks").

Prints, for (a) splitMNIST5k BI-R (and BI-R+SI) and (b) CIFAR-100 BI-R+SI on generated
CIFAR-shaped data: ms per step while replay is active, this machine's fp32 matmul FLOP/s, the
step's FLOP count from the layer sizes, and step time / FLOP floor; the same with `--precision
bf16` (mixed precision; its ratio is still to the fp32 floor, and the bf16 matmul rate is printed
beside it); the step's own matrix products timed alone against the same floor (what the matmul
library reaches at the model's shapes, the part of step/floor no change to the step can remove);
the gain from caching the frozen conv layers' features; and the cost of each exaggeration term
over plain BI-R+SI. Ratios only, no asserts.

This machine's speed drifts by tens of per cent within a minute (shared cores), so each timed
segment is paired with a matmul-rate probe taken just before it: step/floor is the median over
segments of (segment's ms per step) / (floor at the rate probed beside it). The best rate of the
run, the one a quiet machine reaches, is printed too, with the step time against it.

  python benchmarks/engine_speed.py [--threads N] [--steps N] [--skip-cifar] [--skip-terms] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tune_bir.config import BIRConfig
from tune_bir.data import Protocol, Split
from tune_bir.engine import Engine
from tune_bir.model import ModelSpec
from tune_bir.nets import ConvLayers

TERMS = {
    "repulsion": dict(repulsion=True, lamda_rep=1e3),
    "recon_repulsion": dict(recon_repulsion=True, lamda_recon_rep=1e-2),
    "recon_attraction": dict(recon_attraction=True, lamda_recon_atr=1e-2),
    "contrastive": dict(contrastive=True, c_lr=1e-5),
}


def matmul_flops(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`reps` matmul throughput (FLOP/s) on this machine, now."""
    return MatmulProbe(n, dtype).rate(reps)


class MatmulProbe:
    """A large n x n matmul whose best-of-`reps` throughput gives this machine's FLOP/s at the moment."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32):
        self.n = n
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.a @ self.b   # warm-up: thread pool, packing buffers

    def rate(self, reps: int = 2) -> float:
        best = min(_timed(lambda: self.a @ self.b) for _ in range(reps))
        return 2 * self.n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def gemms_alone_ms(gemms: list[tuple[int, int, int]], reps: int = 5) -> float:
    """ms that the step's own matrix products take, each timed alone (best of `reps`) and summed.

    Against the floor, this splits step/floor into what the matmul library reaches at the model's
    shapes and what the rest of the step (autograd, elementwise ops, optimiser) adds.
    """
    total = 0.0
    for m, k, n in gemms:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        total += min(_timed(lambda a=a, b=b: a @ b) for _ in range(reps))
    return 1000 * total

def conv_flops(n_images: int, size: int = 32) -> float:
    """Forward FLOPs of the frozen conv layers on n images."""
    total, hw = 0, size
    for i, (c_in, c_out) in enumerate(zip(ConvLayers.channels[:-1], ConvLayers.channels[1:], strict=True)):
        hw = hw if i == 0 else (hw + 1) // 2
        total += 2 * 9 * c_in * c_out * hw * hw
    return float(total * n_images)


def timed_segment(engine: Engine, steps: int) -> float:
    """Median ms per iteration over `steps` iterations of the current task (replay active after task 1)."""
    stamps: list[float] = []
    engine.train_segment(steps, on_iteration=lambda: stamps.append(time.perf_counter()))
    diffs = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    return 1000 * statistics.median(diffs)


@dataclass
class Timing:
    """ms per step of one variant's segments, each with the fp32 matmul rate probed just before it."""

    ms: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def floor_ratio(self, flops: float) -> float:
        """Median over segments of step time / FLOP floor at the rate measured beside that segment."""
        return statistics.median(ms / (1000 * flops / rate) for ms, rate in zip(self.ms, self.rates, strict=True))


def interleaved(engines: dict[str, Engine], steps: int, rounds: int) -> tuple[dict[str, Timing], float]:
    """Each engine's segment timings, measured round-robin, and the best fp32 matmul rate seen in the run.

    This machine is noisy: timing every variant in each round, each segment right after a matmul
    probe, keeps both the ratios between variants and the ratio to the floor fair when the load changes.
    """
    probe = MatmulProbe()
    timings = {name: Timing() for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            timings[name].rates.append(probe.rate())
            timings[name].ms.append(timed_segment(engine, steps))
    best_rate = max(rate for timing in timings.values() for rate in timing.rates)
    return timings, best_rate


def mnist_engine(steps: int, **flags) -> Engine:
    cfg = BIRConfig(experiment="splitMNIST5k", replay="generative", brain_inspired=True,
                    iters=steps + 2, device="cpu", **({"si": True, "c": 0.1} | flags))
    engine = Engine(cfg)
    engine.train_segment(None)  # task 1 (no replay) done; task 2 replays
    return engine


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


def cifar_engine(steps: int, conv_path: Path, protocol: Protocol, **flags) -> Engine:
    cfg = BIRConfig(experiment="CIFAR100", replay="generative", brain_inspired=True, si=True, c=1e8,
                    dg_prop=0.6, iters=steps + 2, device="cpu", pretrained_conv=str(conv_path), **flags)
    engine = Engine(cfg, protocol=protocol)
    engine.train_segment(None)
    return engine


def report(name: str, timing: Timing, flops: float, best_rate: float) -> None:
    best_floor_ms = 1000 * flops / best_rate
    print(f"{name:<34} {timing.median_ms:8.1f} ms/step   {flops / 1e9:6.2f} GFLOP   "
          f"step/floor {timing.floor_ratio(flops):5.2f} (floor at the rate beside each segment); "
          f"{timing.median_ms / best_floor_ms:5.2f} against the run's best rate (floor {best_floor_ms:.1f} ms)")


def report_gemms_alone(gemms: list[tuple[int, int, int]], rounds: int = 3) -> None:
    """The step's own matrix products timed alone, against the floor at the rate probed beside them."""
    probe, flops = MatmulProbe(), gemm_flops(gemms)
    pairs = [(probe.rate(), gemms_alone_ms(gemms)) for _ in range(rounds)]
    ms = statistics.median(ms for _, ms in pairs)
    ratio = statistics.median(ms / (1000 * flops / rate) for rate, ms in pairs)
    print(f"    its {len(gemms)} matrix products alone {ms:8.1f} ms        step/floor {ratio:5.2f} "
          f"(the matmul library at the model's shapes; the rest of a step is autograd, elementwise ops, optimiser)")


def relative(timings: dict[str, Timing], name: str, base: str) -> float:
    """Median over rounds of the step-time ratio of two variants timed side by side."""
    pairs = zip(timings[name].ms, timings[base].ms, strict=True)
    return statistics.median(a / b for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="iterations per timed segment")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the variants")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-terms", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = args.steps * args.rounds + 2
    precisions = {} if args.skip_bf16 else {"BI-R+SI bf16": {"precision": "bf16"}}
    terms = {} if args.skip_terms else TERMS
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps")

    mnist = {"BI-R": {"si": False}, "BI-R+SI": {}} | precisions | terms
    engines = {name: mnist_engine(budget, **flags) for name, flags in mnist.items()}
    ms, flop_rate = interleaved(engines, args.steps, args.rounds)
    flops = step_flops(engines["BI-R"].model.spec, 128, 128)
    print_rates(flop_rate, precisions)
    report("(a) splitMNIST5k BI-R", ms["BI-R"], flops, flop_rate)
    report_gemms_alone(step_gemms(engines["BI-R"].model.spec, 128, 128))
    report("    splitMNIST5k BI-R+SI", ms["BI-R+SI"], flops, flop_rate)
    for name in precisions:
        report(f"    splitMNIST5k {name}", ms[name], flops, flop_rate)
    print_terms(ms, terms)
    del engines

    if args.skip_cifar:
        return
    protocol = synthetic_cifar()
    with tempfile.TemporaryDirectory() as tmp:
        conv_path = Path(tmp) / "conv.pt"
        torch.save({"state": ConvLayers().state_dict()}, conv_path)
        steps, rounds = max(args.steps // 2, 3), args.rounds
        cifar = {"BI-R+SI": {}} | precisions | terms
        engines = {name: cifar_engine(steps * rounds + 2, conv_path, protocol, **flags)
                   for name, flags in cifar.items()}
        ms, flop_rate = interleaved(engines, steps, rounds)
        base, base_ms = engines["BI-R+SI"], ms["BI-R+SI"].median_ms
        flops = step_flops(base.model.spec, 256, 256)
        print_rates(flop_rate, precisions)
        report("(b) CIFAR-100 BI-R+SI", ms["BI-R+SI"], flops, flop_rate)
        report_gemms_alone(step_gemms(base.model.spec, 256, 256))
        for name in precisions:
            report(f"    CIFAR-100 {name}", ms[name], flops, flop_rate)
        images = torch.randn(256, 3, 32, 32)
        with torch.no_grad():
            base.conv(images)
            conv_ms = 1000 * statistics.median(_timed(lambda: base.conv(images)) for _ in range(5))
        print(f"    conv layers on 256 images: {conv_ms:.1f} ms ({conv_flops(256) / 1e9:.2f} GFLOP); caching "
              f"the frozen features makes a step x{(base_ms + conv_ms) / base_ms:.2f} faster")
        print_terms(ms, terms)


def print_rates(fp32_rate: float, precisions: dict) -> None:
    line = f"fp32 matmul {fp32_rate / 1e9:.1f} GFLOP/s (best probe of the run)"
    if precisions:
        line += f"; bf16 matmul {matmul_flops(dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s"
    print(line)


def print_terms(ms: dict[str, Timing], terms: dict) -> None:
    for name in terms:
        print(f"    + {name:<28} {ms[name].median_ms:8.1f} ms/step   x{relative(ms, name, 'BI-R+SI'):5.2f} of BI-R+SI")


if __name__ == "__main__":
    main()
