"""Training-time augmentation on normalised batches: random crop with padding, flip.

``train_local(augment=...)`` calls the function returned by :func:`build_augment`
on each CPU batch with its seeded ``torch.Generator``, so augmentation is
reproducible and vectorised (no per-image Python loop).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..settings import AugmentSettings

Augment = Callable[[Tensor, torch.Generator], Tensor]


def random_crop_flip(
    x: Tensor, generator: torch.Generator, *, padding: int = 4, flip: bool = True
) -> Tensor:
    """Randomly crop each image after zero-padding, and flip half of them left-right.

    Parameters
    ----------
    x : Tensor
        Batch (N, C, H, W), already normalised; padding with 0 therefore pads with
        the dataset mean colour.
    generator : torch.Generator
        Source of randomness (on the CPU, like ``x``).
    padding : int
        Pixels of zero padding on each side before the H x W crop (0: no crop).
    flip : bool
        Whether to mirror a random half of the images horizontally.

    Returns
    -------
    Tensor
        A new batch of the same shape.
    """
    n, _, height, width = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(height))[:, None, :, None]  # (N, 1, H, 1)
        cols = (left[:, None] + torch.arange(width))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n)[:, None, None, None]
        channels = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


def build_augment(augment: AugmentSettings | None) -> Augment | None:
    """Return the augmentation ``dataset.preprocess.augment`` describes, or None.

    None (``augment: false``/``null``), or a random crop with ``crop_padding`` pixels
    of padding and, with ``horizontal_flip``, a random flip. The schema checked the
    setting's form and range.
    """
    if augment is None or (augment.crop_padding == 0 and not augment.horizontal_flip):
        return None
    return partial(random_crop_flip, padding=augment.crop_padding, flip=augment.horizontal_flip)
