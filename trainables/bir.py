"""`BIRTrainable`: the tune_bir engine as a Ray Tune class Trainable; one `step()` = one segment.

The Tune config is a flat dict of `BIRConfig` fields plus three trial options: `seeds_per_trial`
(N engines, seeds seed..seed+N-1, trained side by side; results are their means, and each seed's
values under `seed<k>/`), `baseline` (a marker for the sweep's baseline trial; no effect here) and
`share_first_task` (adopt task 1 from `trainables.first_task_cache` when another trial on this node
already trained it; default on). Checkpoints hold every engine's whole state, so Ray can restore a
failed trial and a sweep can be resumed. Data comes from `trainables.data_cache` (once per node,
once per process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

import tune_bir.data
from trainables import data_cache, first_task_cache
from tune_bir.config import OUTPUT_FIELDS, BIRConfig
from tune_bir.device import resolve_device
from tune_bir.engine import CHECKPOINT_FORMAT as ENGINE_CHECKPOINT_FORMAT
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.record import CPU_PREFIX, cpu_fingerprint
from tune_bir.safe_load import load_torch_file

# What ASHA ranks trials by at a rung: val_acc_avg with its ties broken (see TIE_BREAK_WEIGHT below);
# every result carries it, the sweep driver reads the name from here.
SCHEDULER_METRIC = "val_score"
CHECKPOINT_FILE = "learner.pt"
CHECKPOINT_FORMAT = 1
TRIAL_OPTIONS: dict[str, Any] = {"seeds_per_trial": 1, "baseline": False, "share_first_task": True}
# Diagnostics of the worker process, reported with every result (never used to select): they let
# tests and users see actor reuse and data sharing at work.
# Ray's progress table shows the first metrics of a result: these come first.
LEADING_KEYS = ("task", "val_acc_avg", "acc_avg", "forgetting_avg")
# ASHA's ranking key: val_acc_avg, ties broken by val_prob_avg. A few hundred validation images
# quantise accuracy, so configs tie often at a rung; ASHA keeps every trial that ties at its cutoff.
# One validation image moves val_acc_avg by 1/(tasks x images of its task), >= 1e-6 for up to 10^6
# images in all: the tie-break term (<= 1e-9) cannot outweigh a real accuracy difference.
TIE_BREAK_WEIGHT = 1e-9
# Configs can also tie EXACTLY (val_prob_avg too): a term whose gate admits no sample yet is inert, so
# e.g. every --use-rep-f config is the baseline's learner at task 2. Ray's ASHA stops only trials strictly
# below its cutoff, so a block of exact ties at the cutoff would all go on (25 of 64 in a measured sweep).
# A fixed pseudo-random number per config breaks such ties; the baseline, the sweep's reference, wins
# them. At 1e-13 it cannot reorder val_prob_avg differences above 1e-4, and float64 still resolves it.
EXACT_TIE_WEIGHT = 1e-13
WORKER_KEYS = ("worker/pid", "worker/node", "worker/setups", "worker/setup_s", "worker/data_loads",
               "worker/data_cache_built", "worker/data_cache_mapped", "worker/first_task_trained",
               "worker/first_task_adopted")
SETUP_CALLS = 0   # setup() calls in this process (a reused actor gets reset_config() instead)


def split_config(config: dict[str, Any]) -> tuple[BIRConfig, dict[str, Any]]:
    """(the BIRConfig of a Tune config, the trial options); raises ConfigError."""
    values = {k: v for k, v in config.items() if not k.startswith("__")}
    options = {name: values.pop(name, default) for name, default in TRIAL_OPTIONS.items()}
    seeds = options["seeds_per_trial"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds-per-trial must be an integer >= 1, got {seeds!r}")
    return BIRConfig.from_dict(values), options


def tie_rank(config: dict[str, Any]) -> float:
    """A number in [0, 1] fixed by the trial's learner config (1 for the baseline) that orders exact ties."""
    base, options = split_config(config)
    if options["baseline"]:
        return 1.0
    digest = hashlib.sha256(json.dumps(base.to_dict(), sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _trial_device(name: str) -> torch.device:
    """`auto` inside a Ray trial means: the GPU Ray assigned to it, if any; else CPU."""
    import ray

    if name == "auto" and ray.is_initialized():
        return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    return resolve_device(name)


def _finite(value: float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


class BIRTrainable(tune.Trainable):
    """BI-R(+SI) learner(s) of one trial."""

    def setup(self, config: dict[str, Any]) -> None:
        global SETUP_CALLS
        SETUP_CALLS += 1
        # Ray logs one INFO line per checkpoint to the driver's console: one per task and trial is noise
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        self._build(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._build(new_config)
        return True

    def _build(self, config: dict[str, Any]) -> None:
        start = time.perf_counter()
        base, options = split_config(config)
        device = _trial_device(base.device)
        self.engines: list[Engine] = []
        for k in range(options["seeds_per_trial"]):
            cfg = dataclasses.replace(base, seed=base.seed + k, device=str(device)).resolved()
            self.engines.append(Engine(cfg, data=data_cache.hidden_data(cfg, device)))
        self.segment_iters = base.segment_iters or None
        self.share_first_task = bool(options["share_first_task"])
        self.diverged = False
        self.tie_rank = tie_rank(config)
        self.setup_s = time.perf_counter() - start

    def step(self) -> dict[str, Any]:
        per_seed = [self._step_engine(engine) for engine in self.engines]
        present = dict.fromkeys(k for m in per_seed for k in m)
        keys = [k for k in LEADING_KEYS if k in present] + [k for k in present if k not in LEADING_KEYS]
        result: dict[str, Any] = {k: sum(m.get(k, math.nan) for m in per_seed) / len(per_seed) for k in keys}
        result["time_this_step_s"] = sum(m.get("time_this_step_s", 0.0) for m in per_seed)
        if len(self.engines) > 1:
            for engine, metrics in zip(self.engines, per_seed, strict=True):
                result |= {f"seed{engine.cfg.seed}/{k}": v for k, v in metrics.items()}
        if "val_acc_avg" in result:   # every result carries it (NaN when diverged): ASHA checks strictly
            result[SCHEDULER_METRIC] = (result["val_acc_avg"] + TIE_BREAK_WEIGHT * result["val_prob_avg"]
                                        + EXACT_TIE_WEIGHT * self.tie_rank)
        self.diverged = self.diverged or not all(_finite(v) for v in result.values())
        result |= self._worker_stats() | {"worker/setup_s": self.setup_s}
        if self.diverged:
            result["diverged"] = True
        if self.diverged or all(engine.done for engine in self.engines):
            result["done"] = True
        return result

    def _step_engine(self, engine: Engine) -> dict[str, float]:
        start = time.perf_counter()
        try:
            if self.share_first_task and first_task_cache.shareable(engine, self.segment_iters):
                metrics = first_task_cache.train_or_adopt_first_task(engine)
            else:
                metrics = engine.train_segment(self.segment_iters)
        except (RuntimeError, ValueError):
            # a numerical blow-up can surface as an error: when the model's own outputs are no longer
            # finite that is divergence, a property of the config; anything else is a bug and fails the trial
            if engine.outputs_finite():
                raise
            return self._diverged_metrics(engine, start)
        # a model with non-finite outputs still "predicts" (argmax of NaN): its accuracies mean nothing
        return metrics if engine.outputs_finite() else self._diverged_metrics(engine, start)

    @staticmethod
    def _diverged_metrics(engine: Engine, start: float) -> dict[str, float]:
        # the segment's time counts as training time (else it would pass for Ray's overhead)
        return {"task": float(engine.task), "iters_done": float(engine.iters_done),
                "acc_avg": math.nan, "val_acc_avg": math.nan, "prob_avg": math.nan, "val_prob_avg": math.nan,
                "time_this_step_s": time.perf_counter() - start}

    @staticmethod
    def _worker_stats() -> dict[str, Any]:
        import ray

        stats: dict[str, Any] = {
            "worker/pid": float(os.getpid()), "worker/setups": float(SETUP_CALLS),
            "worker/data_loads": float(tune_bir.data.LOAD_COUNT),
            "worker/data_cache_built": float(data_cache.STATS["built"]),
            "worker/data_cache_mapped": float(data_cache.STATS["mapped"]),
            "worker/first_task_trained": float(first_task_cache.STATS["trained"]),
            "worker/first_task_adopted": float(first_task_cache.STATS["adopted"])}
        if ray.is_initialized():
            stats["worker/node"] = ray.get_runtime_context().get_node_id()
        # where the run's numbers reproduce bit for bit: `python -m tune_bir.train` with the trial's config, seed
        # and these threads (the worker's, Ray's OMP_NUM_THREADS) on this kind of CPU repeats it
        stats |= {CPU_PREFIX + k: v for k, v in cpu_fingerprint().items()}
        return stats

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        torch.save({"format": CHECKPOINT_FORMAT, "diverged": self.diverged,
                    "engines": [engine.state_dict() for engine in self.engines]},
                   Path(checkpoint_dir) / CHECKPOINT_FILE)

    def load_checkpoint(self, checkpoint: str | dict | None) -> None:
        """Restore every engine from `learner.pt`; a file that is not this trial's checkpoint (truncated,
        corrupt, foreign, another format, another config) is refused with one line (ConfigError)."""
        path = Path(checkpoint) / CHECKPOINT_FILE
        state = load_torch_file(path, "trial checkpoint", map_location=self.engines[0].device, verify=True)
        for engine, engine_state in zip(self.engines, _checked_engine_states(state, path, self.engines),
                                        strict=True):
            try:
                engine.load_state_dict(engine_state)
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
                detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise ConfigError(f"trial checkpoint {path} does not fit this trial's learner: {detail}") from err
        self.diverged = bool(state["diverged"])


# fields a restored trial may have changed: where results go, how steps are cut, which device it runs on
RESTORE_MAY_DIFFER = (*OUTPUT_FIELDS, "device")


def _checked_engine_states(state: Any, path: Path, engines: list[Engine]) -> list[dict]:
    """The engine states of a loaded `learner.pt`, after checking its format, seeds and configs."""
    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"trial checkpoint {path} cannot be restored: {reason}")

    if not isinstance(state, dict) or "format" not in state:
        raise refuse("it is a torch file but not a trial checkpoint (no format number)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise refuse(f"it has format {state['format']!r}; this code reads format {CHECKPOINT_FORMAT} only")
    states = state.get("engines")
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states) or "diverged" not in state:
        raise refuse("its content is incomplete (no list of engine states, or no divergence flag)")
    if len(states) != len(engines):
        raise refuse(f"it holds {len(states)} seed(s), this trial trains {len(engines)}")
    for engine, engine_state in zip(engines, states, strict=True):
        if engine_state.get("format") != ENGINE_CHECKPOINT_FORMAT:
            raise refuse(f"its learner has format {engine_state.get('format')!r}; this code reads format "
                         f"{ENGINE_CHECKPOINT_FORMAT} only (a learner saved by other code cannot continue)")
        saved = engine_state.get("config")
        ours = engine.cfg.to_dict()
        if not isinstance(saved, dict):
            raise refuse("its learner holds no config")
        differing = sorted(k for k in set(ours) | set(saved)
                           if k not in RESTORE_MAY_DIFFER and ours.get(k, _MISSING) != saved.get(k, _MISSING))
        if differing:
            shown = ", ".join(f"{k}={_shown(saved, k)} (here {_shown(ours, k)})" for k in differing[:3])
            more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
            raise refuse(f"it was written by another config: {shown}{more}")
    return states


_MISSING = object()


def _shown(config: dict, key: str) -> str:
    return repr(config[key]) if key in config else "<absent>"
