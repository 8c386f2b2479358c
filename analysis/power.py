"""`python -m analysis power`: how many seeds a confirmation needs (docs/analysis.md "Planning").

From a pilot confirmation's paired differences (its folder: results.csv or confirm_results.csv, one row per
(config, seed)), or from a paired sd given by hand, it prints for each effect (in metric units and as d_z):

- the paired seeds a fixed design needs for 80 % and 90 % power with the paired t-test at alpha / m
  (Bonferroni, Holm's first step; statsmodels TTestPower);
- under the sequential design (analysis.sequential), the average and 90th-percentile seeds the
  confirmation runs until every config is decided, and how often each verdict comes out (simulated with a
  fixed seed, all m configs at the effect, differences correlated 0.5 through the shared baseline).

Examples:
  python -m analysis power --pilot docs/results/repulsion --configs 2 --margin 0.005 --first-seed 100
  python -m analysis power --pilot docs/results/repulsion:top2 docs/results/contrastive:top2 --first-seed 100
  python -m analysis power --sd 0.011 --effect 0.005 0.01 --configs 2 --margin 0.005
  python -m analysis power --sd 1 --dz 0 0.3 0.5 0.8 --margin 0.5 --markdown

A sweep folder literally named `power` is analysed as `python -m analysis ./power`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tune_bir.cli import OneLineArgumentParser
from tune_bir.errors import ConfigError

PROG = "python -m analysis power"
PILOT_FILES = ("results.csv", "confirm_results.csv")   # a confirm folder; docs/results/<family>/ keeps it renamed


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number > 0 ({what}), got {text!r}")
        return value
    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> OneLineArgumentParser:
    from analysis.sequential import SPENDING

    parser = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Seeds a confirmation needs: fixed designs at 80/90 %% power and the sequential design, "
                    "from a pilot's paired sd.",
        epilog="Examples:" + __doc__.split("Examples:")[1])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pilot", metavar="FOLDER[:LABEL,...]", nargs="+",
                        help="finished confirmation folders (results.csv or confirm_results.csv), each with the "
                             "labels of its configs to use (default: all): their paired sd, pooled")
    source.add_argument("--sd", type=_positive(float, "the sd of one paired difference"), metavar="SD",
                        help="the sd of one paired difference (config - baseline), in metric units")
    parser.add_argument("--effect", type=_number, nargs="+", metavar="E",
                        help="true mean differences to plan for, metric units (default with --pilot: each "
                             "pilot config's own mean difference)")
    parser.add_argument("--dz", type=_number, nargs="+", metavar="DZ", help="the same as d_z = effect / sd")
    parser.add_argument("--metric", default="acc_avg", help="the pilot's metric column (default: acc_avg)")
    parser.add_argument("--configs", type=_positive(int, "configs against the baseline"), metavar="M",
                        help="configs the plan compares with the baseline (default: the pilot's, else 1)")
    parser.add_argument("--alpha", type=_positive(float, "family-wise two-sided alpha"), default=0.05)
    parser.add_argument("--margin", type=_positive(float, "equivalence margin D, metric units"), default=0.005,
                        metavar="D", help="equivalence margin D, metric units (default 0.005)")
    parser.add_argument("--max-seeds", type=_positive(int, "paired seeds at most"), default=48, metavar="N")
    parser.add_argument("--looks", type=_positive(int, "looks"), default=6, metavar="K")
    parser.add_argument("--spending", choices=sorted(SPENDING), default="obrien-fleming")
    parser.add_argument("--sims", type=_positive(int, "simulated confirmations per effect"), default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="the simulation's seed (default 0)")
    parser.add_argument("--first-seed", type=_positive(int, "the plan's first seed"), metavar="S",
                        help="the plan's first seed: compare its seeds' class orders with the pilot's")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return parser


@dataclass
class Pilot:
    """What a pilot confirmation tells a plan: per-config paired differences and where they came from."""

    folder: str
    diffs: dict[str, np.ndarray]
    seeds: list[int]
    experiment: str | None

    def pooled_sd(self) -> tuple[float, int]:
        """The paired sd pooled over the pilot's configs (each config's variance weighted by its df), and its df."""
        usable = [d for d in self.diffs.values() if len(d) >= 2]
        df = sum(len(d) - 1 for d in usable)
        if df == 0:
            raise ConfigError(f"pilot {self.folder} has fewer than 2 paired seeds per config: no paired sd")
        return math.sqrt(sum((len(d) - 1) * d.var(ddof=1) for d in usable) / df), df


def read_pilots(specs: list[str], metric: str = "acc_avg") -> Pilot:
    """Several pilots as one: FOLDER or FOLDER:LABEL,LABEL (those configs only); configs named FOLDER-name/label."""
    if len(specs) == 1 and ":" not in specs[0]:
        return read_pilot(specs[0], metric)
    diffs, seeds, experiments = {}, set(), set()
    for spec in specs:
        folder, labels = spec, None
        if ":" in spec and not Path(spec).is_dir():
            folder, _, names = spec.rpartition(":")
            labels = [n for n in names.split(",") if n]
        pilot = read_pilot(folder, metric)
        unknown = sorted(set(labels or []) - set(pilot.diffs))
        if unknown:
            raise ConfigError(f"--pilot {spec}: no config {unknown[0]!r} in {folder} (it has {sorted(pilot.diffs)})")
        for label in labels or pilot.diffs:
            diffs[f"{Path(folder).name}/{label}"] = pilot.diffs[label]
        seeds |= set(pilot.seeds)
        experiments.add(pilot.experiment)
    experiment = experiments.pop() if len(experiments) == 1 else None
    return Pilot(" + ".join(specs), diffs, sorted(seeds), experiment)


def read_pilot(folder: str, metric: str = "acc_avg") -> Pilot:
    """The pilot's paired differences; ConfigError (one line) when the folder is not a finished confirmation."""
    import pandas as pd

    from analysis.sequential import paired_differences

    path = Path(folder)
    found = [path / name for name in PILOT_FILES if (path / name).is_file()]
    if not path.is_dir() or not found:
        raise ConfigError(f"--pilot {folder}: not a confirmation folder (no {' or '.join(PILOT_FILES)}); give "
                          "SWEEP/confirm or a folder of docs/results/")
    try:
        results = pd.read_csv(found[0])
        diffs = paired_differences(results, metric=metric)
    except (ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"--pilot {found[0]}: {str(err).splitlines()[0]}") from err
    if not diffs:
        raise ConfigError(f"--pilot {found[0]}: only the baseline, no config to compare")
    seeds = sorted(int(s) for s in results["seed"].unique())
    return Pilot(str(path), diffs, seeds, _experiment(path))


