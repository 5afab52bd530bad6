"""Client groups with a structure of their own: a federation whose right allocation is known.

The clients of a simulated federation are split into G groups (partition ids in
order: the first ``sizes[0]`` ids form group 0, and so on). Each group sees the data
through its own transform, as in the clustered-FL literature:

- ``labels``: group g relabels every sample with its own permutation of the classes
  (group 0 keeps the identity; the others are seeded by the run's seed and g). One
  shared classifier cannot fit two groups at once, so a model that serves every
  group needs one classifier per group — with experts that end in a classifier head,
  "group g on an expert of its own" is the right allocation;
- ``rotation``: group g rotates every image by g x 90 degrees (at most 4 groups).

The transform applies to a client's training split, its local held-out split and
the global test split it evaluates on, so every accuracy is measured in the
client's own task.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..settings import GroupSettings
from .errors import DatasetError
from .sources import ArrayDataset

GROUP_TRANSFORMS = ("labels", "rotation")
# The label permutations get a stream of their own: [seed, group, LABEL_STREAM].
LABEL_STREAM = 0x6C61


@dataclass(frozen=True)
class ClientGroups:
    """The groups of a federation of ``sum(sizes)`` clients and their transform."""

    sizes: tuple[int, ...]
    transform: str

    @classmethod
    def from_settings(cls, groups: GroupSettings, num_clients: int) -> ClientGroups | None:
        """Return the groups ``partition.groups`` describes, or None (``count: 0``).

        ``count`` groups of equal size (the first ``num_clients % count`` one larger),
        or the explicit ``sizes``, which must add up to the number of clients.

        Raises
        ------
        DatasetError
            If the sizes do not add up to ``num_clients``, or a group would be empty.
        """
        if not groups.enabled:
            return None
        transform = groups.transform
        if groups.sizes:
            sizes = groups.sizes
            if sum(sizes) != num_clients or min(sizes) < 1:
                raise DatasetError(
                    f"partition.groups.sizes={list(sizes)} adds up to {sum(sizes)} clients, "
                    f"but the federation has {num_clients}; give sizes >= 1 that add up to "
                    f"{num_clients}, or set partition.groups.sizes=null and "
                    "partition.groups.count=G for equal groups"
                )
        else:
            count = groups.count
            if count > num_clients:
                raise DatasetError(
                    f"partition.groups.count={count} groups for {num_clients} clients: "
                    "every group needs a client; lower the count"
                )
            base, extra = divmod(num_clients, count)
            sizes = tuple(base + (g < extra) for g in range(count))
        if transform == "rotation" and len(sizes) > 4:
            raise DatasetError(
                f"partition.groups: {len(sizes)} rotation groups, but there are only 4 "
                "right-angle rotations; use at most 4 groups or transform=labels"
            )
        return cls(sizes, transform)

    @property
    def count(self) -> int:
        """G, the number of groups."""
        return len(self.sizes)

    def group_of(self, client: int) -> int:
        """Return the group of partition (client key) ``client``."""
        bounds = np.cumsum(self.sizes)
        if not 0 <= client < bounds[-1]:
            raise ValueError(f"client {client} is not in [0, {bounds[-1]})")
        return int(np.searchsorted(bounds, client, side="right"))

    def label_map(self, group: int, num_classes: int, seed: int) -> np.ndarray:
        """Return group ``group``'s permutation of the classes (identity for group 0)."""
        if group == 0 or self.transform != "labels":
            return np.arange(num_classes)
        return np.random.default_rng([seed, group, LABEL_STREAM]).permutation(num_classes)

    def apply(self, data: ArrayDataset, group: int, seed: int, num_classes: int) -> ArrayDataset:
        """Return ``data`` as group ``group`` sees it."""
        if self.transform == "labels":
            return _with_labels(data, self.label_map(group, num_classes, seed)[data.y])
        return _rotated(data, group % 4)


def _with_labels(data: ArrayDataset, labels: np.ndarray) -> ArrayDataset:
    relabelled = copy.copy(data)  # shares the images (and their lazy normalisation)
    relabelled.y = labels.astype(np.int64)
    return relabelled


def _rotated(data: ArrayDataset, quarter_turns: int) -> ArrayDataset:
    if quarter_turns == 0:
        return data
    return data.with_images(lambda images: np.rot90(images, quarter_turns, axes=(2, 3)))


def groups_of(groups: ClientGroups | None, clients: Sequence[int]) -> np.ndarray | None:
    """Return the group of each of ``clients`` (None without groups)."""
    return None if groups is None else np.array([groups.group_of(int(c)) for c in clients])
