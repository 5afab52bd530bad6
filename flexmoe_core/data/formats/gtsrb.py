"""The official GTSRB layout: ``Final_Training``/``Final_Test`` with GT-*.csv labels.

Train images are ``Final_Training/Images/000NN/*.ppm`` labelled by ``GT-000NN.csv``
beside them; test images are ``Final_Test/Images/*.ppm`` labelled by
``GT-final_test.csv`` (shipped separately as ``GTSRB_Final_Test_GT.zip``, so it may
sit anywhere among the configured paths). CSVs are ``;``-separated with columns
``Filename`` and ``ClassId``; the unlabelled ``GT-final_test.test.csv`` is ignored.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DatasetError
from ..files import iter_files
from ..images import IMAGE_SUFFIXES, decode_image
from . import SourceArrays, stack

_TRAIN_DIR = "Final_Training"
_TEST_DIR = "Final_Test"
_TEST_CSV_PREFIX = "gt-final_test"


def _wanted(name: str) -> bool:
    path = PurePosixPath(name)
    if path.name.startswith("."):
        return False
    return path.suffix.lower() == ".csv" or path.suffix.lower() in IMAGE_SUFFIXES


def _split_of(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if _TRAIN_DIR in parts:
        return "train"
    if _TEST_DIR in parts:
        return "test"
    return None


def _parse_labels(data: bytes, origin: str) -> dict[str, int] | None:
    """Return Filename -> ClassId of one GT CSV, or None if it has no ClassId column."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{origin}: not a text CSV file ({exc}); replace it") from exc
    reader = csv.DictReader(io.StringIO(text), delimiter=";")
    if not reader.fieldnames or "ClassId" not in reader.fieldnames:
        return None
    if "Filename" not in reader.fieldnames:
        raise DatasetError(f"{origin}: has a ClassId column but no Filename column")
    labels: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        try:
            labels[row["Filename"].strip()] = int(row["ClassId"])
        except (TypeError, ValueError) as exc:
            raise DatasetError(
                f"{origin}, line {line}: ClassId {row.get('ClassId')!r} is not an "
                "integer; the CSV is corrupt — replace it with the official file"
            ) from exc
    return labels


def read_gtsrb(roots: Sequence[Path], shape: tuple[int, int, int]) -> SourceArrays:
    """Read the official GTSRB train and test folders (or archives of them).

    Raises
    ------
    DatasetError
        If no image is found, an image has no label row, or a CSV is corrupt.
    """
    by_dir: dict[str, dict[str, int]] = {}
    test_labels: dict[str, int] = {}
    images: list[tuple[str, str, np.ndarray]] = []
    for entry in iter_files(roots, _wanted):
        path = PurePosixPath(entry.name)
        if path.suffix.lower() == ".csv":
            labels = _parse_labels(entry.data, entry.origin)
            if labels is None:
                continue
            by_dir.setdefault(str(path.parent), {}).update(labels)
            if path.name.lower().startswith(_TEST_CSV_PREFIX):
                test_labels.update(labels)
            continue
        split = _split_of(entry.name)
        if split is not None:
            images.append((split, entry.name, decode_image(entry.data, entry.origin, shape)))
    where = ", ".join(str(r) for r in roots)
    if not images:
        raise DatasetError(
            f"no GTSRB images under {where}: expected the official layout "
            "GTSRB/Final_Training/Images/000NN/*.ppm and GTSRB/Final_Test/Images/*.ppm "
            "— check dataset.path and dataset.source"
        )
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    missing: list[str] = []
    for split, name, pixels in sorted(images, key=lambda r: (r[0], r[1])):
        path = PurePosixPath(name)
        label = by_dir.get(str(path.parent), {}).get(path.name)
        if label is None:
            # Test images live in Final_Test/Images, their CSV one level up (or in
            # the separately shipped GT archive).
            label = by_dir.get(str(path.parent.parent), {}).get(path.name)
        if label is None and split == "test":
            label = test_labels.get(path.name)
        if label is None:
            missing.append(name)
            continue
        xs, ys = splits.setdefault(split, ([], []))
        xs.append(pixels)
        ys.append(label)
    if missing:
        raise DatasetError(
            f"{len(missing)} GTSRB images under {where} have no row in any GT-*.csv "
            f"(first: {missing[0]}); add the label files — GT-000NN.csv beside each "
            "training class folder and Final_Test/GT-final_test.csv (from "
            "GTSRB_Final_Test_GT.zip) — to dataset.path"
        )
    return SourceArrays({s: stack(xs, ys, shape) for s, (xs, ys) in splits.items()})
