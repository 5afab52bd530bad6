"""Decode image files and fit pixel arrays to the model's input shape.

Every source ends up as uint8 arrays of shape (N, C, H, W) at the configured
``input_shape``; normalisation to float happens later, per client (see ``sources``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

# Suffixes read as images by the folder-based formats (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".webp")


def _mode(channels: int) -> str:
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    raise DatasetError(
        f"dataset.input_shape has {channels} channels; images can be fitted to 1 (grey) "
        "or 3 (RGB) channels only"
    )


def _fit_pil(image: Image.Image, shape: Sequence[int]) -> np.ndarray:
    channels, height, width = (int(s) for s in shape)
    image = image.convert(_mode(channels))
    if image.size != (width, height):
        # Pillow's bilinear resize is antialiased when shrinking, so large GTSRB
        # originals do not alias when brought down to 32x32.
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def decode_image(data: bytes, origin: str, shape: Sequence[int]) -> np.ndarray:
    """Decode one encoded image (JPEG, PNG, PPM, ...) to uint8 (C, H, W) at ``shape``.

    Parameters
    ----------
    data : bytes
        The encoded file content.
    origin : str
        Where the bytes came from (file or archive member), for error messages.
    shape : sequence of int
        Target (C, H, W); the image is converted to grey/RGB and resized if needed.

    Raises
    ------
    DatasetError
        If the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _fit_pil(image, shape)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"{origin}: not a readable image ({exc}); the file is corrupt or not an "
            "image — replace it or remove it from the dataset folder"
        ) from exc


def fit_images(images: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Return uint8 images (N, C, H, W) converted and resized to ``shape``.

    Arrays that already have the target shape are returned as they are (no copy);
    others go through Pillow image by image, which only happens once per dataset
    because the result is cached on disk.
    """
    target = tuple(int(s) for s in shape)
    if images.ndim != 4:
        raise DatasetError(f"expected images of shape (N, C, H, W), got {images.shape}")
    if images.shape[1:] == target:
        return np.ascontiguousarray(images, dtype=np.uint8)
    out = np.empty((len(images), *target), dtype=np.uint8)
    for i, image in enumerate(images):
        channels = image.shape[0]
        hwc = image[0] if channels == 1 else image.transpose(1, 2, 0)
        out[i] = _fit_pil(Image.fromarray(np.ascontiguousarray(hwc, dtype=np.uint8)), target)
    return out
