"""Load a configured dataset as decoded uint8 splits, through the on-disk cache.

This is the one place that turns a ``conf/dataset/*.yaml`` entry into arrays: it
picks the source (local files in a given format, the Hugging Face Hub, or
scikit-learn), caches the decoded images, applies the label offset, checks labels
against ``num_classes`` and, for sources without a test split, holds out a seeded
stratified one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..settings import DatasetSettings
from .cache import load_or_build, resolve_cache_dir
from .errors import DatasetError
from .files import fingerprint, resolve_paths
from .formats import SourceArrays
from .formats.cifar_batches import read_cifar_batches
from .formats.gtsrb import read_gtsrb
from .formats.hub import HubLoader, read_hub
from .formats.idx import read_idx
from .formats.imagefolder import read_imagefolder
from .formats.sklearn import read_sklearn

FILE_SOURCES = ("imagefolder", "gtsrb", "idx", "cifar_batches")
SOURCES = ("hf", "sklearn", *FILE_SOURCES)
_DEFAULT_SPLITS = {"train": "train", "test": "test"}
_DEFAULT_HUB = {"subset": None, "revision": None, "image_key": "image", "label_key": "label"}


@dataclass(frozen=True)
class RawSplit:
    """One split as uint8 pixels (possibly a read-only memory map) and int64 labels.

    ``rows`` selects the split's rows of ``pixels`` when several splits share one
    array (a held-out test split cut from a single pool); None means all rows.
    """

    pixels: np.ndarray
    labels: np.ndarray
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Return the uint8 images at split positions ``indices`` (an in-memory copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            idx = self.rows[idx]
        return np.asarray(self.pixels[idx])

    def view(self) -> np.ndarray:
        """Return all images of the split without copying when no row selection applies."""
        if self.rows is None:
            return self.pixels
        return self.take(np.arange(len(self)))


@dataclass(frozen=True)
class RawDataset:
    """A dataset's train and test splits before normalisation."""

    train: RawSplit
    test: RawSplit
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None
    origin: str


def _path(dataset: DatasetSettings) -> str | list[str] | None:
    return list(dataset.path) if isinstance(dataset.path, tuple) else dataset.path


def effective_source(dataset: DatasetSettings) -> str:
    """Return the source actually used: a file format, ``hf`` or ``sklearn``.

    A file format with ``path: null`` falls back to the hub id in ``hf.id``.

    The schema checked ``dataset.source``, and a node's ``data-format`` is checked
    where it is read (:func:`flexmoe_core.data.local_node.node_dataset_settings`).

    Raises
    ------
    DatasetError
        If neither a path nor a hub id is given.
    """
    source = dataset.source
    hub_id = dataset.hf.id if dataset.hf is not None else None
    if source in FILE_SOURCES and dataset.path is None:
        if hub_id:
            return "hf"
        raise DatasetError(
            f"dataset {dataset.name!r}: dataset.path is null and no dataset.hf.id is "
            f"set; point dataset.path at the {source} files"
        )
    if source == "hf" and not hub_id:
        raise DatasetError("dataset.source=hf needs dataset.hf.id (a Hugging Face dataset id)")
    return source


def _hub_settings(dataset: DatasetSettings) -> dict[str, Any]:
    return {**_DEFAULT_HUB, **(dataset.hf.as_dict() if dataset.hf is not None else {})}


def _split_names(dataset: DatasetSettings) -> dict[str, str]:
    names = dataset.split_names.as_dict() if dataset.split_names is not None else {}
    return {**_DEFAULT_SPLITS, **names}


def _classes(dataset: DatasetSettings) -> list[str] | None:
    return None if dataset.classes is None else list(dataset.classes)


def _read(
    dataset: DatasetSettings,
    source: str,
    shape: tuple[int, int, int],
    hub_loader: HubLoader | None,
) -> SourceArrays:
    if source == "hf":
        return read_hub(_hub_settings(dataset), _split_names(dataset), shape, hub_loader)
    roots = resolve_paths(_path(dataset))
    if source == "imagefolder":
        return read_imagefolder(roots, shape, _split_names(dataset), _classes(dataset))
    if source == "gtsrb":
        return read_gtsrb(roots, shape)
    if source == "idx":
        return read_idx(roots, shape, dataset.idx_prefix)
    return read_cifar_batches(roots, shape)


def _cache_key(
    dataset: DatasetSettings, source: str, shape: tuple[int, int, int]
) -> dict[str, Any]:
    key: dict[str, Any] = {"name": dataset.name, "source": source, "shape": list(shape)}
    if source == "hf":
        key["hub"] = _hub_settings(dataset)
        key["split_names"] = _split_names(dataset)
        return key
    key["files"] = fingerprint(resolve_paths(_path(dataset)))
    if source == "imagefolder":
        key["split_names"] = _split_names(dataset)
        key["classes"] = _classes(dataset)
    elif source == "idx":
        key["idx_prefix"] = dataset.idx_prefix
    return key


