"""Federated partitions (IID, Dirichlet, k-class), local test splits, label counts and
the label-distribution plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_support import dataset_cfg, require

from flexmoe_core.config import load_settings
from flexmoe_core.data import (
    DatasetError,
    client_split,
    label_counts,
    load_client_data,
    load_raw,
    partition_indices,
    plot_label_distribution,
)
from flexmoe_core.settings import PartitionSettings

pytestmark = pytest.mark.usefixtures("isolated_data_caches")

LABELS = np.repeat(np.arange(10), 300)  # 3,000 samples, grouped by class like real sources


def _part(kind: str, **extra: object):
    return PartitionSettings.from_mapping(
        {"type": kind, "min_partition_size": 10, "local_test_fraction": 0.2, **extra}
    )


def _skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    mixes = [np.bincount(labels[p], minlength=k) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))


@pytest.mark.parametrize(
    "cfg",
    [_part("iid"), _part("dirichlet", alpha=0.8), _part("kclass", classes_per_client=4)],
    ids=["iid", "dirichlet", "kclass"],
)
def test_partitions_are_disjoint_covering_and_seeded(cfg) -> None:
    parts = partition_indices(LABELS, cfg, 10, seed=0)
    assert len(parts) == 10
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS)
    assert np.array_equal(np.sort(everything), np.arange(len(LABELS)))
    again = partition_indices(LABELS, cfg, 10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, cfg, 10, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_partitions_mix_classes_evenly() -> None:
    parts = partition_indices(LABELS, _part("iid"), 10, seed=0)
    assert {len(p) for p in parts} == {300}
    assert _skew(parts, LABELS) < 0.1  # sources list samples by class: shuffled first


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [
        np.mean([_skew(partition_indices(LABELS, _part("dirichlet", alpha=a), 10, s), LABELS)
                 for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]  # fmt: skip
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


@pytest.mark.parametrize("k", [1, 2, 4])
def test_kclass_partitions_hold_exactly_k_classes(k: int) -> None:
    parts = partition_indices(LABELS, _part("kclass", classes_per_client=k), 10, seed=3)
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * 10


def test_partition_errors_name_the_fix() -> None:
    with pytest.raises(DatasetError, match="min_partition_size"):
        partition_indices(LABELS, _part("iid", min_partition_size=400), 10, 0)
    with pytest.raises(DatasetError, match="alpha"):
        partition_indices(LABELS, _part("dirichlet", alpha=0.01, min_partition_size=250), 10, 0)
    with pytest.raises(DatasetError, match="classes_per_client"):
        partition_indices(LABELS, _part("kclass", classes_per_client=11), 10, 0)
    with pytest.raises(DatasetError, match=r"partition\.type='shards'"):
        partition_indices(LABELS, _part("shards"), 10, 0)
    with pytest.raises(DatasetError, match="fewer clients"):
        partition_indices(LABELS[:5], _part("iid", min_partition_size=1), 6, 0)


def test_client_split_is_stratified_disjoint_and_never_empty() -> None:
    indices = np.arange(100, 200)
    labels = np.repeat([0, 1, 2, 3], 25)
    train, test = client_split(indices, 0.2, seed=5, labels=labels)
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    assert np.bincount(labels[test - 100]).tolist() == [5, 5, 5, 5]
    train, test = client_split(np.arange(3), 0.05, seed=0)
    assert len(test) == 1 and len(train) == 2
    again = client_split(indices, 0.2, seed=5, labels=labels)
    assert np.array_equal(again[1], client_split(indices, 0.2, seed=5, labels=labels)[1])


def test_client_data_too_small_partition() -> None:
    cfg = load_settings("dataset=digits partition=iid")
    with pytest.raises(DatasetError, match="min_partition_size"):
        load_client_data(cfg.dataset, cfg.partition, 0, 1000, seed=0)
    with pytest.raises(DatasetError, match="partition-id"):
        load_client_data(cfg.dataset, cfg.partition, 5, 5, seed=0)


def test_label_counts_match_client_data_and_plot(tmp_path: Path) -> None:
    cfg = load_settings("dataset=digits partition=kclass partition.classes_per_client=3")
    counts = label_counts(cfg.dataset, cfg.partition, 6, seed=2)
    assert counts.shape == (6, 10)
    assert counts.sum() == len(load_raw(cfg.dataset, 2).train)
    assert ((counts > 0).sum(axis=1) == 3).all()
    data = load_client_data(cfg.dataset, cfg.partition, 4, 6, seed=2)
    mine = np.bincount(np.concatenate([data.train.y, data.local_test.y]), minlength=10)
    assert np.array_equal(mine, counts[4])
    out = tmp_path / "plots" / "labels.png"
    plot_label_distribution(counts, out, "digits, 3 classes per client")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wide = np.random.default_rng(0).integers(0, 50, (12, 43))  # no legend past 20 classes
    plot_label_distribution(wide, tmp_path / "wide.pdf", "43 classes")
    assert (tmp_path / "wide.pdf").stat().st_size > 0
    with pytest.raises(ValueError, match="clients x classes"):
        plot_label_distribution(np.array([1, 2]), tmp_path / "bad.png", "bad")


def test_paper_partitions_on_real_cifar10(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.getbasetemp() / "flexmoe-data-cache"  # shared with sources tests
    cfg = dataset_cfg("cifar10", cache, path=require("cifar10_jpg"))
    labels = load_raw(cfg).train.labels
    kclass = partition_indices(labels, _part("kclass", classes_per_client=4), 10, seed=0)
    assert [len(np.unique(labels[p])) for p in kclass] == [4] * 10
    assert sum(len(p) for p in kclass) == 50_000
    dirichlet = partition_indices(labels, _part("dirichlet", alpha=0.8), 10, seed=0)
    assert np.array_equal(np.sort(np.concatenate(dirichlet)), np.arange(50_000))
    assert _skew(dirichlet, labels) > _skew(partition_indices(labels, _part("iid"), 10, 0), labels)
