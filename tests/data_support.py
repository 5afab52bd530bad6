"""Helpers shared by the data tests: where the real data is, and tiny synthetic files."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexmoe_core.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "FLEXMOE_TEST_DATA"


def data_dir() -> Path:
    """The folder laid out like ../shared/datasets ($FLEXMOE_TEST_DATA or the default)."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else (ROOT.parent / "shared" / "datasets").resolve()


def require(sub: str) -> Path:
    """Return ``data_dir()/sub`` or skip the test with a clear message."""
    path = data_dir() / sub
    if not path.exists():
        pytest.skip(
            f"real data {path} not found: set {DATA_ENV} (or pytest --data-dir) to a "
            "folder laid out like ../shared/datasets"
        )
    return path


def dataset_cfg(group: str, cache_dir: Path, **overrides: object):
    """Compose ``dataset=<group>`` with ``dataset.<key>=<value>`` overrides."""
    items = [f"dataset={group}", f"dataset.cache_dir={cache_dir}"]
    for key, value in overrides.items():
        text = "null" if value is None else value
        items.append(f"dataset.{key}={text}")
    return load_settings(items).dataset


def image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def idx_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    """Serialise a uint8 array as an idx file (gzip-compressed by default)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return gzip.compress(raw) if compress else raw


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative posix name -> bytes) under ``root``."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a tar archive; compression from the suffix (gz, xz)."""
    mode = "w:xz" if path.name.endswith("xz") else "w:gz" if path.name.endswith("gz") else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a zip archive."""
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return path


def coloured(label: int, size: tuple[int, int] = (8, 8), channels: int = 3) -> np.ndarray:
    """A flat image whose colour encodes ``label`` (so decoding can be checked)."""
    value = np.uint8(20 * label + 5)
    shape = (*size, channels) if channels == 3 else size
    return np.full(shape, value, dtype=np.uint8)