def _experiment(path: Path) -> str | None:
    """The experiment of the pilot's sweep (sweep.json beside the folder or one up), None when unknown."""
    for candidate in (path / "sweep.json", path.parent / "sweep.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())["resolved_base_config"]["experiment"]
            except (KeyError, TypeError, json.JSONDecodeError):
                return None
    return None


def class_orders(experiment: str, seeds: list[int]) -> dict[tuple[int, ...], list[int]]:
    """The seeds grouped by their class order (docs/algorithm.md "Class order")."""
    from tune_bir.data import label_permutation

    groups: dict[tuple[int, ...], list[int]] = {}
    for seed in seeds:
        groups.setdefault(tuple(int(c) for c in label_permutation(experiment, seed)), []).append(seed)
    return groups


def _seed_ranges(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    parts, start = [], seeds[0]
    for a, b in zip(seeds, seeds[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def order_warning(experiment: str, pilot_seeds: list[int], plan_seeds: list[int]) -> str | None:
    """A warning when the pilot's seeds cover other class orders than the plan's, None when they agree."""
    pilot, plan = class_orders(experiment, pilot_seeds), class_orders(experiment, plan_seeds)
    if set(pilot) == set(plan):
        return None
    identity = tuple(range(len(next(iter(pilot)))))

    def describe(groups: dict[tuple[int, ...], list[int]], seeds: list[int]) -> str:
        if set(groups) == {identity}:
            return "all the original class order"
        return f"{len(groups)} class order(s) over {len(seeds)} seeds" + (
            " (the original order among them)" if identity in groups else "")

    return (f"the pilot's seeds ({_seed_ranges(pilot_seeds)}) have {describe(pilot, pilot_seeds)}, the plan's "
            f"({_seed_ranges(plan_seeds)}) {describe(plan, plan_seeds)} ({experiment}; docs/algorithm.md \"Class "
            "order\"): the pilot's sd and effect were measured on other tasks' splits and may not carry over")


def plan_table(sd: float, effects: list[float], n_configs: int, alpha: float, margin: float, max_seeds: int,
               n_looks: int, spending: str, n_sim: int, seed: int) -> list[dict[str, Any]]:
    """One row per effect: fixed-design seeds at 80/90 % power and the sequential design's simulated seeds."""
    from analysis.sequential import SequentialDesign
    from analysis.simulate import EQUIVALENT_VERDICTS, fixed_seeds, simulate

    design = SequentialDesign.even(alpha, margin, max_seeds, n_looks, n_configs, spending)
    rows = []
    for i, effect in enumerate(effects):
        d_z = effect / sd
        sim = simulate(design, [effect] * n_configs, sd=sd, n_sim=n_sim, seed=seed + i)
        stop = sim.stopped_at()
        rows.append({
            "effect": effect, "d_z": d_z,
            "fixed_80": fixed_seeds(d_z, 0.8, alpha, n_configs), "fixed_90": fixed_seeds(d_z, 0.9, alpha, n_configs),
            "seq_mean": float(stop.mean()), "seq_p90": float(np.percentile(stop, 90, method="inverted_cdf")),
            "p_different": sim.rate({"better", "worse", "better, by less than D", "worse, by less than D"}, 0),
            "p_equivalent": sim.rate(EQUIVALENT_VERDICTS, 0), "p_undecided": sim.rate({"undecided"}, 0)})
    return rows


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    """The plan table as aligned text or markdown."""
    header = ["effect", "d_z", "fixed 80 %", "fixed 90 %", "sequential mean", "sequential 90th pct",
              "P(different)", "P(equivalent)", "P(undecided)"]

    def seeds(n: float) -> str:
        return "never" if math.isinf(n) else f"{n:.0f}"

    body = [[f"{r['effect']:+.4g}", f"{r['d_z']:.2f}", seeds(r["fixed_80"]), seeds(r["fixed_90"]),
             f"{r['seq_mean']:.1f}", f"{r['seq_p90']:.0f}", f"{r['p_different']:.3f}", f"{r['p_equivalent']:.3f}",
             f"{r['p_undecided']:.3f}"] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
                     for line in [header, *body])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pilot is None and args.sd is None:
        raise ConfigError("give --pilot FOLDER (a finished confirmation) or --sd SD (the paired sd); a sweep "
                          "folder named power is analysed as: python -m analysis ./power")
    if args.effect and args.dz:
        raise ConfigError("give the effects either in metric units (--effect) or as d_z (--dz), not both")
    if args.looks > args.max_seeds:
        raise ConfigError(f"--looks {args.looks} is above --max-seeds {args.max_seeds}")
    if args.max_seeds // args.looks < 2:
        raise ConfigError(f"--max-seeds {args.max_seeds} in {args.looks} looks leaves fewer than 2 seeds at the "
                          "first look (the paired sd needs 2)")
    if args.alpha >= 0.5:
        raise ConfigError(f"--alpha must be below 0.5, got {args.alpha}")
    warnings, lines = [], []
    pilot = read_pilots(args.pilot, args.metric) if args.pilot else None
    if pilot is not None:
        sd, df = pilot.pooled_sd()
        n_configs = args.configs or len(pilot.diffs)
        lines.append(f"pilot {pilot.folder}: {len(pilot.seeds)} seeds ({_seed_ranges(pilot.seeds)}), "
                     f"{len(pilot.diffs)} config(s) against the baseline, {args.metric}")
        for config, d in pilot.diffs.items():
            sd_c = d.std(ddof=1) if len(d) >= 2 else math.nan
            lines.append(f"  {config}: mean difference {d.mean():+.4g} over {len(d)} paired seeds, sd {sd_c:.4g}, "
                         f"d_z {d.mean() / sd_c:+.2f}")
        from scipy.stats import chi2

        upper = sd * math.sqrt(df / chi2.ppf(0.2, df))   # the sd itself is uncertain with a few seeds
        lines.append(f"  paired sd pooled over the configs: {sd:.4g} ({df} df; 80 % upper confidence limit "
                     f"{upper:.4g}: --sd {upper:.3g} plans for it)")
        warnings.append("a pilot's effect is biased upward when its configs were chosen on the same seeds (the "
                        "winner's curse: configs picked because they scored best on these seeds look better there "
                        "than they are); plan for a smaller effect than the "
                        "pilot's, and confirm on fresh seeds")
        effects = args.effect or ([d * sd for d in args.dz] if args.dz else
                                  [float(d.mean()) for d in pilot.diffs.values()])
        if args.first_seed is not None:
            if pilot.experiment is None:
                warnings.append(f"the pilot's experiment is unknown (no sweep.json beside {pilot.folder}): class "
                                "orders not compared")
            else:
                plan_seeds = list(range(args.first_seed, args.first_seed + args.max_seeds))
                warning = order_warning(pilot.experiment, pilot.seeds, plan_seeds)
                if warning:
                    warnings.append(warning)
    else:
        sd, n_configs = args.sd, args.configs or 1
        if not args.effect and not args.dz:
            raise ConfigError("with --sd, give the effects to plan for: --effect E ... or --dz DZ ...")
        effects = args.effect or [d * sd for d in args.dz]
    rows = plan_table(sd, effects, n_configs, args.alpha, args.margin, args.max_seeds, args.looks, args.spending,
                      args.sims, args.seed)
    from analysis.sequential import SequentialDesign

    design = SequentialDesign.even(args.alpha, args.margin, args.max_seeds, args.looks, n_configs, args.spending)
    lines.append(f"design: {design.method()}; looks at {', '.join(map(str, design.looks))} paired seeds; "
                 f"margin D = {args.margin:g} (d_z {args.margin / sd:.2f}); paired sd {sd:.4g}")
    lines.append(f"fixed: paired t-test at alpha/{n_configs} = {args.alpha / n_configs:.4g} (statsmodels TTestPower); "
                 f"sequential: {args.sims} simulated confirmations per effect (seed {args.seed}), all {n_configs} "
                 "config(s) at the effect, seeds = until the last config is decided; P(...) for one config")
    print("\n".join(lines))
    print(format_table(rows, args.markdown))
    for warning in warnings:
        print(f"warning: {warning}")
    return 0
