"""Group-sequential confirmation: boundaries, verdicts and repeated confidence intervals (docs/analysis.md
"Sequential confirmation").

Each config is compared with one shared baseline on paired seeds (difference = config - baseline). After
each look (a batch of seeds) every config still going on gets a verdict:

- the difference test: a two-sided group-sequential paired t-test whose boundaries come from a Lan-DeMets
  alpha-spending function (O'Brien-Fleming-type by default, Pocock-type available), computed on the
  Gaussian score process by numerical integration and carried over to the t-test with estimated variance
  through their nominal levels (the t quantile with n - 1 df at the z-boundary's nominal level);
- over the configs, Holm's step-down in its group-sequential form (Ye et al. 2013; Maurer & Bretz 2013):
  each config starts at alpha / m; when one is declared better or worse its share passes to the others,
  whose boundaries at the same look are recomputed at the larger level;
- equivalence within +-D: two one-sided tests at the level the config's share spends at that look, i.e.
  the (1 - 2 alpha/m) repeated confidence interval inside (-D, D) (Jennison & Turnbull 2000, ch. 9;
  Schuirmann 1987); Bonferroni's share alpha/m, as Holm's passing would not hold alpha for these claims.

A decided config stops. `decide` is the only decision rule; `decide_arrays` is the same rule on many
simulated experiments at once (analysis.simulate), so the simulation proves the code that decides.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

BETTER, WORSE, EQUIVALENT = "better", "worse", "equivalent"
BETTER_SMALL, WORSE_SMALL = "better, by less than D", "worse, by less than D"
GO_ON, UNDECIDED = "go on", "undecided"
VERDICTS = (BETTER, WORSE, EQUIVALENT, BETTER_SMALL, WORSE_SMALL, GO_ON, UNDECIDED)
DIFFERENT = frozenset({BETTER, WORSE, BETTER_SMALL, WORSE_SMALL})   # the no-difference null rejected
DECIDED = DIFFERENT | {EQUIVALENT}                                  # the config stops
COMPLETED = "completed"
_NODES = 160   # Gauss-Legendre nodes per look: published boundaries to 1e-4 (tests/test_sequential.py)


def _spend_obrien_fleming(alpha: float, t: np.ndarray) -> np.ndarray:
    """Lan & DeMets (1983)'s O'Brien-Fleming-type spending for a two-sided test, 2 - 2 Phi(z_{1-alpha/2} / sqrt(t))
    (Jennison & Turnbull 2000, ch. 7)."""
    from scipy.stats import norm

    t = np.asarray(t, dtype=float)
    return np.where(t > 0, 2 * norm.sf(norm.isf(alpha / 2) / np.sqrt(np.maximum(t, 1e-300))), 0.0)


def _spend_pocock(alpha: float, t: np.ndarray) -> np.ndarray:
    """Lan & DeMets (1983)'s Pocock-type spending: alpha log(1 + (e - 1) t)."""
    return alpha * np.log1p((math.e - 1) * np.asarray(t, dtype=float))


SPENDING: dict[str, Callable[[float, np.ndarray], np.ndarray]] = {
    "obrien-fleming": _spend_obrien_fleming, "pocock": _spend_pocock}


def spent(spending: str, alpha: float, fractions: Sequence[float]) -> np.ndarray:
    """The cumulative two-sided alpha spent by information fractions `fractions` (each in (0, 1])."""
    if spending not in SPENDING:
        raise ValueError(f"unknown spending function {spending!r}; choose one of {sorted(SPENDING)}")
    return SPENDING[spending](alpha, np.asarray(fractions, dtype=float))


