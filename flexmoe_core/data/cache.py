"""On-disk cache of decoded datasets: build once, memory-map in every process.

What is cached is the decoded uint8 (N, C, H, W) images at the input shape, plus
labels — not normalised floats. uint8 is a quarter of the size (CIFAR-10 train:
150 MB instead of 600 MB, so the page cache holds it and each client's memory map
pages in only its own rows), and normalisation is a cheap per-client step, so
changing mean/std or augmentation never invalidates the cache.

Entries are directories ``<cache_dir>/<name>-<digest>/`` holding one ``.npy`` per
array and ``meta.json``; the digest covers everything that changes the decoded
arrays (source, files with sizes and mtimes, hub id and revision, input shape,
format options). A directory is written under a temporary name and renamed into
place, so readers never see a half-written entry; a lock file makes processes that
start together wait for the first one's build instead of all decoding at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

CACHE_VERSION = 1
CACHE_ENV = "FLEXMOE_CACHE_DIR"
_META = "meta.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")  # keeps entry names plain file names


def default_cache_dir() -> Path:
    """Return ``$FLEXMOE_CACHE_DIR`` or ``~/.cache/flexmoe`` (absolute)."""
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "flexmoe"
    return base.resolve()


def resolve_cache_dir(setting: str | os.PathLike[str] | None) -> Path:
    """Return the configured cache dir made absolute, or the default one."""
    if setting is None or str(setting) == "":
        return default_cache_dir()
    return Path(os.path.expandvars(str(setting))).expanduser().resolve()


def digest(key: Mapping[str, Any]) -> str:
    """Return a short stable hash of a JSON-serialisable cache key."""
    payload = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yield whether it is really held."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rename alone keeps it correct.
        yield False
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(entry: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    meta = json.loads((entry / _META).read_text())
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta


def _sync(handle: IO[Any]) -> None:
    # Data must reach the disk before the rename publishes the entry, or a crash
    # could leave a complete-looking entry with truncated arrays.
    handle.flush()
    os.fsync(handle.fileno())


def _write(
    cache_dir: Path, entry: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=cache_dir))
    try:
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as handle:
                np.save(handle, np.ascontiguousarray(array))
                _sync(handle)
        with open(tmp / _META, "w") as handle:
            handle.write(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1))
            _sync(handle)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / _META).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(
    cache_dir: Path,
    name: str,
    key: Mapping[str, Any],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return cached arrays (memory-mapped, read-only) or build, store and return them.

    Parameters
    ----------
    cache_dir : Path
        Absolute cache root; created if missing.
    name : str
        Readable prefix of the entry directory (the dataset name).
    key : mapping
        Everything the arrays depend on; its digest names the entry.
    build : callable
        Returns ``(arrays, meta)``; called at most once across processes sharing
        ``cache_dir`` (unless the directory cannot be written, see below).

    Returns
    -------
    tuple of (dict of str to np.ndarray, dict)
        The arrays and the JSON metadata stored with them.

    Notes
    -----
    If the cache directory cannot be written (read-only home, full disk), the data
    is built in memory and a warning says how to point ``dataset.cache_dir`` at a
    writable place; the run still works, only without the speed-up.
    """
    entry = cache_dir / f"{_SAFE.sub('_', name)}-{digest(key)}"
    if (entry / _META).is_file():
        return _read(entry)
    lock = contextlib.ExitStack()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        locked = lock.enter_context(_exclusive(cache_dir / f".{entry.name}.lock"))
    except OSError as exc:
        warnings.warn(
            f"dataset cache {cache_dir} is not writable ({exc}); decoding {name} in "
            "memory on every run — set dataset.cache_dir or FLEXMOE_CACHE_DIR to a "
            "writable folder",
            stacklevel=2,
        )
        return build()
    with lock:
        if (entry / _META).is_file():  # another process finished while we waited
            return _read(entry)
        # Only the lock holder writes this entry: a temporary folder of it that is
        # still here is what a builder killed mid-write left behind.
        for stale in cache_dir.glob(f".{entry.name}.*.tmp") if locked else ():
            shutil.rmtree(stale, ignore_errors=True)
        arrays, meta = build()
        try:
            _write(cache_dir, entry, arrays, meta)
        except OSError as exc:
            warnings.warn(
                f"could not write the dataset cache {entry} ({exc}); continuing without "
                "it — set dataset.cache_dir or FLEXMOE_CACHE_DIR to a writable folder",
                stacklevel=2,
            )
            return arrays, meta
        return _read(entry)
