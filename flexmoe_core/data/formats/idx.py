"""MNIST-style idx files (``train-images-idx3-ubyte.gz`` ...), EMNIST's too.

Names follow ``[<prefix>-]<split>-<images|labels>-idx<d>-ubyte[.gz]`` with split
``train``, ``t10k`` or ``test``; EMNIST uses the prefix ``emnist-<variant>``.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DatasetError
from ..files import iter_files
from ..images import fit_images
from . import SourceArrays

_NAME = re.compile(
    r"^(?:(?P<prefix>.+)-)?(?P<split>train|t10k|test)-(?P<kind>images|labels)"
    r"-idx(?P<ndim>\d)-ubyte(?:\.gz)?$"
)
_SPLIT = {"train": "train", "t10k": "test", "test": "test"}


def parse_idx(data: bytes, origin: str) -> np.ndarray:
    """Parse one idx file (gzip-compressed or not) holding unsigned bytes.

    Raises
    ------
    DatasetError
        If the gzip stream or the idx header is corrupt, or the payload is short.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{origin}: corrupt gzip stream ({exc}); download the file again"
            ) from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(
            f"{origin}: not an idx file of unsigned bytes (magic {data[:4].hex()}, "
            "expected 000008xx); is this really an MNIST-style idx file?"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{origin}: truncated idx header; download the file again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise DatasetError(
            f"{origin}: idx header announces shape {dims} ({expected} bytes) but the "
            f"file holds {len(data) - header}; the file is truncated — download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(
    roots: Sequence[Path], shape: tuple[int, int, int], prefix: str | None = None
) -> SourceArrays:
    """Read the images/labels idx pairs of each split found under ``roots``.

    Parameters
    ----------
    roots : sequence of Path
        Folders or archives holding the files.
    shape : tuple of int
        Target (C, H, W) of every image.
    prefix : str, optional
        File-name prefix to select, e.g. ``emnist-balanced``; None selects files
        without a prefix (``train-images-idx3-ubyte.gz``).

    Raises
    ------
    DatasetError
        If no file matches, a split lacks its images or labels, or counts differ.
    """
    found: dict[tuple[str, str], np.ndarray] = {}
    seen_prefixes: set[str] = set()

    def wanted(name: str) -> bool:
        match = _NAME.match(PurePosixPath(name).name)
        if not match:
            return False
        seen_prefixes.add(match["prefix"] or "")
        return match["prefix"] == prefix

    for entry in iter_files(roots, wanted):
        match = _NAME.match(PurePosixPath(entry.name).name)
        assert match is not None  # guaranteed by `wanted`
        key = (_SPLIT[match["split"]], match["kind"])
        # torchvision keeps both foo.gz and foo: identical content, read one.
        found.setdefault(key, parse_idx(entry.data, entry.origin))
    where = ", ".join(str(r) for r in roots)
    if not found:
        hint = (
            f" Prefixes present: {sorted(p or '(none)' for p in seen_prefixes)}; set "
            "dataset.idx_prefix to one of them."
            if seen_prefixes
            else ""
        )
        raise DatasetError(
            f"no idx files with prefix {prefix!r} under {where} (expected e.g. "
            f"{(prefix + '-') if prefix else ''}train-images-idx3-ubyte.gz).{hint}"
        )
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sorted({s for s, _ in found}):
        images, labels = found.get((split, "images")), found.get((split, "labels"))
        if images is None or labels is None:
            kind = "labels" if labels is None else "images"
            raise DatasetError(
                f"{where}: the {split} split has no {kind} idx file; add it beside the other one"
            )
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{where}: {split} images {images.shape} and labels {labels.shape} do not "
                "pair up (expected (N, H, W) and (N,)); the files do not belong together"
            )
        splits[split] = (fit_images(images[:, None], shape), labels.astype(np.int64))
    return SourceArrays(splits)
