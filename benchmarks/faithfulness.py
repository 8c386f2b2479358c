"""Final acc_avg of the reference methods on splitMNIST5k, class-IL, over seeds (issue: faithfulness).

The original research code, run on exactly this split with 500 iterations per task and batch 128,
reaches 0.85-0.87 with BI-R (seeds 1-3) and about 0.20 without replay. This prints mean +- sd and
the per-task accuracies after the last task for each method, so the two can be compared.

  python benchmarks/faithfulness.py [--iters 500] [--seeds 1 2 3] [--threads 1] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tune_bir.config import PRECISIONS, BIRConfig
from tune_bir.engine import Engine

METHODS = {
    "none": dict(replay="none"),
    "generative": dict(replay="generative"),
    "brain-inspired": dict(replay="generative", brain_inspired=True),
    "brain-inspired+si(c=0.1)": dict(replay="generative", brain_inspired=True, si=True, c=0.1),
}


def final_accuracies(flags: dict, seed: int, iters: int, batch: int, precision: str) -> list[float]:
    engine = Engine(BIRConfig(experiment="splitMNIST5k", scenario="class", iters=iters, batch=batch, seed=seed,
                              device="cpu", precision=precision, **flags))
    while not engine.done:
        engine.train_task()
    return engine.acc_history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.methods:
        start = time.perf_counter()
        rows = [final_accuracies(METHODS[name], seed, args.iters, args.batch, args.precision) for seed in args.seeds]
        finals = [sum(r) / len(r) for r in rows]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        per_task = [statistics.mean(col) for col in zip(*rows, strict=True)]
        results[name] = {"acc_avg": finals, "per_task_mean": per_task}
        label = f"{name} [{args.precision}]"
        print(f"{label:<33} acc_avg {statistics.mean(finals):.4f} +- {sd:.4f}   seeds {args.seeds}: "
              f"{' '.join(f'{a:.4f}' for a in finals)}   per task (mean over seeds): "
              f"{' '.join(f'{a:.3f}' for a in per_task)}   [{time.perf_counter() - start:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
