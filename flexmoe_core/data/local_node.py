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

import json
from functools import lru_cache

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .errors import DatasetError
from .federated import ClientData
from .partition import client_split
from .raw import FILE_SOURCES, load_raw
from .sources import ArrayDataset, Normaliser

# Seed offset of the local test split, apart from the partition-based clients' one.
_SPLIT_STREAM = 104_729


def node_dataset_config(
    dataset_cfg: DictConfig, data_path: str, data_format: str | None = None
) -> DictConfig:
    """Return the run's dataset settings pointed at a node's own files.

    Parameters
    ----------
    dataset_cfg : DictConfig
        The run's ``dataset`` section (shape, classes, preprocessing).
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
    source = data_format or str(dataset_cfg.get("source"))
    if source not in FILE_SOURCES:
        raise DatasetError(
            f"data-path={data_path!r} needs a file format, but the run's dataset "
            f"{dataset_cfg.get('name')!r} has source={source!r}; set "
            f"data-format=<{'|'.join(FILE_SOURCES)}> in the SuperNode's node config"
        )
    cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
    assert isinstance(cfg, dict)
    cfg["source"] = source
    cfg["path"] = str(data_path)
    if source == "imagefolder" and not cfg.get("classes"):
        # Labels must not depend on which classes a node happens to hold: without a
        # class list, sorted folder names of a node with classes 4..9 would become
        # labels 0..5. Folders are then named by label number, 0..num_classes-1.
        cfg["classes"] = [str(i) for i in range(int(cfg["num_classes"]))]
    # Every sample at the path is pooled below, so the dataset's own test split (or
    # a held-out one for single-split sources) only matters for reading the files.
    if cfg.get("test_fraction") is None:
        cfg["test_fraction"] = 0.5
    return OmegaConf.create(cfg)


@lru_cache(maxsize=2)
def _load(dataset_key: str, test_fraction: float, seed: int, client_key: int) -> ClientData:
    cfg = OmegaConf.create(json.loads(dataset_key))
    raw = load_raw(cfg, seed)
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
    normaliser = Normaliser.from_config(cfg.preprocess, raw.input_shape[0])
    empty = np.zeros((0, *raw.input_shape), dtype=np.float32)
    return ClientData(
        ArrayDataset(normaliser(pixels[train_idx]), labels[train_idx]),
        ArrayDataset(normaliser(pixels[test_idx]), labels[test_idx]),
        ArrayDataset(empty, np.zeros(0, dtype=np.int64)),
        raw.num_classes,
        raw.input_shape,
    )


def load_node_data(
    dataset_cfg: DictConfig,
    partition_cfg: DictConfig,
    data_path: str,
    seed: int,
    client_key: int,
    data_format: str | None = None,
) -> ClientData:
    """Return a deployed node's data: all samples at ``data_path``, split train/local test.

    Parameters
    ----------
    dataset_cfg : DictConfig
        The run's ``dataset`` section.
    partition_cfg : DictConfig
        The run's ``partition`` section; only ``local_test_fraction`` is used.
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
    cfg = node_dataset_config(dataset_cfg, data_path, data_format)
    key = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    return _load(key, float(partition_cfg.local_test_fraction), int(seed), int(client_key))
