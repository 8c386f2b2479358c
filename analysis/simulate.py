"""Operating characteristics of a sequential design by simulation, and the fixed designs beside it
(docs/analysis.md "Sequential confirmation").

`simulate` draws many confirmations at once on synthetic paired data and runs them through
`analysis.sequential.decide_arrays`, the rule `decide` itself applies, look after look. The configs share
one baseline: config i's difference on seed s is delta_i + sd (sqrt(rho) e_s + sqrt(1 - rho) e_is), so the
differences of two configs correlate by rho (0.5 when the configs and the baseline have equal, independent
per-seed noise; the baseline's noise is in every difference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.sequential import (
    BETTER,
    BETTER_SMALL,
    DIFFERENT,
    EQUIVALENT,
    GO_ON,
    UNDECIDED,
    VERDICTS,
    WORSE,
    WORSE_SMALL,
    SequentialDesign,
    decide_arrays,
)

EQUIVALENT_VERDICTS = frozenset({EQUIVALENT, BETTER_SMALL, WORSE_SMALL})
SIGN = {BETTER: 1, BETTER_SMALL: 1, WORSE: -1, WORSE_SMALL: -1}
_CODE = {v: i for i, v in enumerate(VERDICTS)}


@dataclass
class Simulation:
    """R simulated confirmations of m configs: each config's final verdict and the seeds it used."""

    design: SequentialDesign
    effects: np.ndarray      # (m,) true mean differences, metric units
    sd: float                # sd of one paired difference
    verdict: np.ndarray      # (R, m) index into VERDICTS
    seeds: np.ndarray        # (R, m) paired seeds at which each config stopped (max seeds if never)

    @property
    def n(self) -> int:
        return self.verdict.shape[0]

    def rate(self, verdicts: Sequence[str] | frozenset[str], config: int | None = None) -> float:
        """Fraction of experiments whose config (any config when None: family-wise) got one of `verdicts`."""
        hit = np.isin(self.verdict, [_CODE[v] for v in verdicts])
        return float((hit.any(axis=1) if config is None else hit[:, config]).mean())

    def false_difference(self, config: int | None = None) -> float:
        """Fraction declared different where the true effect is 0, or of the wrong sign where it is not;
        `config` None: family-wise (any config)."""
        sign = np.sign(self.effects)
        wrong = np.zeros(self.verdict.shape, dtype=bool)
        for name, s in SIGN.items():
            here = self.verdict == _CODE[name]
            wrong |= here & ((sign == 0) | (sign == -s))[None, :]
        return float((wrong.any(axis=1) if config is None else wrong[:, config]).mean())

    def stopped_at(self) -> np.ndarray:
        """(R,) seeds the whole confirmation ran: until its last config was decided."""
        return self.seeds.max(axis=1)

    def mc_se(self, rate: float) -> float:
        """Monte-Carlo standard error of a simulated rate."""
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.n)


def simulate(design: SequentialDesign, effects: Sequence[float], sd: float = 1.0, n_sim: int = 10_000,
             seed: int = 0, rho: float = 0.5) -> Simulation:
    """Run `n_sim` confirmations with true mean differences `effects` (one per config, metric units) and
    per-seed sd `sd`, differences correlated by `rho` through the shared baseline; numpy's PCG64 with `seed`."""
    effects = np.asarray(effects, dtype=float)
    m = design.n_configs
    if effects.shape != (m,):
        raise ValueError(f"the design has {m} config(s); give {m} effect(s), got {effects.size}")
    if not sd > 0 or not 0 <= rho < 1:
        raise ValueError(f"need sd > 0 and 0 <= rho < 1, got sd={sd}, rho={rho}")
    rng = np.random.default_rng(seed)
    n_max = design.max_seeds
    shared = rng.standard_normal((n_sim, n_max, 1))
    own = rng.standard_normal((n_sim, n_max, m))
    x = effects + sd * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * own)   # (R, N, m)
    # running sums give every look's mean and sd in one pass (centred on the effect for accuracy)
    centred = x - effects
    s1, s2 = np.cumsum(centred, axis=1), np.cumsum(centred ** 2, axis=1)
    verdict = np.full((n_sim, m), _CODE[UNDECIDED])
    seeds = np.full((n_sim, m), n_max)
    open_ = np.ones((n_sim, m), dtype=bool)
    rejected = np.zeros(n_sim, dtype=int)
    for look, n in enumerate(design.looks, start=1):
        mean_c = s1[:, n - 1] / n
        var = np.maximum(s2[:, n - 1] - n * mean_c ** 2, 0.0) / (n - 1)
        result = decide_arrays(design, look, mean_c + effects, np.sqrt(var), open_, rejected)
        now = open_ & (result.different | result.equivalent)
        positive = (mean_c + effects) > 0
        code = np.where(result.different,
                        np.where(result.equivalent, np.where(positive, _CODE[BETTER_SMALL], _CODE[WORSE_SMALL]),
                                 np.where(positive, _CODE[BETTER], _CODE[WORSE])),
                        _CODE[EQUIVALENT])
        verdict = np.where(now, code, verdict)
        seeds = np.where(now, n, seeds)
        open_ &= ~now
        rejected = result.rejected
        if not open_.any():
            break
    assert not np.isin(verdict, [_CODE[GO_ON]]).any()
    return Simulation(design, effects, float(sd), verdict, seeds)


def fixed_seeds(d_z: float, power: float, alpha: float, n_configs: int) -> float:
    """Paired seeds a fixed design needs for `power` at effect d_z with the two-sided paired t-test at the
    Bonferroni level alpha / m (Holm's first step; statsmodels TTestPower); inf for d_z 0."""
    from statsmodels.stats.power import TTestPower

    if d_z == 0:
        return math.inf
    n = TTestPower().solve_power(effect_size=abs(d_z), alpha=alpha / n_configs, power=power,
                                 alternative="two-sided")
    return float(math.ceil(n))


__all__ = ["DIFFERENT", "EQUIVALENT_VERDICTS", "Simulation", "fixed_seeds", "simulate"]
