"""CIFAR python batches (``data_batch_1..5``, ``test_batch``), e.g. cifar-10-python.tar.gz.

The batches are pickles. They are read with an unpickler that only admits the few
NumPy names such files need, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..files import iter_files
from ..images import fit_images
from . import SourceArrays

_TRAIN = re.compile(r"^data_batch_(\d+)$")
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _wanted(name: str) -> bool:
    base = PurePosixPath(name).name
    return bool(_TRAIN.match(base)) or base == "test_batch"


def _load_batch(data: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(
            f"{origin}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); the "
            "file is truncated or not a CIFAR python pickle — download it again"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{origin}: expected a dict in the CIFAR batch pickle")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = "labels" if "labels" in batch else "fine_labels"
    if "data" not in batch or label_key not in batch:
        raise DatasetError(
            f"{origin}: the CIFAR batch lacks 'data' or 'labels' (keys: {sorted(batch)})"
        )
    data_arr = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data_arr.ndim != 2 or data_arr.shape[1] != 3 * 32 * 32 or len(data_arr) != len(labels):
        raise DatasetError(
            f"{origin}: CIFAR batch data {data_arr.shape} / labels {labels.shape} are not "
            "(N, 3072) / (N,)"
        )
    return data_arr.reshape(-1, 3, 32, 32), labels


def read_cifar_batches(roots: Sequence[Path], shape: tuple[int, int, int]) -> SourceArrays:
    """Read ``data_batch_N`` (train, in N order) and ``test_batch`` (test).

    Raises
    ------
    DatasetError
        If no batch is found or a batch is corrupt.
    """
    train: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    test: list[tuple[np.ndarray, np.ndarray]] = []
    for entry in iter_files(roots, _wanted):
        base = PurePosixPath(entry.name).name
        arrays = _load_batch(entry.data, entry.origin)
        match = _TRAIN.match(base)
        if match:
            train[int(match[1])] = arrays
        else:
            test.append(arrays)
    if not train and not test:
        raise DatasetError(
            f"no CIFAR batches (data_batch_1..5, test_batch) under "
            f"{', '.join(str(r) for r in roots)}; point dataset.path at "
            "cifar-10-batches-py/ or cifar-10-python.tar.gz"
        )
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, parts in (("train", [train[k] for k in sorted(train)]), ("test", test)):
        if parts:
            x = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            splits[split] = (fit_images(x, shape), y)
    return SourceArrays(splits)
