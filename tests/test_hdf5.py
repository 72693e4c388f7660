"""mammoseg.io.hdf5: a write error (a full disk) never reaches HDF5, which always closes a consistent file."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from mammoseg.io import hdf5
from mammoseg.io.hdf5 import LatchingFile, hdf5_writer


def _fail_after(monkeypatch, successful_writes: int) -> None:
    """``os.pwrite`` in mammoseg.io.hdf5 succeeds ``successful_writes`` times, then the disk is full."""
    real, calls = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > successful_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(hdf5.os, "pwrite", pwrite)


def test_a_failed_write_is_kept_and_read_back_from_memory(tmp_path, monkeypatch):
    disk = LatchingFile(tmp_path / "f.bin")
    disk.seek(0)
    assert disk.write(b"abcd") == 4
    _fail_after(monkeypatch, 0)
    disk.seek(2)
    assert disk.write(b"XYZW") == 4  # reported as written: HDF5 must never see the error
    assert disk.error is not None and disk.error.errno == errno.ENOSPC
    disk.seek(0)
    assert disk.read(6) == b"abXYZW"  # on disk "ab", then what HDF5 believes it wrote
    assert disk.seek(0, os.SEEK_END) == 6
    disk.close()
    assert (tmp_path / "f.bin").read_bytes() == b"abcd"


def test_hdf5_writer_raises_the_disk_error_naming_the_file_after_a_clean_close(tmp_path, monkeypatch):
    target = tmp_path / "shard.h5"
    _fail_after(monkeypatch, 3)
    with pytest.raises(OSError) as caught:
        with hdf5_writer(target) as (h5, disk):
            data = h5.create_dataset("x", shape=(64, 128, 128), dtype=np.float32, chunks=(1, 128, 128))
            for k in range(64):
                data[k] = k
            assert disk.error is not None  # 4 MiB overflow the chunk cache: the body can tell, and stop
    assert caught.value.errno == errno.ENOSPC and str(target) in str(caught.value)


def test_hdf5_writer_writes_a_readable_file(tmp_path):
    import h5py

    with hdf5_writer(tmp_path / "ok.h5", track_order=False) as (h5, disk):
        h5.create_dataset("x", data=np.arange(12, dtype=np.int64).reshape(3, 4))
        h5.attrs["a"] = "b"
    assert disk.error is None
    with h5py.File(tmp_path / "ok.h5", "r") as h5:
        np.testing.assert_array_equal(h5["x"][()], np.arange(12).reshape(3, 4))
        assert h5.attrs["a"] == "b"
