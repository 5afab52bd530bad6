"""Datasets, preprocessing and federated partitions (seeded and reproducible)."""

from .partition import client_split, partition_indices
from .sources import ArrayDataset, DatasetSplits, load_dataset
from .federated import ClientData, load_client_data

__all__ = [
    "ArrayDataset",
    "ClientData",
    "DatasetSplits",
    "client_split",
    "load_client_data",
    "load_dataset",
    "partition_indices",
]
