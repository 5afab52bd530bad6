"""Readers, one per on-disk or hub format, all returning uint8 (N, C, H, W) arrays.

Each reader returns a :class:`SourceArrays`: per split (``train``, ``test``, or
``all`` when the source has no split of its own) the images at the configured input
shape and int64 labels as stored in the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SourceArrays:
    """Decoded splits of one source, with class names when the source has them."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str] | None = field(default=None)


def stack(
    images: list[np.ndarray], labels: list[int], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-image uint8 arrays and their labels into one split."""
    x = np.stack(images).astype(np.uint8, copy=False) if images else np.zeros((0, *shape), np.uint8)
    return x, np.asarray(labels, dtype=np.int64)
