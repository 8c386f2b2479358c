"""The seed ledger: which seeds every sweep and confirmation under one storage path has used.

A confirmation on seeds that selected its configs (or that another confirmation already spent) is not a
confirmation: its configs were chosen, or its question already looked at, on those very draws. The
ledger (`seed_ledger.json` at the storage path) lists each confirmation's seeds and its plan's sha256;
a sweep's own seeds are read from its `sweep.json` (trials train seed .. seed + seeds_per_trial - 1) and
those of its confirmations from their files, so nothing has to register a sweep.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_bir.errors import ConfigError
from tune_bir.sweep.storage import CONFIRM_FILE, SWEEP_FILE, SweepFolder

LEDGER_FILE = "seed_ledger.json"
FORMAT = 1


def sweep_seeds(sweep_json: dict[str, Any]) -> list[int]:
    """The seeds a sweep's trials trained: its base seed .. seed + seeds_per_trial - 1."""
    first = int(sweep_json["resolved_base_config"]["seed"])
    return list(range(first, first + int(sweep_json["cli"]["args"].get("seeds_per_trial", 1))))


def _read_json(folder: SweepFolder, file: str) -> dict[str, Any] | None:
    if not folder.exists(file):
        return None
    try:
        return json.loads(folder.read_text(file))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{folder}/{file} is not valid JSON: {err.msg}") from err


def seeds_of_sweep(location: str) -> dict[int, str]:
    """Seed -> where it was used, for the sweep at `location` (its folder, or its sweep.json) and the
    confirmations beside it (`confirm.json`, `confirm/confirm.json`, `confirm-*/plan.json`)."""
    path = location[:-len(SWEEP_FILE)].rstrip("/") if location.endswith(SWEEP_FILE) else location
    folder = SweepFolder.of(path)
    sweep = _read_json(folder, SWEEP_FILE)
    if sweep is None:
        raise ConfigError(f"no sweep at {folder} (no {SWEEP_FILE})")
    name = sweep.get("name", folder.name)
    used = {s: f"sweep {name}" for s in sweep_seeds(sweep)}
    for sub, file in (("", CONFIRM_FILE), ("confirm", CONFIRM_FILE)):
        found = _read_json(folder.sub(sub) if sub else folder, file)
        for s in (found or {}).get("seeds", []):
            used.setdefault(int(s), f"sweep {name}'s confirmation")
    if folder.is_local:
        for plan_file in sorted(Path(folder.location).glob("confirm-*/plan.json")):
            for s in json.loads(plan_file.read_text()).get("seeds", []):
                used.setdefault(int(s), f"confirmation {plan_file.parent.name} of sweep {name}")
    return used


@dataclass
class Ledger:
    """The seed ledger at one storage path (`root`)."""

    root: SweepFolder

    @classmethod
    def at(cls, root: str) -> Ledger:
        return cls(SweepFolder.of(root))

    def entries(self) -> list[dict[str, Any]]:
        data = _read_json(self.root, LEDGER_FILE)
        if data is None:
            return []
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ConfigError(f"{self.root}/{LEDGER_FILE} is not a seed ledger this version wrote")
        return data["entries"]

    def entry(self, folder: str) -> dict[str, Any] | None:
        """The registered confirmation living at `folder`, if any."""
        return next((e for e in self.entries() if e["folder"] == folder), None)

    def used(self, sweeps: list[str], skip_folder: str | None = None) -> dict[int, str]:
        """Seed -> where it was used: every registered confirmation (but `skip_folder`), every sweep directly
        under the storage path, and the sweeps `sweeps` (wherever they are)."""
        used: dict[int, str] = {}
        for e in self.entries():
            if e["folder"] != skip_folder:
                for s in e["seeds"]:
                    used.setdefault(int(s), f"confirmation {e['label']} ({e['folder']})")
        locations = list(sweeps)
        if self.root.is_local and Path(self.root.location).is_dir():
            locations += [str(p.parent) for p in sorted(Path(self.root.location).glob(f"*/{SWEEP_FILE}"))]
        for location in dict.fromkeys(locations):
            for s, where in seeds_of_sweep(location).items():
                used.setdefault(s, where)
        return used

    def register(self, label: str, folder: str, seeds: list[int], plan_sha256: str) -> None:
        """Record a confirmation's seeds and plan hash (before its first run)."""
        entries = [e for e in self.entries() if e["folder"] != folder]
        entries.append({"kind": "confirmation", "label": label, "folder": folder, "seeds": seeds,
                        "plan_sha256": plan_sha256,
                        "registered": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        self.root.write_text(LEDGER_FILE, json.dumps({"format": FORMAT, "entries": entries}, indent=2) + "\n")


def overlap_message(seeds: list[int], used: dict[int, str]) -> str | None:
    """One line naming the seeds of `seeds` used before and where, or None."""
    clash = [s for s in seeds if s in used]
    if not clash:
        return None
    shown = ", ".join(f"{s} ({used[s]})" for s in clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3
                                                                else "")
    return (f"seeds already used: {shown}; a confirmation needs seeds nobody used: choose --first-seed "
            f"{max(used) + 1} (after every used seed), or add --reuse-seeds (the report then says so)")
