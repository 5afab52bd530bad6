"""Normalised datasets: float32 images ready for the model, from the raw uint8 splits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..settings import DatasetSettings, PreprocessSettings
from .errors import DatasetError
from .raw import load_raw


@dataclass(frozen=True)
class Normaliser:
    """Map uint8 pixels (N, C, H, W) to float32 ``(x / scale - mean) / std`` per channel."""

    scale: float
    mean: np.ndarray  # (1, C, 1, 1) float32
    std: np.ndarray  # (1, C, 1, 1) float32

    @classmethod
    def from_config(cls, preprocess: Mapping[str, Any], channels: int) -> Normaliser:
        """Build from ``dataset.preprocess`` (``scale``, per-channel ``mean``/``std``).

        Raises
        ------
        DatasetError
            If mean/std do not have 1 or ``channels`` entries, or a std is not positive.
        """
        values = {}
        for key in ("mean", "std"):
            vec = np.asarray(list(preprocess[key]), dtype=np.float32).reshape(-1)
            if vec.size == 1:
                vec = np.repeat(vec, channels)
            if vec.size != channels:
                raise DatasetError(
                    f"dataset.preprocess.{key} has {vec.size} values for {channels} "
                    f"channels; give one value or one per channel"
                )
            values[key] = vec.reshape(1, channels, 1, 1)
        if (values["std"] <= 0).any():
            raise DatasetError("dataset.preprocess.std must be positive")
        return cls(float(preprocess["scale"]), values["mean"], values["std"])

    @classmethod
    def from_settings(cls, preprocess: PreprocessSettings, channels: int) -> Normaliser:
        """Build from the run's typed ``dataset.preprocess`` settings."""
        plain = {"mean": preprocess.mean, "std": preprocess.std, "scale": preprocess.scale}
        return cls.from_config(plain, channels)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Return normalised float32 images; ``pixels`` may be a memory map."""
        # One affine map, in place: x * 1/(scale*std) - mean/std (a third of the passes
        # over the data of dividing, subtracting and dividing again).
        x = np.array(pixels, dtype=np.float32)
        x *= (1.0 / (self.scale * self.std)).astype(np.float32)
        x -= (self.mean / self.std).astype(np.float32)
        return x


class ArrayDataset:
    """Images ``x`` as float32 (N, C, H, W), normalised, and int64 labels ``y``.

    Built either from float images directly, or from uint8 ``pixels`` plus a
    :class:`Normaliser` with :meth:`from_pixels`. The latter normalises lazily: ``x``
    is computed on first access, and :meth:`subset` gathers only the requested
    rows first — so a client evaluating on part of a large, memory-mapped global
    test split never reads or converts the rest.
    """

    __slots__ = ("_normaliser", "_pixels", "_x", "y")

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self._x: np.ndarray | None = x
        self._pixels: np.ndarray | None = None
        self._normaliser: Normaliser | None = None
        self.y = y

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, y: np.ndarray, normaliser: Normaliser) -> ArrayDataset:
        """Return a dataset whose ``x`` is ``normaliser(pixels)``, computed on demand."""
        dataset = cls.__new__(cls)
        dataset._x = None
        dataset._pixels = pixels
        dataset._normaliser = normaliser
        dataset.y = np.asarray(y, dtype=np.int64)
        return dataset

    @property
    def x(self) -> np.ndarray:
        """Float32 normalised images (N, C, H, W)."""
        if self._x is None:
            assert self._normaliser is not None and self._pixels is not None
            self._x = self._normaliser(self._pixels)
        return self._x

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, shape={tuple(self._shape())})"

    def _shape(self) -> tuple[int, ...]:
        source = self._x if self._x is not None else self._pixels
        assert source is not None
        return tuple(source.shape)

    def with_images(self, transform: Callable[[np.ndarray], np.ndarray]) -> ArrayDataset:
        """Return the samples with ``transform`` applied to their (N, C, H, W) images.

        A lazily normalised dataset transforms its raw pixels (``transform`` may return a
        view, e.g. a rotation), so that :meth:`subset` still reads only its own rows; the
        transform must commute with per-channel normalisation.
        """
        if self._x is None:
            assert self._pixels is not None and self._normaliser is not None
            return ArrayDataset.from_pixels(transform(self._pixels), self.y, self._normaliser)
        return ArrayDataset(np.ascontiguousarray(transform(self._x)), self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the samples at ``indices``."""
        if self._x is None:
            assert self._pixels is not None and self._normaliser is not None
            return ArrayDataset.from_pixels(
                np.asarray(self._pixels[indices]), self.y[indices], self._normaliser
            )
        return ArrayDataset(self._x[indices], self.y[indices])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits with its label count and input shape."""

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None


def normalise(images: np.ndarray, preprocess: Mapping[str, Any]) -> np.ndarray:
    """Scale raw pixels (N, C, H, W) to ``(x / scale - mean) / std`` per channel."""
    return Normaliser.from_config(preprocess, images.shape[1])(images)


def load_dataset(dataset: DatasetSettings, seed: int = 0) -> DatasetSplits:
    """Load ``dataset`` (a ``conf/dataset/*.yaml`` entry, typed), normalised.

    The whole of both splits is converted to float32 here; federated clients use
    :func:`flexmoe_core.data.load_client_data`, which converts only their share.

    Raises
    ------
    DatasetError
        See :func:`flexmoe_core.data.raw.load_raw`.
    """
    raw = load_raw(dataset, seed)
    normaliser = Normaliser.from_settings(dataset.preprocess, raw.input_shape[0])
    return DatasetSplits(
        ArrayDataset(normaliser(raw.train.view()), raw.train.labels),
        ArrayDataset(normaliser(raw.test.view()), raw.test.labels),
        raw.num_classes,
        raw.input_shape,
        raw.class_names,
    )
