"""The data sections of the settings: ``dataset.*`` and ``partition.*``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .convert import float_or_none, int_or_none, section, str_or_none


# ------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class HubSettings:
    """``dataset.hf.*``: the Hugging Face Hub copy of a dataset."""

    id: str | None = None
    subset: str | None = None
    revision: str | None = None
    image_key: str = "image"
    label_key: str = "label"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HubSettings:
        """Type the validated section ``data`` (a mapping)."""
        defaults = cls()
        return cls(
            id=str_or_none(data.get("id")),
            subset=str_or_none(data.get("subset")),
            revision=str_or_none(data.get("revision")),
            image_key=str(data.get("image_key", defaults.image_key)),
            label_key=str(data.get("label_key", defaults.label_key)),
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (the form the readers and cache keys use)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SplitNames:
    """``dataset.split_names``: folder names (imagefolder) or Hub splits."""

    train: str = "train"
    test: str = "test"

    def as_dict(self) -> dict[str, str]:
        """Return the fields as a plain dict (the form the readers and cache keys use)."""
        return {"train": self.train, "test": self.test}


@dataclass(frozen=True)
class AugmentSettings:
    """``dataset.preprocess.augment``: random crop and flip of training images."""

    crop_padding: int = 0
    horizontal_flip: bool = False

    @classmethod
    def from_value(cls, value: Any) -> AugmentSettings | None:
        """``false``/``null``: none; ``true``: padding 4 with flips; or the mapping."""
        if value is None or value is False:
            return None
        if value is True:
            return cls(4, True)
        if isinstance(value, Mapping):
            return cls(
                int(value.get("crop_padding", 0) or 0), bool(value.get("horizontal_flip", False))
            )
        raise TypeError(f"dataset.preprocess.augment={value!r}: true, false or a mapping")


@dataclass(frozen=True)
class PreprocessSettings:
    """``dataset.preprocess.*``: normalisation and training augmentation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    augment: AugmentSettings | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PreprocessSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            scale=float(data["scale"]),
            augment=AugmentSettings.from_value(data.get("augment")),
        )


@dataclass(frozen=True)
class DatasetSettings:
    """``dataset.*``: where the data is, its format, classes, shape and preprocessing.

    Frozen and hashable, so that a dataset's settings can key the in-memory caches.
    """

    name: str
    source: str
    path: str | tuple[str, ...] | None
    num_classes: int
    input_shape: tuple[int, ...]
    preprocess: PreprocessSettings
    variant: str | None = None
    idx_prefix: str | None = None
    hf: HubSettings | None = None
    split_names: SplitNames | None = None
    classes: tuple[str, ...] | None = None
    test_fraction: float | None = None
    label_offset: int = 0
    cache_dir: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DatasetSettings:
        """Type the validated section ``data`` (a mapping)."""
        path, classes = data.get("path"), data.get("classes")
        hub, splits = data.get("hf"), data.get("split_names")
        return cls(
            name=str(data["name"]),
            source=str(data["source"]),
            path=path if path is None or isinstance(path, str) else tuple(str(p) for p in path),
            num_classes=int(data["num_classes"]),
            input_shape=tuple(int(s) for s in data["input_shape"]),
            preprocess=PreprocessSettings.from_mapping(data["preprocess"]),
            variant=str_or_none(data.get("variant")),
            idx_prefix=str_or_none(data.get("idx_prefix")),
            hf=None if hub is None else HubSettings.from_mapping(hub),
            split_names=None if splits is None else SplitNames(**dict(splits)),
            classes=None if classes is None else tuple(str(c) for c in classes),
            test_fraction=float_or_none(data.get("test_fraction")),
            label_offset=int(data.get("label_offset") or 0),
            cache_dir=str_or_none(data.get("cache_dir")),
        )


# ---------------------------------------------------------------------- partition
@dataclass(frozen=True)
class GroupSettings:
    """``partition.groups.*``: client groups with a data transform of their own."""

    count: int = 0
    sizes: tuple[int, ...] | None = None
    transform: str = "labels"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GroupSettings:
        """Type the validated section ``data`` (a mapping)."""
        sizes = data.get("sizes")
        return cls(
            count=int(data.get("count", 0) or 0),
            sizes=tuple(int(s) for s in sizes) if sizes else None,
            transform=str(data.get("transform", "labels")),
        )

    @property
    def enabled(self) -> bool:
        """Whether any groups are asked for (``count: 0`` and no sizes: none)."""
        return bool(self.count or self.sizes)


@dataclass(frozen=True)
class PartitionSettings:
    """``partition.*``: how the training data is split over the clients."""

    type: str
    local_test_fraction: float
    min_partition_size: int = 0
    max_client_samples: int | None = None
    alpha: float | None = None
    self_balancing: bool = False
    classes_per_client: int | None = None
    class_assignment: str = "first-deterministic"
    groups: GroupSettings = GroupSettings()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PartitionSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            type=str(data["type"]),
            local_test_fraction=float(data["local_test_fraction"]),
            min_partition_size=int(data.get("min_partition_size", 0) or 0),
            max_client_samples=int_or_none(data.get("max_client_samples")),
            alpha=float_or_none(data.get("alpha")),
            self_balancing=bool(data.get("self_balancing", False)),
            classes_per_client=int_or_none(data.get("classes_per_client")),
            class_assignment=str(data.get("class_assignment", "first-deterministic")),
            groups=GroupSettings.from_mapping(section(data, "groups")),
        )
