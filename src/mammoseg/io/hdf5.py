"""Write an HDF5 file through Python file I/O, so that a full disk is an ordinary Python error.

Why: when a write of HDF5's own ``sec2`` driver fails (``ENOSPC`` in the middle of a shard), h5py raises the
error, but the library keeps the damaged file open in a state it cannot close: the process then dies with SIGSEGV
at interpreter exit, after the clear error line was printed. Here HDF5 writes through h5py's ``fileobj`` driver
into :class:`LatchingFile`, which never reports a failed write to HDF5: it keeps the first error, stops writing to
the disk and serves HDF5's later reads of the unwritten bytes from memory, so the library always closes a
consistent file. :func:`hdf5_writer` then raises the kept error. The caller stops adding data once
:attr:`LatchingFile.error` is set, so the bytes held in memory stay a few chunks and metadata.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # h5py is imported when a file is written, not with this module (the Snakefile imports shards)
    import h5py

__all__ = ["LatchingFile", "hdf5_writer"]


class LatchingFile:
    """A seekable binary file (``fileobj`` for h5py) that keeps its first write error instead of raising it.

    Reads and writes use ``os.pread``/``os.pwrite`` at the position HDF5 sought to; a read past the end of the
    file is filled with zeros, as HDF5's own ``sec2`` driver does. After the first failed write (or truncate),
    that write and every later one are kept in memory (address and bytes, in write order) and reads see them
    there, so HDF5 reads back what it believes it wrote. :attr:`error` is the first ``OSError``, None while all is
    well.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.error: OSError | None = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._position = 0
        self._held: list[tuple[int, bytes]] = []  # (address, bytes) not on disk, in write order (after an error)
        self._held_end = 0

    # --- what h5py's fileobj driver calls -----------------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += max(os.fstat(self._fd).st_size, self._held_end)
        elif whence == os.SEEK_CUR:
            offset += self._position
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                self._write_all(view, self._position)
            except OSError as exc:
                self.error = exc
        if self.error is not None:  # also the part of this write that failed: HDF5 may read it back
            self._held.append((self._position, bytes(view)))
            self._held_end = max(self._held_end, self._position + len(view))
        self._position += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(os.fstat(self._fd).st_size, self._held_end) - self._position
        data = bytearray(os.pread(self._fd, size, self._position))
        data.extend(bytes(size - len(data)))  # past the end of the file: zeros, as in HDF5's sec2 driver
        if self._held:
            self._overlay(data)
        self._position += size
        return bytes(data)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer).cast("B")))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        """Nothing to flush: every write went straight to the file descriptor."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- helpers ------------------------------------------------------------------------------------------

    def _write_all(self, view: memoryview, address: int) -> None:
        while len(view):  # pwrite may write part of the buffer (a signal, a filling disk)
            written = os.pwrite(self._fd, view, address)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view, address = view[written:], address + written

    def _overlay(self, data: bytearray) -> None:
        """Patch ``data``, read at the current position, with the held writes it overlaps."""
        start, end = self._position, self._position + len(data)
        for address, held in self._held:  # in write order: a later write of the same bytes wins
            lo, hi = max(start, address), min(end, address + len(held))
            if lo < hi:
                data[lo - start:hi - start] = held[lo - address:hi - address]


@contextlib.contextmanager
def hdf5_writer(path: str | Path, **file_options: Any) -> Iterator[tuple["h5py.File", LatchingFile]]:
    """Create the HDF5 file ``path`` (truncating it) for writing; yield ``(h5py.File, LatchingFile)``.

    ``file_options`` go to :class:`h5py.File` (e.g. ``track_order``). The body should stop adding data once
    ``disk.error`` is set. On leaving, the HDF5 file is closed (HDF5 never saw a failed write, so it closes
    cleanly) and the first write error, if any, is raised as an ``OSError`` naming ``path``.
    """
    import h5py

    disk = LatchingFile(path)
    try:
        with h5py.File(disk, "w", **file_options) as h5:
            yield h5, disk
    finally:
        disk.close()
    if disk.error is not None:
        code = disk.error.errno
        raise OSError(code, f"{path}: {disk.error.strerror or disk.error}") from disk.error
