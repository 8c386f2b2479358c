"""Sequential confirmation folders written file by file (the files of the interface between the runner,
`confirmation/`, and `analysis`): plan.json, state.json with its sha256, the storage path's seed ledger,
results.csv with synthetic per-seed results, and looks.json as the runner writes it (verdicts from
`analysis.sequential.decide`, look after look, a decided config stopping)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.sequential import DECIDED, SequentialDesign, decide, paired_differences
from tune_bir.config import label_permutation

EXPERIMENT = "splitMNIST5k"
CPU = {"cpu_model": "AMD EPYC 9B45", "cpu_isa_torch": "AVX512", "cpu_isa_mkl": "AVX2", "mkl_cbwr": "OFF",
       "cpu_isa_onednn": "AVX512_CORE", "threads": 1}


def write_confirmation(folder: Path, effects: dict[str, float] | None = None, sd: float = 0.01, seed: int = 0,
                       looks: tuple[int, ...] = (8, 16, 24), upto_look: int | None = None, first_seed: int = 100,
                       margin: float = 0.005, cpu: bool = True) -> Path:
    """A finished (or, with `upto_look`, interrupted) sequential confirmation at `folder`; returns it."""
    effects = effects if effects is not None else {"rep": 0.03, "con": 0.0}
    folder.mkdir(parents=True, exist_ok=True)
    design = SequentialDesign(0.05, margin, looks, len(effects), "obrien-fleming")
    seeds = list(range(first_seed, first_seed + looks[-1]))
    plan = {"format": 1, "label": folder.name, "folder": str(folder), "created": "2026-12-02T21:00:00+00:00",
            "git_commit": "0" * 40, "metric": "acc_avg",
            "test": "paired t-test on per-seed differences (config - baseline), group-sequential",
            "baseline": "baseline", "base_config": {"experiment": EXPERIMENT, "seed": first_seed},
            "trial_base_config": {"experiment": EXPERIMENT},
            "configs": [{"label": c, "values": {"lamda_rep": 1.0}, "source": {"hand": c}} for c in effects],
            "seeds": seeds, "max_seeds": len(seeds), "design": design.to_dict(), "resources": {"cpus_per_trial": 1},
            "sweeps": [], "reuse_seeds": [], "argv": []}
    text = json.dumps(plan, indent=2) + "\n"
    (folder / "plan.json").write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    (folder / "state.json").write_text(json.dumps({"plan_sha256": sha, "group_id": "abc"}) + "\n")
    (folder.parent / "seed_ledger.json").write_text(json.dumps({"format": 1, "entries": [
        {"kind": "confirmation", "label": folder.name, "folder": str(folder), "seeds": seeds, "plan_sha256": sha}]}))
    rng = np.random.default_rng(seed)
    base = 0.85 + 0.02 * rng.standard_normal(len(seeds))
    values = {c: base + e + sd * rng.standard_normal(len(seeds)) for c, e in effects.items()}
    rows, entries, decided = [], [], {}
    for k, n in enumerate(looks, start=1):
        if upto_look is not None and k > upto_look:
            break
        open_configs = [c for c in effects if c not in decided]
        before = looks[k - 2] if k > 1 else 0
        for i in range(before, n):
            order = " ".join(map(str, label_permutation(EXPERIMENT, seeds[i])))
            for config in ["baseline", *open_configs]:
                acc = base[i] if config == "baseline" else values[config][i]
                rows.append({"config": config, "seed": seeds[i], "trial_id": f"{config}-{seeds[i]}",
                             "status": "completed", "acc_avg": float(acc), "forgetting_avg": 0.1, "look": k,
                             "class_order": order} | (CPU if cpu else {}))
        table = pd.DataFrame(rows)
        diffs = paired_differences(table[table["config"].isin(["baseline", *open_configs])], seeds=seeds[:n])
        verdicts = decide(design, {c: diffs[c] for c in open_configs}, k, decided)
        entries.append({"look": k, "n": n, "seeds": seeds[before:n], "commit": "0" * 40,
                        "finished": f"2026-12-02T21:{k:02d}:00+00:00",
                        "verdicts": [v.to_dict() for v in verdicts.values()]})
        decided |= {c: v for c, v in verdicts.items() if v.verdict in DECIDED}
        if len(decided) == len(effects):
            break
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    (folder / "looks.json").write_text(json.dumps(entries, indent=2) + "\n")
    return folder
