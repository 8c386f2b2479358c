"""Long-run error rates of the sequential design (docs/analysis.md "Sequential confirmation"): with no true
effect, the family-wise rate of false better/worse claims for each spending function and family size,
with the equivalence stops and (one config) without them, over many more simulated confirmations than CI
runs, to see how far the t boundaries by nominal level stray from alpha. Issue #19's plan: alpha 0.05, at
most 48 seeds, a look every 8, D = 0.5 sd, the configs' differences correlated 0.5 through the shared
baseline. Prints a markdown table; numpy's PCG64 draws the same numbers on every CPU.

    .venv/bin/python benchmarks/sequential_errors.py                  # 10 x 20,000 per row (~20 s)
    .venv/bin/python benchmarks/sequential_errors.py --batches 2 --per-batch 2000
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from analysis.sequential import SPENDING, SequentialDesign
from analysis.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--per-batch", type=int, default=20_000)
    parser.add_argument("--configs", default="1,2", help="family sizes m, comma-separated")
    args = parser.parse_args()
    print("| spending | m | equivalence stops | false better/worse, family-wise | MC standard error | confirmations |")
    print("|---|---|---|---|---|---|")
    rows = [(spending, int(m), True) for spending in sorted(SPENDING) for m in args.configs.split(",")]
    rows += [(spending, 1, False) for spending in sorted(SPENDING)]   # a margin no interval ever fits inside
    for spending, m, equivalence in rows:
        design = SequentialDesign.even(0.05, 0.5 if equivalence else 1e-9, max_seeds=48, n_looks=6, n_configs=m,
                                       spending=spending)
        rates = [simulate(design, [0.0] * m, n_sim=args.per_batch, seed=100 + b).false_difference()
                 for b in range(args.batches)]
        n = args.batches * args.per_batch
        rate = float(np.mean(rates))
        print(f"| {spending} | {m} | {'D = 0.5 sd' if equivalence else 'none'} | {rate:.4f} | "
              f"{math.sqrt(rate * (1 - rate) / n):.4f} | {n:,} |")

if __name__ == "__main__":
    main()