class _ScoreProcess:
    """The standardised statistics Z_1..Z_K of a Gaussian score process with information fractions t_k
    (corr(Z_j, Z_k) = sqrt(t_j / t_k)), stopped when |Z_k| >= c_k: the sub-density of Z_k on the
    continuation region, carried from look to look by Gauss-Legendre quadrature (Jennison & Turnbull 2000,
    ch. 19)."""

    def __init__(self, fractions: Sequence[float]):
        self.t = np.asarray(fractions, dtype=float)
        self.k = 0
        self.z = np.zeros(0)          # quadrature nodes of the last continuation region
        self.mass = np.zeros(0)       # sub-density x weight at the nodes
        self.nodes, self.weights = np.polynomial.legendre.leggauss(_NODES)

    def exit_probability(self, c: float) -> float:
        """P(still going on before look k+1 and |Z_{k+1}| >= c)."""
        from scipy.stats import norm

        if self.k == 0:
            return float(2 * norm.sf(c))
        t0, t1 = self.t[self.k - 1], self.t[self.k]
        scale = math.sqrt(t1 - t0)
        hi = (c * math.sqrt(t1) - self.z * math.sqrt(t0)) / scale
        lo = (-c * math.sqrt(t1) - self.z * math.sqrt(t0)) / scale
        return float(np.sum(self.mass * (norm.sf(hi) + norm.cdf(lo))))

    def advance(self, c: float) -> None:
        """Move to the next look with boundary c: the sub-density of Z on (-c, c) at its nodes."""
        from scipy.stats import norm

        c = min(c, 12.0)   # beyond 12 sd the density is below 1e-31: the same region in floating point
        z_new = c * self.nodes
        w_new = c * self.weights
        if self.k == 0:
            density = norm.pdf(z_new)
        else:
            t0, t1 = self.t[self.k - 1], self.t[self.k]
            scale = math.sqrt(t1 - t0)
            kernel = norm.pdf((z_new[:, None] * math.sqrt(t1) - self.z[None, :] * math.sqrt(t0)) / scale)
            density = kernel @ self.mass * (math.sqrt(t1) / scale)
        self.z, self.mass = z_new, density * w_new
        self.k += 1


def exit_probabilities(bounds: Sequence[float], fractions: Sequence[float]) -> np.ndarray:
    """Under no effect, P(first |Z_k| >= c_k at look k) for two-sided boundaries `bounds` (z scale)."""
    process = _ScoreProcess(fractions)
    out = []
    for c in bounds:
        out.append(process.exit_probability(float(c)))
        process.advance(float(c))
    return np.asarray(out)


@functools.lru_cache(maxsize=256)
def z_boundaries(alpha: float, fractions: tuple[float, ...], spending: str = "obrien-fleming") -> tuple[float, ...]:
    """Two-sided z boundaries c_1..c_K that spend `spending`'s alpha at the information fractions."""
    from scipy.optimize import brentq

    cumulative = spent(spending, alpha, fractions)
    increments = np.diff(np.concatenate([[0.0], cumulative]))
    process = _ScoreProcess(fractions)
    bounds = []
    for target in increments:
        if target <= 1e-15:   # nothing to spend at this look (numerically): the boundary is out of reach
            c = math.inf
        else:
            c = brentq(lambda x, goal=target: process.exit_probability(x) - goal, 1e-6, 40.0, xtol=1e-10)
        bounds.append(float(c))
        process.advance(c)
    return tuple(bounds)


@functools.lru_cache(maxsize=256)
def _t_critical(alpha: float, looks: tuple[int, ...], spending: str, look: int) -> tuple[float, float]:
    """(|t| boundary of the two-sided test at level alpha, the same at 2 alpha for the RCI of TOST) at
    `look`: each z-boundary's nominal level as a t quantile with n - 1 df."""
    from scipy.stats import norm, t

    fractions = tuple(n / looks[-1] for n in looks)
    df = looks[look - 1] - 1
    out = []
    for level in (alpha, 2 * alpha):
        c = z_boundaries(level, fractions, spending)[look - 1]
        out.append(math.inf if math.isinf(c) else float(t.isf(norm.sf(c), df)))
    return out[0], out[1]


def nominal_level(alpha: float, looks: Sequence[int], spending: str, look: int) -> float:
    """The two-sided nominal p-value a paired t-test must reach at `look` to reject at family share alpha."""
    from scipy.stats import t

    crit, _ = _t_critical(float(alpha), tuple(looks), spending, look)
    return 0.0 if math.isinf(crit) else float(2 * t.sf(crit, looks[look - 1] - 1))


