"""Data once per node: the prepared per-task tensors, shared by every trial process on a machine.

The first trial on a node loads the protocol (and runs the frozen conv layers over it, for CIFAR)
under a file lock and writes the result to a node-local cache file; every later trial process
memory-maps that file (`torch.load(mmap=True, weights_only=True)`: the pages are shared through the OS page cache),
and a reused trial actor takes the tensors from this process's memo without touching the disk.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from filelock import FileLock

import tune_bir.data
from trainables.node_cache import cache_dir, cache_key, content_digest, fingerprint, save_atomically
from tune_bir.config import BIRConfig
from tune_bir.data import Split
from tune_bir.errors import ConfigError
from tune_bir.hidden import HiddenData, prepare_hidden_data
from tune_bir.safe_load import load_torch_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_MEMO_SIZE = 8
_memo: OrderedDict[tuple[str, str], HiddenData] = OrderedDict()
STATS = {"built": 0, "mapped": 0, "memo": 0}   # this process: cache files written / mapped / memo hits


@functools.cache
def _code_fingerprint() -> str:
    """Changes whenever the code that builds the tensors changes (stale cache files are never read)."""
    return fingerprint(Path(tune_bir.data.__file__).read_bytes(), inspect.getsource(prepare_hidden_data).encode())


def data_key(cfg: BIRConfig) -> str:
    """Everything the prepared tensors depend on, as a short digest (cfg must be resolved)."""
    parts = {"format": CACHE_FORMAT, "code": _code_fingerprint(), "experiment": cfg.experiment,
             "data_dir": str(Path(cfg.data_dir).expanduser().resolve()), "seed": cfg.seed, "tasks": cfg.tasks,
             "val_fraction": cfg.val_fraction}
    if cfg.protocol_family == "CIFAR":
        parts["conv"] = content_digest(cfg.pretrained_conv)   # by content: the same file elsewhere serves too
    return cache_key(parts)


def hidden_data(cfg: BIRConfig, device: torch.device) -> HiddenData:
    """The protocol of a resolved config on `device`: memo, else node cache file, else a real load."""
    key = data_key(cfg)
    memo_key = (key, str(device))
    if memo_key in _memo:
        STATS["memo"] += 1
        _memo.move_to_end(memo_key)
        return _memo[memo_key]
    folder = cache_dir()
    path = folder / f"{cfg.experiment}-{key}.pt"
    with FileLock(str(path) + ".lock"):
        data = _map(path, device) if path.exists() else None
        if data is not None:
            STATS["mapped"] += 1
        else:
            data = _build(cfg, device)
            save_atomically(_to_payload(data), path)
            STATS["built"] += 1
            log.info("cached %s data for seed %d in %s", cfg.experiment, cfg.seed, path)
    _memo[memo_key] = data
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return data


def _map(path: Path, device: torch.device) -> HiddenData | None:
    """The cached tensors, memory-mapped; None (rebuild) when the file is damaged or not ours."""
    try:
        return _from_payload(load_torch_file(path, "data cache", map_location="cpu", mmap=True), device)
    except (ConfigError, KeyError, TypeError, IndexError, AttributeError) as err:
        log.warning("rebuilding unreadable data cache %s: %s", path, err)
        return None


def _build(cfg: BIRConfig, device: torch.device) -> HiddenData:
    protocol = tune_bir.data.load_protocol(cfg.experiment, data_dir=cfg.data_dir, seed=cfg.seed,
                                           n_tasks=cfg.tasks, val_fraction=cfg.val_fraction)
    conv = None
    if cfg.protocol_family == "CIFAR":
        from tune_bir.nets import load_conv_layers

        conv = load_conv_layers(cfg.pretrained_conv, device)
    return prepare_hidden_data(protocol, conv, device)


def _to_payload(data: HiddenData) -> dict:
    def splits(tasks: list[Split]) -> list[list[torch.Tensor]]:
        return [[t.x.detach().cpu().contiguous(), t.y.detach().cpu().contiguous()] for t in tasks]

    return {"format": CACHE_FORMAT, "train": splits(data.train), "val": splits(data.val),
            "test": splits(data.test), "in_shape": list(data.in_shape), "image_pixels": data.image_pixels,
            "n_classes": data.n_classes, "classes_per_task": data.classes_per_task}


def _from_payload(payload: dict, device: torch.device) -> HiddenData:
    def splits(items: list[list[torch.Tensor]]) -> list[Split]:
        return [Split(x.to(device), y.to(device)) for x, y in items]

    return HiddenData(splits(payload["train"]), splits(payload["val"]), splits(payload["test"]),
                      tuple(payload["in_shape"]), int(payload["image_pixels"]), int(payload["n_classes"]),
                      int(payload["classes_per_task"]))


def clear_memo() -> None:
    """Forget this process's memo (the node cache files stay)."""
    _memo.clear()
