"""The report of a pre-registered sequential confirmation folder (docs/analysis.md "Sequential confirmation").

`python -m analysis FOLDER` on a folder with `plan.json` (written by `python -m tune_bir.sweep --confirm
... --sequential`) reads its files, never the package that wrote them:

- `plan.json` (configs, seeds in order, metric, design), whose sha256 must match the one registered
  before the first run (`state.json` beside it and the seed ledger `seed_ledger.json` of its storage path);
- `results.csv`, one row per (config, seed) run (class order and CPU fingerprint columns where recorded);
- `looks.json`, what the runner decided at each look.

It recomputes every verdict from plan.json and results.csv with `analysis.sequential.decide`, look after
look, compares them with looks.json, and writes `sequential.csv` and `report.md`. It refuses (ConfigError)
a plan that no longer matches its hash, and results for configs or seeds the plan does not name.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.report import machines_note, recorded_machine_fields
from analysis.sequential import (
    BETTER,
    BETTER_SMALL,
    DECIDED,
    EQUIVALENT,
    GO_ON,
    UNDECIDED,
    WORSE,
    WORSE_SMALL,
    SequentialDesign,
    Verdict,
    decide,
    paired_differences,
)
from tune_bir.errors import ConfigError

PLAN_FILE, STATE_FILE, LOOKS_FILE, RESULTS_FILE, LEDGER_FILE = (
    "plan.json", "state.json", "looks.json", "results.csv", "seed_ledger.json")
TABLE_FILE, REPORT_FILE = "sequential.csv", "report.md"


def naive_mean_bias(verdict: str, stopped_early: bool) -> str:
    """Which way a config's naive mean is pulled by the look it stopped at ("" when it did not stop early)."""
    if not stopped_early or verdict in (GO_ON, UNDECIDED):
        return ""
    if verdict == EQUIVALENT:
        return "biased towards 0: it stopped early for equivalence"
    return "biased away from 0: it stopped early for a difference"


MEANING = {
    BETTER: "better than the baseline: the repeated interval excludes 0 on the positive side",
    WORSE: "worse than the baseline: the repeated interval excludes 0 on the negative side",
    EQUIVALENT: "equivalent within +-D: the TOST interval lies inside (-D, D); no difference of D or more",
    BETTER_SMALL: "better, but by less than D: both of the above",
    WORSE_SMALL: "worse, but by less than D: both of the above",
    GO_ON: "not decided yet: the confirmation goes on (or was stopped before its next look)",
    UNDECIDED: "undecided after every planned seed: neither a difference nor equivalence within +-D is shown; "
               "the interval says how large an effect the seeds leave open",
}


def is_sequential_folder(location: str) -> bool:
    """A local folder holding a confirmation's plan.json (and no sweep.json)."""
    path = Path(location).expanduser()
    return "://" not in location and (path / PLAN_FILE).is_file() and not (path / "sweep.json").is_file()


@dataclass
class SequentialConfirmation:
    """A sequential confirmation folder, checked: its plan, the registered hash, its looks and results."""

    folder: Path
    plan: dict[str, Any]
    sha256: str
    registered_in: list[str]
    design: SequentialDesign
    looks: list[dict[str, Any]]
    results: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [c["label"] for c in self.plan["configs"]]


