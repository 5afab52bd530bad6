"""A deployed node's own data: the whole dataset at a local path, split train/local test.

A SuperNode on a real device does not hold a partition of a shared dataset: it holds
its own files. Its node config names them (``data-path``, optionally ``data-format``);
they are read with the run's dataset settings (input shape, classes, normalisation),
so every node feeds the model the same kind of tensors and labels (an image-folder
node names its class folders as the dataset's ``classes`` list does, or by label
number 0..num_classes-1 when the dataset has none). All samples found at the path
(its train and test splits, if it has both) form the node's pool; a seeded stratified
share of it (``partition.local_test_fraction``) is held out as the local test split.
An edge node has no federation-wide test set, so its global test split is empty and
it does not contribute to ``global_acc``.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from ..settings import DatasetSettings, PartitionSettings
from .errors import DatasetError
from .federated import ClientData
from .partition import client_split
from .raw import FILE_SOURCES, load_raw
from .sources import ArrayDataset, Normaliser

# Seed offset of the local test split, apart from the partition-based clients' one.
_SPLIT_STREAM = 104_729


def node_dataset_settings(
    dataset: DatasetSettings, data_path: str, data_format: str | None = None
) -> DatasetSettings:
    """Return the run's dataset settings pointed at a node's own files.

    Parameters
    ----------
    dataset : DatasetSettings
        The run's ``dataset`` settings (shape, classes, preprocessing).
    data_path : str
        The node's folder, archive or glob (node config ``data-path``).
    data_format : str, optional
        The files' format (node config ``data-format``); default: the run dataset's
        ``source`` when that is a file format.

    Raises
    ------
    DatasetError
        If no file format is known for the node's files.
    """
    source = data_format or dataset.source
    if source not in FILE_SOURCES:
        raise DatasetError(
            f"data-path={data_path!r} needs a file format, but the run's dataset "
            f"{dataset.name!r} has source={source!r}; set "
            f"data-format=<{'|'.join(FILE_SOURCES)}> in the SuperNode's node config"
        )
    classes = dataset.classes
    if source == "imagefolder" and not classes:
        # Labels must not depend on which classes a node happens to hold: without a
        # class list, sorted folder names of a node with classes 4..9 would become
        # labels 0..5. Folders are then named by label number, 0..num_classes-1.
        classes = tuple(str(i) for i in range(dataset.num_classes))
    # Every sample at the path is pooled below, so the dataset's own test split (or
    # a held-out one for single-split sources) only matters for reading the files.
    test_fraction = 0.5 if dataset.test_fraction is None else dataset.test_fraction
    return dataclasses.replace(
        dataset, source=source, path=str(data_path), classes=classes, test_fraction=test_fraction
    )


@lru_cache(maxsize=2)
def _load(dataset: DatasetSettings, test_fraction: float, seed: int, client_key: int) -> ClientData:
    raw = load_raw(dataset, seed)
    pixels = np.concatenate(
        [raw.train.take(np.arange(len(raw.train))), raw.test.take(np.arange(len(raw.test)))]
    )
    labels = np.concatenate([raw.train.labels, raw.test.labels])
    if len(labels) < 2:
        raise DatasetError(
            f"{raw.origin}: {len(labels)} sample(s) found; a node needs at least two "
            "(one to train on, one to test on)"
        )
    train_idx, test_idx = client_split(
        np.arange(len(labels)),
        test_fraction,
        seed + _SPLIT_STREAM * (client_key + 1),
        labels=labels,
    )
    normaliser = Normaliser.from_settings(dataset.preprocess, raw.input_shape[0])
    empty = np.zeros((0, *raw.input_shape), dtype=np.float32)
    return ClientData(
        ArrayDataset(normaliser(pixels[train_idx]), labels[train_idx]),
        ArrayDataset(normaliser(pixels[test_idx]), labels[test_idx]),
        ArrayDataset(empty, np.zeros(0, dtype=np.int64)),
        raw.num_classes,
        raw.input_shape,
    )


def load_node_data(
    dataset: DatasetSettings,
    partition: PartitionSettings,
    data_path: str,
    seed: int,
    client_key: int,
    data_format: str | None = None,
) -> ClientData:
    """Return a deployed node's data: all samples at ``data_path``, split train/local test.

    Parameters
    ----------
    dataset : DatasetSettings
        The run's ``dataset`` settings.
    partition : PartitionSettings
        The run's ``partition`` settings; only ``local_test_fraction`` is used.
    data_path : str
        Node config ``data-path``.
    seed : int
        The run's seed.
    client_key : int
        The node's stable key; seeds its local test split.
    data_format : str, optional
        Node config ``data-format``.

    Raises
    ------
    DatasetError
        If the files cannot be read, their labels do not fit the run's classes, or
        fewer than two samples are found.
    """
    node_dataset = node_dataset_settings(dataset, data_path, data_format)
    return _load(node_dataset, partition.local_test_fraction, int(seed), int(client_key))
