"""Image-folder trees ``<split>/<class>/<image>``, in folders or archives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DatasetError
from ..files import iter_files
from ..images import IMAGE_SUFFIXES, decode_image
from . import SourceArrays, stack


def _wanted(name: str) -> bool:
    path = PurePosixPath(name)
    # Skip hidden files such as macOS "._x.jpg" resource forks: they are not images.
    return (
        len(path.parts) >= 2
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


def read_imagefolder(
    roots: Sequence[Path],
    shape: tuple[int, int, int],
    split_names: Mapping[str, str],
    classes: Sequence[str] | None = None,
) -> SourceArrays:
    """Read ``<split>/<class>/<image>`` trees (any prefix folders before ``<split>``).

    Parameters
    ----------
    roots : sequence of Path
        Folders or archives holding the tree.
    shape : tuple of int
        Target (C, H, W) of every image.
    split_names : mapping
        Canonical split (``train``, ``test``) to its folder name. Images whose
        grand-parent folder is none of these form the unsplit pool ``all``.
    classes : sequence of str, optional
        Class folder names in label order; default: sorted folder names.

    Raises
    ------
    DatasetError
        If no image is found, the tree mixes split and unsplit images, or a class
        folder is not in ``classes``.
    """
    folder_to_split = {str(folder): split for split, folder in split_names.items()}
    records: list[tuple[str, str, str, np.ndarray]] = []
    for entry in iter_files(roots, _wanted):
        parts = PurePosixPath(entry.name).parts
        split_folder = parts[-3] if len(parts) >= 3 else None
        split = folder_to_split.get(split_folder, "all") if split_folder else "all"
        pixels = decode_image(entry.data, entry.origin, shape)
        records.append((split, parts[-2], entry.name, pixels))
    where = ", ".join(str(r) for r in roots)
    if not records:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in a <split>/<class>/ folder "
            f"under {where}; expected e.g. train/cat/0001.jpg — check dataset.path and "
            "dataset.source"
        )
    splits_found = {r[0] for r in records}
    if "all" in splits_found and len(splits_found) > 1:
        stray = next(r[2] for r in records if r[0] == "all")
        raise DatasetError(
            f"{where}: some images sit in split folders {sorted(splits_found - {'all'})} "
            f"and some do not (e.g. {stray}); put every image under one of "
            f"{sorted(folder_to_split)} or set dataset.split_names to the folder names"
        )
    names = list(classes) if classes else sorted({r[1] for r in records})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({r[1] for r in records} - set(index))
    if unknown:
        raise DatasetError(
            f"{where}: class folders {unknown} are not in dataset.classes; add them "
            "there (in label order) or set dataset.classes to null to use all folders"
        )
    records.sort(key=lambda r: (r[0], index[r[1]], r[2]))
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sorted(splits_found):
        chosen = [r for r in records if r[0] == split]
        splits[split] = stack([r[3] for r in chosen], [index[r[1]] for r in chosen], shape)
    return SourceArrays(splits, names)