def _ledger_entries(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The seed-ledger entries naming `folder`, from the ledgers of its parent folders (its storage path)."""
    found = []
    here = folder.resolve()
    for parent in list(here.parents)[:3]:
        ledger = parent / LEDGER_FILE
        if not ledger.is_file():
            continue
        try:
            entries = json.loads(ledger.read_text()).get("entries", [])
        except (json.JSONDecodeError, AttributeError) as err:
            raise ConfigError(f"{ledger} is not valid JSON: {err}") from err
        for entry in entries:
            if isinstance(entry, dict) and "://" not in str(entry.get("folder", "")) and \
                    Path(str(entry.get("folder", ""))).expanduser().resolve() == here:
                found.append((ledger, entry))
    return found


def read_sequential(location: str) -> SequentialConfirmation:
    """Read and check a sequential confirmation folder; ConfigError (one line) for what must be refused."""
    folder = Path(location).expanduser()
    raw = (folder / PLAN_FILE).read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    registered: dict[str, str] = {}
    state_path = folder / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{state_path} is not valid JSON: {err.msg}") from err
        if state.get("plan_sha256"):
            registered[str(state_path)] = state["plan_sha256"]
    for ledger, entry in _ledger_entries(folder):
        if entry.get("plan_sha256"):
            registered[str(ledger)] = entry["plan_sha256"]
    if not registered:
        raise ConfigError(f"{folder}/{PLAN_FILE} has no registered sha256 (no {STATE_FILE} beside it, no entry in a "
                          f"{LEDGER_FILE}): it was never pre-registered, so it gives no verdicts")
    wrong = {where: h for where, h in registered.items() if h != sha}
    if wrong:
        where, h = next(iter(wrong.items()))
        raise ConfigError(f"{folder}/{PLAN_FILE} no longer matches its registered sha256 {h[:16]}... (in {where}; its "
                          f"bytes hash to {sha[:16]}...): no verdicts from a changed plan; restore the registered "
                          "plan.json")
    try:
        plan = json.loads(raw)
        design = SequentialDesign.from_dict(plan["design"])
        labels = [c["label"] for c in plan["configs"]]
        seeds = [int(s) for s in plan["seeds"]]
        plan["metric"], plan["baseline"]   # noqa: B018 (required keys)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{folder}/{PLAN_FILE} is not a sequential confirmation's plan ({type(err).__name__}: "
                          f"{err}); a fixed-design confirmation is reported by python -m analysis SWEEP") from err
    if design.n_configs != len(labels) or design.max_seeds > len(seeds):
        raise ConfigError(f"{folder}/{PLAN_FILE}: its design compares {design.n_configs} config(s) on up to "
                          f"{design.max_seeds} seeds, but it names {len(labels)} config(s) and {len(seeds)} seeds")
    results_path = folder / RESULTS_FILE
    results = pd.read_csv(results_path) if results_path.is_file() else pd.DataFrame(
        columns=["config", "seed", "status", plan["metric"]])
    missing = {"config", "seed", plan["metric"]} - set(results.columns)
    if missing:
        raise ConfigError(f"{results_path} lacks the column(s) {sorted(missing)}")
    foreign = sorted(set(results["config"].astype(str)) - set(labels) - {plan["baseline"]})
    if foreign:
        raise ConfigError(f"{results_path} holds results for config(s) {foreign[:4]} that {PLAN_FILE} does not name "
                          f"(it names {[plan['baseline'], *labels]}): no verdicts from runs outside the plan")
    strange = sorted(set(int(s) for s in results["seed"]) - set(seeds))
    if strange:
        raise ConfigError(f"{results_path} holds results for seed(s) {strange[:6]} that {PLAN_FILE} does not name "
                          f"(its seeds are {seeds[0]}..{seeds[-1]}): no verdicts from runs outside the plan")
    looks_path = folder / LOOKS_FILE
    try:
        looks = json.loads(looks_path.read_text()) if looks_path.is_file() else []
    except json.JSONDecodeError as err:
        raise ConfigError(f"{looks_path} is not valid JSON: {err.msg}") from err
    return SequentialConfirmation(folder, plan, sha, sorted(registered), design, looks, results)


@dataclass
class Recomputed:
    """The verdicts recomputed look after look: each config's last verdict, and how far the data reach."""

    last: dict[str, Verdict]
    looks_done: int
    waiting: str | None        # why the next look cannot be decided yet (None: finished)


def recompute(conf: SequentialConfirmation) -> Recomputed:
    """Apply the design's rule to results.csv look after look, as the runner did."""
    plan, design = conf.plan, conf.design
    seeds = [int(s) for s in plan["seeds"]]
    decided: dict[str, Verdict] = {}
    last: dict[str, Verdict] = {}
    for k, n in enumerate(design.looks, start=1):
        open_configs = [c for c in conf.labels if c not in decided]
        if not open_configs:
            return Recomputed(last, k - 1, None)
        rows = conf.results[conf.results["config"].astype(str).isin([plan["baseline"], *open_configs])]
        try:
            diffs = paired_differences(rows, metric=plan["metric"], baseline=plan["baseline"], seeds=seeds[:n])
        except ValueError as err:
            return Recomputed(last, k - 1, f"look {k} ({n} seeds) cannot be decided yet: {err}")
        verdicts = decide(design, {c: diffs[c] for c in open_configs}, k, decided)
        last |= verdicts
        decided |= {c: v for c, v in verdicts.items() if v.verdict in DECIDED}
    return Recomputed(last, len(design.looks), None)


def _class_orders(conf: SequentialConfirmation, config: str, seeds: list[int]) -> str:
    """Which class orders the seeds of a verdict cover."""
    rows = conf.results[conf.results["config"].astype(str) == config]
    if "class_order" in rows.columns and rows["class_order"].notna().all() and len(rows):
        by_seed = dict(zip(rows["seed"].astype(int), rows["class_order"].astype(str), strict=True))
        orders = [by_seed.get(s) for s in seeds]
    else:
        experiment = (conf.plan.get("base_config") or {}).get("experiment")
        if not experiment:
            return "not recorded"
        from tune_bir.config import label_permutation

        orders = [" ".join(map(str, label_permutation(experiment, s))) for s in seeds]
    known = [o for o in orders if o is not None]
    if not known:
        return "not recorded"
    distinct = set(known)
    width = len(known[0].split())
    original = " ".join(map(str, range(width)))
    if distinct == {original}:
        return f"the original class order only ({len(known)} seeds)"
    text = f"{len(distinct)} class orders over {len(known)} seeds"
    if len(distinct) == len(known):
        text += " (every seed its own)"
    return text + ("; the original order among them" if original in distinct else "")


def _cpu_note(conf: SequentialConfirmation, config: str, seeds: list[int]) -> str:
    """Whether any pair (config and baseline on one seed) ran on different CPU kinds or thread counts."""
    fields = recorded_machine_fields(conf.results)
    if not fields:
        return "not recorded (no cpu_* / threads columns)"
    table = conf.results.set_index(["config", "seed"])
    base = conf.plan["baseline"]
    differing: dict[str, int] = {}
    for seed in seeds:
        try:
            a, b = table.loc[(config, seed), fields], table.loc[(base, seed), fields]
        except KeyError:
            continue
        for f in fields:
            if str(a[f]) != str(b[f]):
                differing[f] = differing.get(f, 0) + 1
    kinds = conf.results.loc[conf.results["seed"].isin(seeds), fields[0]].astype(str).nunique()
    if not differing:
        return f"every pair on the same CPU kind and threads ({kinds} kind(s) of {fields[0]} in all)"
    return "pairs differ in " + ", ".join(f"{f} ({differing[f]} seed(s))" for f in fields if f in differing)


def sequential_table(conf: SequentialConfirmation, recomputed: Recomputed) -> pd.DataFrame:
    """One row per config: verdict, where it stopped, the intervals, the naive mean, class orders, CPUs."""
    seeds = [int(s) for s in conf.plan["seeds"]]
    rows = []
    for config in conf.labels:
        v = recomputed.last.get(config)
        if v is None:
            rows.append({"config": config, "verdict": "no look decided yet", "look": 0, "n": 0})
            continue
        used = seeds[:v.n]
        rows.append({
            "config": config, "verdict": v.verdict, "look": v.look, "n": v.n,
            "seeds": f"{used[0]}..{used[-1]}", "mean_diff_naive": v.estimate, "rci_low": v.rci_low,
            "rci_high": v.rci_high, "rci_level": 1 - v.alpha, "tost_low": v.eq_low, "tost_high": v.eq_high,
            "tost_level": 1 - 2 * v.eq_alpha, "alpha_share": v.alpha, "nominal_level": v.level, "p_naive": v.p,
            "sd_diff": v.sd, "class_orders": _class_orders(conf, config, used), "cpu": _cpu_note(conf, config, used)})
    return pd.DataFrame(rows)


def _looks_json_disagreements(conf: SequentialConfirmation, recomputed: Recomputed) -> list[str]:
    """Where looks.json's verdicts differ from the ones recomputed from the results."""
    notes = []
    recorded: dict[str, dict[str, Any]] = {}
    for look in conf.looks:
        for v in look.get("verdicts", []):
            recorded[v["config"]] = v
    for config, v in recomputed.last.items():
        r = recorded.get(config)
        if r is None:
            continue
        if (r.get("verdict"), r.get("look")) != (v.verdict, v.look):
            notes.append(f"looks.json says {config}: {r.get('verdict')!r} at look {r.get('look')}; recomputed from "
                         f"results.csv: {v.verdict!r} at look {v.look}")
    return notes


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}f}"