def _origin(dataset: DatasetSettings, source: str) -> str:
    if source == "hf":
        return f"hf://{_hub_settings(dataset)['id']}"
    if source == "sklearn":
        return f"sklearn:{dataset.name}"
    return ", ".join(str(p) for p in resolve_paths(_path(dataset)))


def _load_splits(
    dataset: DatasetSettings,
    source: str,
    shape: tuple[int, int, int],
    hub_loader: HubLoader | None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str] | None]:
    if source == "sklearn":
        arrays = read_sklearn(dataset.name, shape)
        return arrays.splits, arrays.class_names

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        decoded = _read(dataset, source, shape, hub_loader)
        flat: dict[str, np.ndarray] = {}
        for split, (x, y) in decoded.splits.items():
            flat[f"{split}_x"], flat[f"{split}_y"] = x, y
        meta = {
            "splits": sorted(decoded.splits),
            "class_names": decoded.class_names,
            "origin": _origin(dataset, source),
        }
        return flat, meta

    cache_dir = resolve_cache_dir(dataset.cache_dir)
    key = _cache_key(dataset, source, shape)
    flat, meta = load_or_build(cache_dir, dataset.name, key, build)
    splits = {s: (flat[f"{s}_x"], flat[f"{s}_y"]) for s in meta["splits"]}
    return splits, meta.get("class_names")


def _check_labels(y: np.ndarray, num_classes: int, split: str, origin: str) -> None:
    if y.size == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low >= 0 and high < num_classes:
        return
    if low == 1 and high == num_classes:
        fix = "the labels look 1-based: set dataset.label_offset=1"
    elif high >= num_classes:
        fix = (
            f"set dataset.num_classes={high + 1} if the data really has that many "
            "classes, or check dataset.label_offset"
        )
    else:
        fix = "check dataset.label_offset (it is subtracted from every label)"
    raise DatasetError(
        f"{origin}: {split} labels span {low}..{high} but dataset.num_classes="
        f"{num_classes} allows 0..{num_classes - 1}; {fix}"
    )


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..len(y)-1 into sorted (train, test) with per-class shares.

    Raises
    ------
    DatasetError
        If ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"dataset.test_fraction={test_fraction}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _as_split(x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> RawSplit:
    return RawSplit(x, y if rows is None else y[rows], rows)


def load_raw(
    dataset: DatasetSettings, seed: int = 0, *, hub_loader: HubLoader | None = None
) -> RawDataset:
    """Load ``dataset`` as uint8 train/test splits (cached on disk).

    Parameters
    ----------
    dataset : DatasetSettings
        The run's ``dataset.*`` settings (a ``conf/dataset/*.yaml`` entry).
    seed : int
        Seed of the stratified test split for sources without one.
    hub_loader : callable, optional
        Replaces the Hugging Face download (tests inject an in-memory dataset).

    Returns
    -------
    RawDataset
        Splits whose pixels may be read-only memory maps of the cache.

    Raises
    ------
    DatasetError
        For a missing path, an unknown format, a corrupt file, labels outside
        ``0..num_classes-1``, or a single-split source without ``test_fraction``.
    """
    shape = dataset.input_shape
    source = effective_source(dataset)
    splits, class_names = _load_splits(dataset, source, shape, hub_loader)  # type: ignore[arg-type]
    origin = _origin(dataset, source)
    num_classes = dataset.num_classes
    offset = dataset.label_offset
    labelled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (x, y) in splits.items():
        labels = np.asarray(y, dtype=np.int64) - offset
        _check_labels(labels, num_classes, split, origin)
        labelled[split] = (x, labels)
    if "train" in labelled and "test" in labelled:
        train, test = _as_split(*labelled["train"]), _as_split(*labelled["test"])
    else:
        (only, (x, y)), *_ = labelled.items()
        fraction = dataset.test_fraction
        if fraction is None:
            raise DatasetError(
                f"{origin}: only a {only!r} split was found; add the missing split's "
                "files, or set dataset.test_fraction (e.g. 0.2) to hold out a seeded "
                "stratified test split from it"
            )
        train_rows, test_rows = stratified_split(y, float(fraction), seed)
        train, test = _as_split(x, y, train_rows), _as_split(x, y, test_rows)
    names = tuple(class_names) if class_names else None
    return RawDataset(train, test, num_classes, shape, names, origin)  # type: ignore[arg-type]
