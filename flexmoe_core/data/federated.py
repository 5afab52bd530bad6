"""One client's view of the federated data, cached per process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .partition import client_split, partition_indices
from .sources import ArrayDataset, DatasetSplits, load_dataset


@dataclass(frozen=True)
class ClientData:
    """A client's training split, local held-out split and the global test split."""

    train: ArrayDataset
    local_test: ArrayDataset
    global_test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]


def _key(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


@lru_cache(maxsize=4)
def _dataset(dataset_key: str, seed: int) -> DatasetSplits:
    return load_dataset(OmegaConf.create(json.loads(dataset_key)), seed)


@lru_cache(maxsize=8)
def _partitions(
    dataset_key: str, partition_key: str, num: int, seed: int
) -> list[np.ndarray]:
    labels = _dataset(dataset_key, seed).train.y
    return partition_indices(
        labels, OmegaConf.create(json.loads(partition_key)), num, seed
    )


def load_client_data(
    dataset_cfg: DictConfig,
    partition_cfg: DictConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> ClientData:
    """Return partition ``partition_id`` of ``num_partitions``, split train/local test.

    Raises
    ------
    ValueError
        If the partition id is out of range or the partition is smaller than
        ``partition_cfg.min_partition_size``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    splits = _dataset(_key(dataset_cfg), seed)
    parts = _partitions(_key(dataset_cfg), _key(partition_cfg), num_partitions, seed)
    indices = parts[partition_id]
    minimum = int(partition_cfg.get("min_partition_size", 1))
    if len(indices) < max(minimum, 2):
        raise ValueError(
            f"partition {partition_id} of {num_partitions} holds {len(indices)} samples, "
            f"fewer than min_partition_size={minimum}; use fewer clients or another partition"
        )
    train_idx, test_idx = client_split(
        indices,
        float(partition_cfg.local_test_fraction),
        seed + 7919 * (partition_id + 1),
    )
    return ClientData(
        splits.train.subset(train_idx),
        splits.train.subset(test_idx),
        splits.test,
        splits.num_classes,
        splits.input_shape,
    )
