"""Dataset sources: load a dataset of the config into normalised arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


@dataclass(frozen=True)
class ArrayDataset:
    """Images ``x`` as float32 (N, C, H, W), normalised, and int64 labels ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the samples at ``indices``."""
        return ArrayDataset(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits with its label count and input shape."""

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]


def normalise(images: np.ndarray, preprocess: DictConfig) -> np.ndarray:
    """Scale raw pixels (N, C, H, W) to ``(x / scale - mean) / std`` per channel."""
    x = images.astype(np.float32) / float(preprocess.scale)
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(len(idx) * test_fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_sklearn_digits(cfg: DictConfig, seed: int) -> DatasetSplits:
    """Return scikit-learn's 8x8 digits, split into train/test by a seeded stratified cut."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x = normalise(images, cfg.preprocess)
    train_idx, test_idx = _stratified_split(labels, float(cfg.test_fraction), seed)
    return DatasetSplits(
        ArrayDataset(x[train_idx], labels[train_idx]),
        ArrayDataset(x[test_idx], labels[test_idx]),
        int(cfg.num_classes),
        (1, 8, 8),
    )


def load_dataset(cfg: DictConfig, seed: int = 0) -> DatasetSplits:
    """Load the dataset described by ``cfg`` (a ``conf/dataset/*.yaml`` entry)."""
    if cfg.source == "sklearn" and cfg.name == "digits":
        return load_sklearn_digits(cfg, seed)
    raise ValueError(
        f"Unknown dataset source {cfg.source!r} for dataset {cfg.name!r}; "
        "see conf/dataset/ for the supported entries"
    )
