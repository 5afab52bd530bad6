"""Federated partitions with Flower Datasets' partitioners, plus local test splits."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig


def partition_indices(
    labels: np.ndarray, cfg: DictConfig, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` disjoint client partitions.

    Parameters
    ----------
    labels : np.ndarray
        Label of every training sample.
    cfg : DictConfig
        A ``conf/partition/*.yaml`` entry: ``type`` iid | dirichlet | kclass.
    num_partitions : int
        Number of clients.
    seed : int
        Seed of the partitioner.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions}: must be at least 1")
    if cfg.type == "iid":
        rng = np.random.default_rng(seed)
        return [
            np.sort(p)
            for p in np.array_split(rng.permutation(len(labels)), num_partitions)
        ]
    if cfg.type == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cfg.alpha),
            min_partition_size=int(cfg.min_partition_size),
            self_balancing=False,
            seed=seed,
        )
    elif cfg.type == "kclass":
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(cfg.classes_per_client),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        raise ValueError(
            f"Unknown partition type {cfg.type!r}: choose iid, dirichlet or kclass"
        )
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.tolist(), "index": np.arange(len(labels)).tolist()}
    )
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
        for i in range(num_partitions)
    ]


def client_split(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into (train, local test) with a seeded shuffle."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    cut = int(round(len(shuffled) * test_fraction))
    return np.sort(shuffled[cut:]), np.sort(shuffled[:cut])
