"""Datasets, preprocessing and federated partitions (seeded and reproducible)."""

from ..plots import plot_label_distribution
from .augment import build_augment, random_crop_flip
from .errors import DatasetError
from .federated import ClientData, evaluation_subset, label_counts, load_client_data
from .partition import client_split, partition_indices
from .raw import RawDataset, RawSplit, load_raw
from .sources import ArrayDataset, DatasetSplits, Normaliser, load_dataset, normalise

__all__ = [
    "ArrayDataset",
    "ClientData",
    "DatasetError",
    "DatasetSplits",
    "Normaliser",
    "RawDataset",
    "RawSplit",
    "build_augment",
    "client_split",
    "evaluation_subset",
    "label_counts",
    "load_client_data",
    "load_dataset",
    "load_raw",
    "normalise",
    "partition_indices",
    "plot_label_distribution",
    "random_crop_flip",
]
