"""Datasets that ship inside scikit-learn's wheel, so a run works fully offline."""

from __future__ import annotations

import numpy as np

from ..errors import DatasetError
from ..images import fit_images
from . import SourceArrays


def read_sklearn(name: str, shape: tuple[int, int, int]) -> SourceArrays:
    """Return scikit-learn's 8x8 digits (pixel values 0..16) as the unsplit pool ``all``.

    Raises
    ------
    DatasetError
        If ``name`` is not a bundled scikit-learn image dataset.
    """
    if name != "digits":
        raise DatasetError(
            f"dataset.name={name!r} is not bundled with scikit-learn; with "
            "dataset.source=sklearn only 'digits' is available"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are integers 0..16, so uint8 holds them exactly; preprocess.scale=16.
    images = digits.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    return SourceArrays(
        {"all": (fit_images(images, shape), digits.target.astype(np.int64))},
        [str(i) for i in range(10)],
    )
