"""Atomic writes: every file under ``results/`` appears whole or not at all.

A job killed mid-write leaves only a ``.tmp-*`` file beside its target, never a file under the target's name
that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mammoseg.errors import NoSpaceError

__all__ = ["atomic_path", "atomic_directory", "write_text_atomic", "write_json_atomic", "write_csv_atomic"]

_UMASK = os.umask(0)
os.umask(_UMASK)

#: errno values that mean "the disk cannot take this file", whatever the library that hit them
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _disk_full(exc: OSError) -> bool:
    """True for a full disk or quota, also when a library (HDF5) only put the errno into its message."""
    text = str(exc)
    return exc.errno in _DISK_FULL or "errno = 28" in text or os.strerror(errno.ENOSPC) in text


def _name_target(exc: OSError, target: Path) -> NoSpaceError:
    """The same failure with the target's name in front, so a one-line CLI error says which output failed."""
    code = exc.errno if exc.errno in _DISK_FULL else errno.ENOSPC
    return NoSpaceError(code, f"{target}: cannot write ({os.strerror(code)}): {exc}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary name keeps the target's suffix, so libraries that infer a format from it (h5py, PNG writers,
    Keras' ``.keras``) still work. A full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``) inside the block or while
    flushing is re-raised as a :class:`~mammoseg.errors.NoSpaceError` (an ``OSError`` with the same errno) whose
    message starts with ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:  # data on disk before the rename makes it visible
                os.fsync(handle.fileno())
        except OSError as exc:
            if _disk_full(exc) and str(target) not in str(exc):
                raise _name_target(exc, target) from exc
            raise
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``target``; it becomes ``target`` only if the block succeeds.

    For outputs that are folders (a chunk of predictions, a TensorFlow SavedModel with its model card): a failed
    or killed block leaves no folder under the target's name (a killed one leaves a ``.tmp-*`` folder beside it).
    An existing ``target`` is renamed aside, the new folder renamed in, and the old one removed; the files are on
    disk before the rename. A full disk inside the block is re-raised as in :func:`atomic_path`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        try:
            yield tmp
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb+") as handle:
                        os.fsync(handle.fileno())
        except OSError as exc:
            if _disk_full(exc) and str(target) not in str(exc):
                raise _name_target(exc, target) from exc
            raise
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; results are meant to be shared
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent)) / target.name
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | Path, payload: Any) -> None:
    write_text_atomic(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def printable(value: Any) -> Any:
    """``value`` with control characters written as escapes (``"\\r"``, ``"\\x00"``); other values unchanged.

    Why: table text can come from a damaged file's header (a NUL or CR in a UID that pydicom quotes in its
    error). The csv writer quotes only the characters of its line terminator (``"\\n"``), and pandas' reader ends
    a row at a bare ``"\\r"``, so such a field would come back as several rows with empty reasons.
    """
    if not isinstance(value, str) or value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def write_csv_atomic(target: str | Path, frame: "pandas.DataFrame") -> None:  # noqa: F821 - pandas is optional here
    """Write ``frame`` (no index) to ``target`` atomically, its text columns through :func:`printable` so that
    every row reads back as one row."""
    text_columns = frame.select_dtypes(include=["object", "string"]).columns
    if len(text_columns):
        frame = frame.assign(**{column: frame[column].map(printable) for column in text_columns})
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
