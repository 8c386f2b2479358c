"""Shared test fixtures: CPU threads, a node cache of the test session's own, fake MNIST / CIFAR folders, and an
unreachable network."""

from __future__ import annotations

import os
import pickle
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.node_cache import CACHE_DIR_ENV

# two threads for one test process; one each when pytest-xdist runs several on the 2 cores
torch.set_num_threads(2 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1 else 1)

_UNREACHABLE_PROXY = "http://127.0.0.1:9"   # the discard port: nothing listens, connections are refused


@pytest.fixture(scope="session", autouse=True)
def session_node_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Node-cache files (data, shared task 1) of this test session only: tests, their subprocesses and Ray
    workers neither read a user's cache in /tmp nor leave files there."""
    path = tmp_path_factory.mktemp("node-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray for a test module (2 CPUs, no GPU, no dashboard, a small object store), its workers on a
    node cache of the module's own; yields that cache folder."""
    import ray

    cache = tmp_path_factory.mktemp("node-cache")
    env = {CACHE_DIR_ENV: str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # Ray's socket paths must stay short: /tmp/r<module-initial><pid>
    temp_dir = f"/tmp/r{request.module.__name__.rsplit('.', 1)[-1].removeprefix('test_')[:2]}{os.getpid()}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 * 2**20,
                 _temp_dir=temp_dir)
        try:
            yield cache
        finally:
            ray.shutdown()


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_fake_cifar(root: str | os.PathLike, kind: str = "cifar-100", n_train_per_class: int = 5,
                    n_test_per_class: int = 2, seed: int = 0) -> Path:
    """Write a tiny random-pixel CIFAR-10/100 folder in the on-disk format torchvision reads; return root."""
    if kind not in ("cifar-10", "cifar-100"):
        raise ValueError(f"kind must be 'cifar-10' or 'cifar-100', got {kind!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_classes = 100 if kind == "cifar-100" else 10

    def batch(n_per_class: int, name: str, parts: int = 1) -> list[dict]:
        labels = rng.permutation(np.repeat(np.arange(n_classes), n_per_class))
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        label_key = "fine_labels" if kind == "cifar-100" else "labels"
        # str keys: the real files are Python-2 pickles whose keys torchvision reads back as str (latin1)
        return [{"batch_label": f"{name} {i} of {parts}", "data": data[part], label_key: labels[part].tolist(),
                 "filenames": [f"{name}_{j}.png" for j in part]}
                for i, part in enumerate(np.array_split(np.arange(len(labels)), parts), start=1)]

    if kind == "cifar-100":
        folder = root / "cifar-100-python"
        (train,), (test,) = batch(n_train_per_class, "training batch"), batch(n_test_per_class, "testing batch")
        _dump(folder / "train", {**train, "coarse_labels": [y // 5 for y in train["fine_labels"]]})
        _dump(folder / "test", {**test, "coarse_labels": [y // 5 for y in test["fine_labels"]]})
        _dump(folder / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                                "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    else:
        folder = root / "cifar-10-batches-py"
        for i, train in enumerate(batch(n_train_per_class, "training batch", parts=5), start=1):
            _dump(folder / f"data_batch_{i}", train)
        _dump(folder / "test_batch", batch(n_test_per_class, "testing batch")[0])
        _dump(folder / "batches.meta", {"label_names": [f"class_{i}" for i in range(10)],
                                        "num_cases_per_batch": n_train_per_class * 2, "num_vis": 3072})
    return root


def make_fake_mnist(root: str | os.PathLike, n_train_per_class: int = 6, n_test_per_class: int = 2,
                    seed: int = 0) -> Path:
    """Write tiny random-pixel MNIST idx files where torchvision's MNIST looks (root/MNIST/raw); return root."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n_per_class in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), n_per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        # idx header: magic (0x08 = uint8, then the number of dimensions), then each size, big-endian
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, len(labels), 28, 28], ">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, len(labels)], ">i4").tobytes() + labels.tobytes())
    return root


@pytest.fixture
def fake_cifar_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir holding fake CIFAR-10 and CIFAR-100 folders that torchvision accepts despite their md5."""
    import torchvision.datasets.cifar as tv_cifar

    root = tmp_path / "data"
    make_fake_cifar(root, "cifar-100")
    make_fake_cifar(root, "cifar-10")
    # torchvision checks data files (CIFAR10._check_integrity) AND the meta file (_load_meta) through the
    # module's check_integrity; keep its "file exists" half so that missing files still count as missing
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make urllib (hence torchvision downloads) fail at once, as on a machine without network."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, _UNREACHABLE_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # urlopen caches its opener (and the proxies read from the environment) on first use
    monkeypatch.setattr(urllib.request, "_opener", None)
