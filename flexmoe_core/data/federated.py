"""One client's view of the federated data, and the federation's label counts.

Per process, the decoded dataset and the partitions are kept in small LRU caches;
across processes and runs the decoded dataset comes from the on-disk cache as a
memory map, so each client process reads and normalises only its own partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..settings import DatasetSettings, PartitionSettings
from .errors import DatasetError
from .groups import ClientGroups
from .partition import client_split, partition_indices
from .raw import RawDataset, load_raw
from .sources import ArrayDataset, Normaliser


@dataclass(frozen=True)
class ClientData:
    """A client's training split, local held-out split and the global test split."""

    train: ArrayDataset
    local_test: ArrayDataset
    global_test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]


@lru_cache(maxsize=4)
def _raw(dataset: DatasetSettings, seed: int) -> RawDataset:
    return load_raw(dataset, seed)


@lru_cache(maxsize=8)
def _partitions(
    dataset: DatasetSettings, partition: PartitionSettings, num: int, seed: int
) -> tuple[np.ndarray, ...]:
    labels = _raw(dataset, seed).train.labels
    parts = partition_indices(labels, partition, num, seed)
    cap = partition.max_client_samples
    if cap:  # CPU-scale runs: keep a seeded random share of each client's partition
        parts = [
            np.sort(np.random.default_rng([seed, i, 104_729]).choice(p, int(cap), replace=False))
            if len(p) > int(cap)
            else p
            for i, p in enumerate(parts)
        ]
    return tuple(parts)


def load_client_data(
    dataset: DatasetSettings,
    partition: PartitionSettings,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> ClientData:
    """Return partition ``partition_id`` of ``num_partitions``, split train/local test.

    With ``partition.groups``, every split is seen through the client's group
    transform (:mod:`flexmoe_core.data.groups`).

    The global test split is normalised lazily: ``global_test.subset(idx)`` reads
    and converts only the rows asked for.

    Raises
    ------
    DatasetError
        If the partition id is out of range, the partition is smaller than
        ``partition.min_partition_size``, or the dataset cannot be loaded.
    """
    if not 0 <= partition_id < num_partitions:
        raise DatasetError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    raw = _raw(dataset, seed)
    indices = _partitions(dataset, partition, num_partitions, seed)[partition_id]
    minimum = partition.min_partition_size
    if len(indices) < max(minimum, 2):
        raise DatasetError(
            f"partition {partition_id} of {num_partitions} holds {len(indices)} samples, "
            f"fewer than min_partition_size={max(minimum, 2)}; use fewer clients or "
            "another partition"
        )
    train_idx, test_idx = client_split(
        indices,
        partition.local_test_fraction,
        seed + 7919 * (partition_id + 1),
        labels=raw.train.labels[indices],
    )
    normaliser = Normaliser.from_settings(dataset.preprocess, raw.input_shape[0])
    labels = raw.train.labels

    groups = ClientGroups.from_settings(partition.groups, num_partitions)

    def part(data: ArrayDataset) -> ArrayDataset:
        if groups is None:
            return data
        return groups.apply(data, groups.group_of(partition_id), seed, raw.num_classes)

    def train_part(idx: np.ndarray) -> ArrayDataset:
        return part(ArrayDataset(normaliser(raw.train.take(idx)), labels[idx]))

    return ClientData(
        train_part(train_idx),
        train_part(test_idx),
        part(ArrayDataset.from_pixels(raw.test.view(), raw.test.labels, normaliser)),
        raw.num_classes,
        raw.input_shape,
    )


def label_counts(
    dataset: DatasetSettings, partition: PartitionSettings, num_partitions: int, seed: int
) -> np.ndarray:
    """Return the clients x classes table of training-sample counts per partition.

    Counts cover each client's whole partition (its training and local test
    samples), exactly as :func:`load_client_data` partitions it.
    """
    raw = _raw(dataset, seed)
    parts = _partitions(dataset, partition, num_partitions, seed)
    labels = raw.train.labels
    return np.stack([np.bincount(labels[p], minlength=raw.num_classes) for p in parts])


def evaluation_subset(split: ArrayDataset, limit: int, seed: int) -> ArrayDataset:
    """Return a seeded random subset of at most ``limit`` samples (all if ``limit <= 0``).

    Test splits are often stored class by class, so a prefix would hold few classes.
    """
    if limit <= 0 or len(split) <= limit:
        return split
    return split.subset(
        np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False))
    )
