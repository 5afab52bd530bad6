"""Find a dataset's files: folders, archives (read in place), globs and lists of them.

A dataset ``path`` may name a folder, an archive (``.tar``, ``.tar.gz``/``.tgz``,
``.tar.xz``/``.txz``, ``.tar.bz2``, ``.zip``), a glob, or a list of those; archives
found inside a folder are read too. Archives are streamed member by member with the
standard library, never unpacked to disk.
"""

from __future__ import annotations

import glob
import lzma
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DatasetError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
ZIP_SUFFIXES = (".zip",)
# Archive kinds people try that the standard library cannot read.
UNSUPPORTED_ARCHIVES = (".rar", ".7z", ".tar.zst", ".zst")
_GLOB_CHARS = frozenset("*?[")
# Errors the standard library raises for truncated or corrupt archives.
_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
)


@dataclass(frozen=True)
class FileEntry:
    """One file of a dataset: its name inside the dataset root and its bytes."""

    name: str  # posix path relative to the folder root, or the archive member name
    origin: str  # human-readable location for error messages
    data: bytes


def _lower(path: Path | str) -> str:
    return str(path).lower()


def is_archive(path: Path | str) -> bool:
    """Whether ``path`` names a tar or zip archive this module can read."""
    return _lower(path).endswith(TAR_SUFFIXES + ZIP_SUFFIXES)


def resolve_paths(path: str | Sequence[str] | None, setting: str = "dataset.path") -> list[Path]:
    """Expand a configured path (one entry or a list; globs allowed) to existing paths.

    Parameters
    ----------
    path : str or sequence of str
        Folders, archives or glob patterns; ``~`` and ``$VARS`` are expanded.
    setting : str
        The config key, named in error messages.

    Raises
    ------
    DatasetError
        If an entry does not exist or a glob matches nothing.
    """
    if path is None:
        raise DatasetError(f"{setting} is not set; point it at the dataset's files")
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not entries:
        raise DatasetError(f"{setting} is an empty list; name at least one folder or archive")
    resolved: list[Path] = []
    for entry in entries:
        text = os.path.expandvars(os.path.expanduser(str(entry)))
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise DatasetError(
                    f"{setting} entry {text!r} matches no file; check the pattern and "
                    "that the data has been downloaded there"
                )
            resolved.extend(Path(m).resolve() for m in matches)
            continue
        candidate = Path(text)
        if not candidate.exists():
            raise DatasetError(
                f"{setting} entry {text!r} does not exist; set {setting} to the folder "
                "or archive that holds the dataset (or null to download it from the "
                "Hugging Face Hub)"
            )
        resolved.append(candidate.resolve())
    for candidate in resolved:
        if candidate.is_file() and _lower(candidate).endswith(UNSUPPORTED_ARCHIVES):
            raise DatasetError(
                f"{candidate}: this archive format cannot be read; repack it as .tar.gz, "
                ".tar.xz or .zip, or unpack it and point the path at the folder"
            )
    return resolved


def _walk(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def fingerprint(roots: Sequence[Path]) -> list[list[str | int]]:
    """Return (path, size, mtime_ns) of every file under ``roots``, for cache keys.

    A stat per file is cheap next to decoding, and it changes whenever a file is
    replaced, so a stale cache is never read.
    """
    rows: list[list[str | int]] = []
    for root in roots:
        files = _walk(root) if root.is_dir() else [root]
        for file in files:
            stat = file.stat()
            rows.append([file.as_posix(), stat.st_size, stat.st_mtime_ns])
    return rows


def _archive_error(archive: Path, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{archive}: cannot read this archive ({type(exc).__name__}: {exc}); it is "
        "truncated or corrupt — download it again, or unpack it and point the path "
        "at the folder"
    )


def _iter_tar(archive: Path, want: Callable[[str], bool]) -> Iterator[FileEntry]:
    try:
        # Stream mode ("r|*") decompresses once, front to back: the fastest way
        # through a compressed archive of many small members.
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not want(member.name):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                yield FileEntry(member.name, f"{archive}!{member.name}", handle.read())
    except DatasetError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise _archive_error(archive, exc) from exc


def _iter_zip(archive: Path, want: Callable[[str], bool]) -> Iterator[FileEntry]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                if info.is_dir() or not want(info.filename):
                    continue
                data = bundle.read(info)
                yield FileEntry(info.filename, f"{archive}!{info.filename}", data)
    except DatasetError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise _archive_error(archive, exc) from exc


def _iter_file(file: Path, name: str, want: Callable[[str], bool]) -> Iterator[FileEntry]:
    lowered = _lower(file)
    if lowered.endswith(TAR_SUFFIXES):
        yield from _iter_tar(file, want)
    elif lowered.endswith(ZIP_SUFFIXES):
        yield from _iter_zip(file, want)
    elif want(name):
        yield FileEntry(name, str(file), file.read_bytes())


def iter_files(roots: Sequence[Path], want: Callable[[str], bool]) -> Iterator[FileEntry]:
    """Yield the files under ``roots`` (folders and archives) whose name ``want`` accepts.

    Parameters
    ----------
    roots : sequence of Path
        Existing folders or files, as returned by :func:`resolve_paths`.
    want : callable
        Predicate on the entry name (posix path relative to the root folder, or the
        archive member name); only accepted entries are read.

    Raises
    ------
    DatasetError
        If an archive is truncated or corrupt.
    """
    seen: dict[str, str] = {}
    for root in roots:
        if root.is_dir():
            entries = (
                entry
                for file in _walk(root)
                for entry in _iter_file(file, file.relative_to(root).as_posix(), want)
            )
        else:
            entries = _iter_file(root, root.name, want)
        for entry in entries:
            # An archive unpacked beside itself (or listed twice) would count every
            # sample twice; refuse rather than silently duplicate the data.
            name = str(PurePosixPath(entry.name))
            if name in seen:
                raise DatasetError(
                    f"{name} is found twice: {seen[name]} and {entry.origin}; the "
                    "dataset path holds two copies (e.g. an archive and its unpacked "
                    "folder) — point the path at one of them"
                )
            seen[name] = entry.origin
            yield FileEntry(name, entry.origin, entry.data)
