"""Datasets from the Hugging Face Hub (the ids Flower Datasets uses), via ``datasets``.

Images are read undecoded (``Image(decode=False)``) and decoded here, so hub and
local files go through the same decoder and the same resize.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..images import decode_image, fit_images
from . import SourceArrays, stack

# Signature of ``datasets.load_dataset`` as used here; injectable for tests.
HubLoader = Callable[..., Any]


def load_hub_dataset(hub_id: str, subset: str | None, revision: str | None) -> Any:
    """Fetch ``hub_id`` with ``datasets.load_dataset`` (all splits, a ``DatasetDict``)."""
    from datasets import load_dataset

    return load_dataset(hub_id, name=subset, revision=revision)


def _image_array(value: Any, origin: str, shape: tuple[int, int, int]) -> np.ndarray:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            with open(value["path"], "rb") as handle:
                data = handle.read()
        if data is None:
            raise DatasetError(f"{origin}: image entry holds neither bytes nor a path")
        return decode_image(data, origin, shape)
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), origin, shape)
    # Array-valued columns (pixels stored as nested lists / arrays).
    array = np.asarray(value, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)[:3]
    return fit_images(array[None], shape)[0]


def _read_split(
    dataset: Any, origin: str, image_key: str, label_key: str, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    from datasets import Image as HubImage

    columns = list(dataset.column_names)
    for key, setting in ((image_key, "hf.image_key"), (label_key, "hf.label_key")):
        if key not in columns:
            raise DatasetError(
                f"{origin}: no column {key!r} (columns: {columns}); set "
                f"dataset.{setting} to the right one"
            )
    if isinstance(dataset.features[image_key], HubImage):
        dataset = dataset.cast_column(image_key, HubImage(decode=False))
    images: list[np.ndarray] = []
    labels: list[int] = []
    for batch in dataset.select_columns([image_key, label_key]).iter(batch_size=1024):
        for value, label in zip(batch[image_key], batch[label_key], strict=True):
            images.append(_image_array(value, f"{origin}[{len(images)}]", shape))
            if isinstance(label, str) or label is None:
                raise DatasetError(
                    f"{origin}[{len(labels)}]: label {label!r} is not an integer class id; "
                    "choose a dataset whose label column is a ClassLabel"
                )
            labels.append(int(label))
    return stack(images, labels, shape)


def read_hub(
    hub: Mapping[str, Any],
    split_names: Mapping[str, str],
    shape: tuple[int, int, int],
    loader: HubLoader | None = None,
) -> SourceArrays:
    """Download (or reuse Hugging Face's own cache of) a hub dataset and decode it.

    Parameters
    ----------
    hub : mapping
        ``id``, optional ``subset`` (config name) and ``revision``, ``image_key``,
        ``label_key``.
    split_names : mapping
        Canonical split (``train``, ``test``) to the hub's split name.
    shape : tuple of int
        Target (C, H, W) of every image.
    loader : callable, optional
        Replaces :func:`load_hub_dataset` (``loader(id, subset, revision)`` returning a
        mapping of split name to ``datasets.Dataset``); tests inject one.

    Raises
    ------
    DatasetError
        If the hub cannot be reached, or a split or column is missing.
    """
    hub_id = str(hub["id"])
    subset = hub.get("subset")
    revision = hub.get("revision")
    try:
        bundle = (loader or load_hub_dataset)(hub_id, subset, revision)
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(
            f"could not load {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}); with no network, set dataset.path to a local copy of the files "
            "and dataset.source to their format"
        ) from exc
    available = list(bundle.keys())
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for canonical, hub_split in split_names.items():
        if hub_split in available:
            origin = f"hf://{hub_id}/{hub_split}"
            splits[canonical] = _read_split(
                bundle[hub_split], origin, hub["image_key"], hub["label_key"], shape
            )
    if "train" not in splits:
        raise DatasetError(
            f"{hub_id!r} has no split {split_names.get('train')!r} (splits: {available}); "
            "set dataset.split_names.train to one of them"
        )
    names = None
    feature = bundle[split_names["train"]].features.get(hub["label_key"])
    if getattr(feature, "names", None):
        names = list(feature.names)
    return SourceArrays(splits, names)