@dataclass(frozen=True)
class SequentialDesign:
    """A pre-registered group-sequential comparison of `n_configs` configs with one shared baseline."""

    alpha: float                      # family-wise, two-sided
    margin: float                     # equivalence margin D > 0, in units of the metric
    looks: tuple[int, ...]            # cumulative paired seeds at each look; the last = the maximum seeds
    n_configs: int                    # the family of the correction
    spending: str = "obrien-fleming"  # a name of SPENDING

    def __post_init__(self) -> None:
        object.__setattr__(self, "looks", tuple(int(n) for n in self.looks))
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise ValueError(f"the equivalence margin must be > 0, got {self.margin}")
        if not self.looks or self.looks[0] < 2 or any(np.diff(self.looks) <= 0):
            raise ValueError(f"looks must be increasing seed counts, the first >= 2, got {list(self.looks)}")
        if int(self.n_configs) != self.n_configs or self.n_configs < 1:
            raise ValueError(f"n_configs must be an integer >= 1, got {self.n_configs}")
        if self.spending not in SPENDING:
            raise ValueError(f"unknown spending function {self.spending!r}; choose one of {sorted(SPENDING)}")

    @classmethod
    def even(cls, alpha: float, margin: float, max_seeds: int, n_looks: int, n_configs: int,
             spending: str = "obrien-fleming") -> SequentialDesign:
        """Looks at evenly spaced seed counts up to `max_seeds` (e.g. 48 seeds in 6 looks: 8, 16, ..., 48)."""
        if not 1 <= n_looks <= max_seeds:
            raise ValueError(f"looks ({n_looks}) must be between 1 and the maximum seeds ({max_seeds})")
        looks = tuple(int(round(max_seeds * k / n_looks)) for k in range(1, n_looks + 1))
        return cls(alpha, margin, looks, n_configs, spending)

    @property
    def max_seeds(self) -> int:
        return self.looks[-1]

    def method(self) -> str:
        """One line naming the test, for plan.json and the report."""
        return (f"group-sequential paired t-tests, Lan-DeMets {self.spending}-type alpha spending, "
                f"Holm over {self.n_configs} config(s) at family-wise alpha {self.alpha:g}; equivalence by TOST "
                f"at alpha/{self.n_configs} (the repeated {1 - 2 * self.alpha / self.n_configs:g} interval inside "
                f"+-{self.margin:g})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; goes verbatim into plan.json (`method` is descriptive and ignored by from_dict)."""
        return {"alpha": self.alpha, "margin": self.margin, "looks": list(self.looks), "n_configs": self.n_configs,
                "spending": self.spending, "method": self.method()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequentialDesign:
        """The design of `to_dict`'s output; ValueError for missing or unknown keys."""
        names = {"alpha", "margin", "looks", "n_configs", "spending"}
        missing = names - {"spending"} - set(d)
        unknown = set(d) - names - {"method"}
        if missing or unknown:
            raise ValueError(f"a sequential design needs {sorted(names)}; missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        return cls(float(d["alpha"]), float(d["margin"]), tuple(d["looks"]), int(d["n_configs"]),
                   str(d.get("spending", "obrien-fleming")))

    def shares(self) -> np.ndarray:
        """Holm's share of alpha for a config when r = 0..m-1 others were already declared different."""
        m = self.n_configs
        return np.array([self.alpha / (m - r) for r in range(m)])

    def critical(self, look: int) -> tuple[np.ndarray, np.ndarray]:
        """(|t| boundaries for the difference test, the same for the TOST interval) at `look`, indexed by r."""
        pairs = [_t_critical(float(a), self.looks, self.spending, look) for a in self.shares()]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@dataclass(frozen=True)
class Verdict:
    """One config's verdict at one look."""

    config: str
    look: int            # 1-based index into design.looks
    n: int               # paired seeds used
    verdict: str         # one of VERDICTS
    estimate: float      # mean paired difference (config - baseline); biased away from 0 after an early stop
    rci_low: float       # the (1 - alpha_i) repeated confidence interval at this look (excludes 0 <=> different)
    rci_high: float
    level: float         # the nominal two-sided p-value level the difference test used at this look
    alpha: float = math.nan      # the config's Holm share of the family-wise alpha at this look
    eq_low: float = math.nan     # the (1 - 2 alpha/m) repeated confidence interval of TOST (inside +-D <=> equivalent)
    eq_high: float = math.nan
    eq_alpha: float = math.nan   # the share TOST used: alpha / m
    sd: float = math.nan         # sd of the paired differences
    p: float = math.nan          # the paired t-test's plain two-sided p-value at this look (compare with `level`)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (non-finite numbers as None)."""
        d = asdict(self)
        extra = d.pop("extra")
        for key, value in d.items():
            if isinstance(value, float) and not math.isfinite(value):
                d[key] = None
        return d | extra

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """The Verdict of `to_dict`'s output (None back to NaN)."""
        names = [f for f in cls.__dataclass_fields__ if f != "extra"]
        values = {k: (math.nan if d.get(k) is None and k not in ("config", "verdict", "look", "n") else d.get(k))
                  for k in names if k in d}
        return cls(**values, extra={k: v for k, v in d.items() if k not in names})

    @property
    def decided(self) -> bool:
        return self.verdict in DECIDED


@dataclass
class LookDecision:
    """`decide_arrays`' answer for R experiments x m configs at one look."""

    different: np.ndarray    # (R, m) bool: the no-difference null rejected at this look
    equivalent: np.ndarray   # (R, m) bool: the (1 - 2 alpha_i) RCI inside (-D, D)
    rejected: np.ndarray     # (R,) configs declared different so far (this look included)
    crit: np.ndarray         # (R, m) |t| boundary of each config's test (at its Holm share)
    crit_eq: np.ndarray      # (R, m) the same for the TOST interval (at alpha / m)
    share: np.ndarray        # (R, m) each config's Holm share of alpha for the difference test


def decide_arrays(design: SequentialDesign, look: int, mean: np.ndarray, sd: np.ndarray, open_: np.ndarray,
                  rejected_before: np.ndarray) -> LookDecision:
    """The decision rule at `look` for R experiments at once: `mean`, `sd` (R, m) of the paired
    differences over design.looks[look-1] seeds; `open_` (R, m) the configs still going on; `rejected_before`
    (R,) the configs declared different at earlier looks.

    Holm's step-down runs to its fixed point: each pass tests the open configs at alpha / (m - r), r = the
    configs declared different so far; a config's share is the one at which it was declared different, or,
    when it was not, the last one (alpha / (m - the others declared different)). Equivalence (TOST) stays at
    the Bonferroni share alpha / m: a config declared different may still be off by D or more, so passing
    its share on to the others' equivalence tests would let false equivalence claims exceed alpha
    family-wise (docs/analysis.md "Sequential confirmation").
    """
    n = design.looks[look - 1]
    crit_by_r, crit_eq_by_r = design.critical(look)
    m = design.n_configs
    se = sd / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        tabs = np.where(se > 0, np.abs(mean) / se, np.where(mean != 0, np.inf, 0.0))
    rejected = np.asarray(rejected_before, dtype=int).copy()
    index = np.broadcast_to(rejected[:, None], mean.shape).copy()   # each config's r when it was tested
    different = np.zeros(mean.shape, dtype=bool)
    for _ in range(m + 1):   # a pass only adds rejections and the shares only grow: at most m passes change
        r = np.minimum(rejected, m - 1)
        index = np.where(different, index, r[:, None])
        different = open_ & (tabs >= crit_by_r[index])
        now = rejected_before + different.sum(axis=1)
        if np.array_equal(now, rejected):
            break
        rejected = now
    crit = crit_by_r[index]
    crit_eq = np.full(mean.shape, crit_eq_by_r[0])   # TOST at the Bonferroni share alpha / m: see the docstring
    half = crit_eq * se
    with np.errstate(invalid="ignore"):   # inf * 0 when nothing is spent and sd is 0: no decision
        equivalent = open_ & (mean + half < design.margin) & (mean - half > -design.margin)
    return LookDecision(different, equivalent, rejected, crit, crit_eq, design.shares()[index])


def _label(different: bool, equivalent: bool, positive: bool, last: bool) -> str:
    if different:
        if equivalent:
            return BETTER_SMALL if positive else WORSE_SMALL
        return BETTER if positive else WORSE
    if equivalent:
        return EQUIVALENT
    return UNDECIDED if last else GO_ON


def decide(design: SequentialDesign, diffs: Mapping[str, Sequence[float]], look: int,
           decided: Mapping[str, Verdict] | None = None) -> dict[str, Verdict]:
    """Verdicts at `look` for every config still going on.

    `diffs[config]` = the paired differences (config - baseline) in seed order, exactly design.looks[look-1]
    of them, for each config not in `decided` (entries of decided configs are ignored); `decided` = the
    configs decided at earlier looks, whose Holm shares pass on when they were declared different. The
    configs of `diffs` and `decided` together must be the design's family. ValueError otherwise.
    """
    from scipy.stats import t as student

    decided = dict(decided or {})
    if not 1 <= look <= len(design.looks):
        raise ValueError(f"look {look} is not one of the design's looks 1..{len(design.looks)}")
    family = set(diffs) | set(decided)
    if len(family) != design.n_configs:
        raise ValueError(f"the design compares {design.n_configs} config(s), got {len(family)}: {sorted(family)}")
    undecided = sorted(c for c, v in decided.items() if not v.decided)
    if undecided:
        raise ValueError(f"`decided` holds configs that are not decided: {undecided}")
    n = design.looks[look - 1]
    going = [c for c in diffs if c not in decided]
    if not going:
        return {}
    values = []
    for config in going:
        x = np.asarray(diffs[config], dtype=float)
        if x.ndim != 1 or len(x) != n:
            raise ValueError(f"look {look} takes {n} paired differences per config; {config} has {x.size}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{config}: paired differences must be finite numbers")
        values.append(x)
    x = np.stack(values)                       # (m_open, n)
    mean, sd = x.mean(axis=1), x.std(axis=1, ddof=1)
    rejected_before = sum(v.verdict in DIFFERENT for v in decided.values())
    result = decide_arrays(design, look, mean[None, :], sd[None, :], np.ones((1, len(going)), bool),
                           np.array([rejected_before]))
    last = look == len(design.looks)
    out = {}
    for j, config in enumerate(going):
        crit, crit_eq, share = float(result.crit[0, j]), float(result.crit_eq[0, j]), float(result.share[0, j])
        level = nominal_level(share, design.looks, design.spending, look)
        se = sd[j] / math.sqrt(n)
        half, half_eq = (crit * se if se > 0 else 0.0), (crit_eq * se if se > 0 else 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = float(2 * student.sf(abs(mean[j]) / se, n - 1)) if se > 0 else (0.0 if mean[j] != 0 else 1.0)
        out[config] = Verdict(
            config=config, look=look, n=n,
            verdict=_label(bool(result.different[0, j]), bool(result.equivalent[0, j]), mean[j] > 0, last),
            estimate=float(mean[j]), rci_low=float(mean[j] - half), rci_high=float(mean[j] + half), level=level,
            alpha=share, eq_low=float(mean[j] - half_eq), eq_high=float(mean[j] + half_eq),
            eq_alpha=design.alpha / design.n_configs, sd=float(sd[j]), p=p)
    return out


def paired_differences(results: pd.DataFrame, metric: str = "acc_avg", baseline: str = "baseline",
                       seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """From a confirmation's per-run table (columns config, seed, status, <metric>, ...), the paired
    differences (config - baseline) of every config but the baseline.

    Only `completed` rows with a finite metric count. Without `seeds`: the seeds where both completed, in
    increasing order. With `seeds`: exactly those, in that order; ValueError names a seed where the config
    or the baseline has no completed result. A (config, seed) given twice is a ValueError.
    """
    missing = {"config", "seed", metric} - set(results.columns)
    if missing:
        raise ValueError(f"the results lack the column(s) {sorted(missing)}")
    if results.duplicated(["config", "seed"]).any():
        twice = results.loc[results.duplicated(["config", "seed"]), ["config", "seed"]].values.tolist()
        raise ValueError(f"(config, seed) given more than once: {twice[:5]}")
    rows = results if "status" not in results.columns else results[results["status"] == COMPLETED]
    rows = rows[np.isfinite(rows[metric].astype(float))]
    if baseline not in set(results["config"]):
        raise ValueError(f"the results have no {baseline!r} config to compare against")
    table = rows.pivot(index="seed", columns="config", values=metric)
    out = {}
    for config in dict.fromkeys(results["config"]):
        if config == baseline:
            continue
        both = table.reindex(columns=[config, baseline]).dropna()
        if seeds is None:
            pairs = both.sort_index()
        else:
            lacking = [int(s) for s in seeds if s not in both.index]
            if lacking:
                raise ValueError(f"{config}: no completed pair with {baseline!r} for seed(s) {lacking[:8]}")
            pairs = both.loc[list(seeds)]
        out[str(config)] = (pairs[config] - pairs[baseline]).to_numpy(dtype=float)
    return out