def write_sequential_report(conf: SequentialConfirmation, out: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Write sequential.csv and report.md into `out`; (the table, the files written, notes)."""
    recomputed = recompute(conf)
    table = sequential_table(conf, recomputed)
    notes = _looks_json_disagreements(conf, recomputed)
    if recomputed.waiting:
        notes.append(recomputed.waiting)
    plan, design = conf.plan, conf.design
    seeds = [int(s) for s in plan["seeds"]]
    target = Path(out).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    table.to_csv(target / TABLE_FILE, index=False)
    m = design.n_configs
    lines = [
        f"# Sequential confirmation `{plan.get('label', conf.folder.name)}`", "",
        f"Pre-registered in `plan.json` (sha256 `{conf.sha256}`, verified against {', '.join(conf.registered_in)}), "
        f"created {plan.get('created', '?')} at commit `{plan.get('git_commit') or '?'}`.", "",
        f"- **Question**: each config against the shared `{plan['baseline']}`, paired by seed, on test "
        f"`{plan['metric']}` (config - baseline).",
        f"- **Design**: {design.method()}.",
        f"- **Seeds**: {seeds[0]}..{seeds[design.max_seeds - 1]} in this order, looks after "
        f"{', '.join(map(str, design.looks))} seeds; a decided config stops, the baseline runs while any goes on.",
        f"- **Margin** D = {design.margin:g} {plan['metric']}.",
    ]
    if plan.get("reuse_seeds"):
        lines.append(f"- **Seeds used before** (allowed by --reuse-seeds): {plan['reuse_seeds']}: these runs are not "
                     "fresh; their configs may have been chosen on them.")
    lines += ["", "| config | source | values |", "|---|---|---|"]
    for c in plan["configs"]:
        lines.append(f"| {c['label']} | `{json.dumps(c.get('source'))}` | `{json.dumps(c.get('values'))}` |")
    lines += ["", "## Verdicts", "",
              f"| config | verdict | seeds | repeated CI (1 - alpha_i) | TOST interval (1 - 2 alpha/{m}) | "
              "naive mean | class orders | CPU |", "|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        if not r.get("n"):
            lines.append(f"| {r['config']} | {r['verdict']} | — | — | — | — | — | — |")
            continue
        where = f"look {r['look']}, {r['n']} seeds ({r['seeds']})"
        if r["verdict"] == GO_ON:
            where = f"not stopped; last decided look {r['look']}, {r['n']} seeds ({r['seeds']})"
        lines.append(
            f"| {r['config']} | **{r['verdict']}** | {where} | "
            f"[{_fmt(r['rci_low'])}, {_fmt(r['rci_high'])}] at {r['rci_level']:.4g} | "
            f"[{_fmt(r['tost_low'])}, {_fmt(r['tost_high'])}] at {r['tost_level']:.4g} | "
            f"{_fmt(r['mean_diff_naive'])} | {r['class_orders']} | {r['cpu']} |")
    if len(conf.results) and (note := machines_note(conf.results)) is not None:
        lines += ["", f"CPUs: {note}"]
    lines += ["", "What the verdicts mean:", ""]
    lines += [f"- *{name}*: {text}." for name, text in MEANING.items() if name in set(table["verdict"])]
    lines += [
        "",
        "**The naive mean is biased.** A config stops at the first look where its interval clears 0 or fits "
        "inside +-D, so the mean it stopped with is a selected one: after a better/worse stop it is biased away "
        "from zero (it stopped because its mean happened to be far from 0), after an equivalence stop towards "
        "zero (it stopped because its mean happened to be near 0) (Jennison & Turnbull 2000, ch. 8). Quote the "
        "repeated confidence interval: it keeps its coverage whenever the confirmation stopped. The naive mean "
        "and the plain p-value (sequential.csv: `p_naive`, compared there with `nominal_level`) are for "
        "reference only.",
        "",
        f"Family-wise error: better/worse claims over the {m} config(s) together are wrong with probability at "
        f"most {design.alpha:g} (Holm over the configs, alpha spending over the looks); equivalence claims "
        f"likewise, each at alpha/{m}. docs/analysis.md \"Sequential confirmation\" gives the method and its "
        "simulated error rates.",
        "", "## Looks", "", "| look | seeds | commit | finished | verdicts (looks.json) |", "|---|---|---|---|---|"]
    for look in conf.looks:
        verdicts = ", ".join(f"{v['config']}: {v['verdict']}" for v in look.get("verdicts", []))
        lines.append(f"| {look.get('look')} | {look.get('n')} | `{look.get('commit') or '?'}` | "
                     f"{look.get('finished', '?')} | {verdicts} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (target / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return table, [TABLE_FILE, REPORT_FILE], notes
