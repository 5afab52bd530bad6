"""Federated partitions with Flower Datasets' partitioners, plus local test splits.

``type`` selects the partitioner: ``iid`` (:class:`IidPartitioner`), ``dirichlet``
(:class:`DirichletPartitioner`, label shares per client drawn from Dir(alpha)) or
``kclass`` (:class:`PathologicalPartitioner`, exactly ``classes_per_client``
classes per client). All are seeded; the labels are shuffled with the same seed
before partitioning, because sources list samples grouped by class and the
partitioners take samples in dataset order.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from functools import cache
from typing import Any

import numpy as np

from ..settings import PartitionSettings
from .errors import DatasetError

PARTITION_TYPES = ("iid", "dirichlet", "kclass")


@cache
def _index_table_class() -> type:
    """Return a ``datasets.Dataset`` subclass tuned for the partitioners' access pattern.

    Partitioners call ``select(list_of_indices)``, which ``datasets`` fingerprints by
    hashing the list with dill (seconds per client at 50,000 samples), and read whole
    label columns, which ``datasets`` 4 hands out as a lazy column iterated row by
    row. Hashing the raw int64 bytes and converting the column once through Arrow
    gives the same results in milliseconds.
    """
    from datasets import Dataset

    class IndexTable(Dataset):
        def select(self, indices: Any, *args: Any, **kwargs: Any) -> Dataset:
            if kwargs.get("new_fingerprint") is None:
                raw = np.asarray(indices, dtype=np.int64).tobytes()
                digest = hashlib.sha256(self._fingerprint.encode() + raw).hexdigest()
                kwargs["new_fingerprint"] = digest[:16]
            return super().select(indices, *args, **kwargs)

        def __getitem__(self, key: Any) -> Any:
            if isinstance(key, str):
                return _column(self, key)
            return super().__getitem__(key)

    return IndexTable


def _column(table: Any, name: str) -> np.ndarray:
    """Return a whole column (index mapping applied) with one Arrow -> NumPy conversion."""
    return table.with_format("arrow")[:][name].to_numpy()


def _partitioner(partition: PartitionSettings, num_partitions: int, seed: int) -> Any:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    kind = partition.type
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partition.alpha),  # type: ignore[arg-type]
            min_partition_size=partition.min_partition_size,
            self_balancing=partition.self_balancing,
            seed=seed,
        )
    if kind == "kclass":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(partition.classes_per_client),  # type: ignore[arg-type]
            class_assignment_mode=partition.class_assignment,
            seed=seed,
        )
    raise DatasetError(
        f"partition.type={kind!r} is unknown; choose one of {', '.join(PARTITION_TYPES)}"
    )


def _fix_hint(partition: PartitionSettings) -> str:
    if partition.type == "dirichlet":
        return "raise partition.alpha, lower partition.min_partition_size or use fewer clients"
    if partition.type == "kclass":
        return "lower partition.classes_per_client or use fewer clients"
    return "use fewer clients or lower partition.min_partition_size"


def partition_indices(
    labels: np.ndarray, partition: PartitionSettings, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` disjoint client partitions.

    Parameters
    ----------
    labels : np.ndarray
        Label of every training sample.
    partition : PartitionSettings
        The ``partition.*`` settings (a ``conf/partition/*.yaml`` entry): ``type``
        iid | dirichlet (``alpha``, ``self_balancing``) | kclass (``classes_per_client``,
        ``class_assignment``),
        and ``min_partition_size``.
    num_partitions : int
        Number of clients.
    seed : int
        Seed of the shuffle and of the partitioner.

    Returns
    -------
    list of np.ndarray
        Sorted int64 indices per partition; together they cover every sample once.

    Raises
    ------
    DatasetError
        If the partitioner cannot satisfy the settings or a partition holds fewer
        than ``min_partition_size`` samples.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_partitions < 1:
        raise DatasetError(f"num_partitions={num_partitions}: must be at least 1")
    if num_partitions > len(labels):
        raise DatasetError(
            f"{num_partitions} partitions of {len(labels)} samples: use fewer clients"
        )
    partitioner = _partitioner(partition, num_partitions, seed)
    order = np.random.default_rng(seed).permutation(len(labels))
    table = _index_table_class().from_dict({"label": labels[order], "index": order})
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # Dirichlet resampling warns on each retry; the outcome is checked below.
            warnings.simplefilter("ignore", UserWarning)
            parts = [
                np.sort(_column(partitioner.load_partition(i), "index"))
                for i in range(num_partitions)
            ]
    except ValueError as exc:
        raise DatasetError(
            f"partition.type={partition.type!r} with {num_partitions} clients cannot be "
            f"built: {exc} — {_fix_hint(partition)}"
        ) from exc
    minimum = partition.min_partition_size or 1
    sizes = [len(p) for p in parts]
    if min(sizes) < minimum:
        smallest = int(np.argmin(sizes))
        raise DatasetError(
            f"partition {smallest} of {num_partitions} holds {sizes[smallest]} samples, "
            f"fewer than partition.min_partition_size={minimum}; {_fix_hint(partition)}"
        )
    return parts


def largest_local_test(train_size: int, test_fraction: float) -> int:
    """Return the most local test samples a client with ``train_size`` training samples holds.

    The inverse of :func:`client_split`'s rule (``round(n * test_fraction)`` of ``n``
    samples held out, at least one): the server bounds a client's local evaluation
    count by it, from the training examples the client declared.
    """
    if test_fraction <= 0.0:
        return 0
    return math.ceil(train_size * test_fraction / (1.0 - test_fraction)) + 1


def client_split(
    indices: np.ndarray,
    test_fraction: float,
    seed: int,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into sorted (train, local test) with a seeded shuffle.

    Parameters
    ----------
    indices : np.ndarray
        The client's sample indices.
    test_fraction : float
        Share held out for local testing. With at least two samples and a fraction
        in (0, 1), both parts get at least one sample.
    seed : int
        Seed of the shuffle.
    labels : np.ndarray, optional
        Labels of ``indices`` (same order); when given, the held-out share is taken
        per class (largest remainders), so the local test set has the client's
        label mix.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    rng = np.random.default_rng(seed)
    target = round(n * test_fraction)
    if n >= 2 and 0.0 < test_fraction < 1.0:
        target = min(max(target, 1), n - 1)
    target = min(max(target, 0), n)
    if labels is None:
        shuffled = rng.permutation(indices)
        return np.sort(shuffled[target:]), np.sort(shuffled[:target])
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (target / n) if n else counts * 0.0
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: target - int(take.sum())]] += 1
    test_parts, train_parts = [], []
    for cls, k in zip(classes, take, strict=True):
        members = rng.permutation(indices[labels == cls])
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    empty = np.zeros(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    test = np.sort(np.concatenate(test_parts)) if test_parts else empty
    return train, test
