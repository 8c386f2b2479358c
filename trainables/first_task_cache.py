"""Task 1 once per node and first-task config: the trials of a sweep share it.

Exaggeration acts on replayed memories, so from task 2 on; every trial of a sweep has the same base
config and seed, so every trial trains task 1 to the very same learner. The first trial on a node to
finish task 1 writes that learner (and its task-1 metrics) to a node-local cache file; later trials
with the same first-task config adopt it (`Engine.adopt_first_task`, bit-identical to training it)
and begin at task 2. Two trials that start together both train task 1 (no waiting on each other);
the files are written atomically, so either copy serves.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

import tune_bir
from trainables.node_cache import cache_dir, cache_key, content_digest, fingerprint, save_atomically
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.safe_load import load_torch_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
STATS = {"trained": 0, "adopted": 0}   # this process: first tasks trained (and cached) / adopted
SHARED_KEY = "first_task_shared"       # result key: 1.0 when this step adopted task 1 instead of training it


@functools.cache
def _code_fingerprint() -> str:
    """Changes whenever the engine's code changes: a learner trained by other code is never adopted."""
    sources = sorted(Path(tune_bir.__file__).parent.glob("*.py"))
    return fingerprint(torch.__version__.encode(), *(part for src in sources for part in (src.name.encode(),
                                                                                          src.read_bytes())))


def first_task_key(engine: Engine) -> str:
    """Everything task 1 depends on: the first-task config fields, the device, the code and, for a protocol
    seen through the frozen conv layers, the CONTENT of their file (re-running `pretrain` to the same path
    gives other features, so another task-1 learner)."""
    parts = {"format": CACHE_FORMAT, "code": _code_fingerprint(), "device": str(engine.device),
             "config": engine.cfg.first_task_fields()}
    if engine.conv is not None:
        parts["conv"] = content_digest(engine.cfg.pretrained_conv)
    return cache_key(parts)


def shareable(engine: Engine, segment_iters: int | None) -> bool:
    """Task 1 can be shared when the engine has not trained yet and a step is a whole task."""
    whole_tasks = segment_iters is None or segment_iters >= engine.cfg.iters
    return whole_tasks and engine.task == 0 and engine.iter_in_task == 0 and engine.n_tasks > 1


def _read(path: Path, device: torch.device) -> dict | None:
    if not path.exists():
        return None
    try:
        cached = load_torch_file(path, "first-task cache", map_location=device, verify=True)
    except (OSError, ConfigError) as err:
        # damaged (e.g. a node that died while writing without the atomic rename): train instead
        log.warning("ignoring unreadable first-task cache: %s", err)
        return None
    return cached if isinstance(cached, dict) and cached.get("format") == CACHE_FORMAT else None


def train_or_adopt_first_task(engine: Engine) -> dict[str, float]:
    """Task 1 of a fresh engine: adopted from the node cache when there, else trained and cached."""
    start = time.perf_counter()
    path = cache_dir() / f"first-task-{engine.cfg.experiment}-{first_task_key(engine)}.pt"
    cached = _read(path, engine.device)
    if cached is not None:
        engine.adopt_first_task(cached["engine"])
        STATS["adopted"] += 1
        return cached["metrics"] | {"time_this_step_s": time.perf_counter() - start, SHARED_KEY: 1.0}
    metrics = engine.train_segment(None)
    save_atomically({"format": CACHE_FORMAT, "engine": engine.state_dict(), "metrics": metrics}, path)
    STATS["trained"] += 1
    return metrics | {SHARED_KEY: 0.0}
