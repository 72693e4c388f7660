"""The one error every image reader raises for a file it cannot use."""

from __future__ import annotations

from pathlib import Path

from mammoseg.errors import InputError

__all__ = ["READ_REASONS", "DicomReadError"]

#: The reason codes of :class:`DicomReadError`, the same codes that ``skipped.csv`` uses (docs/usage.md, reasons).
READ_REASONS = ("zero_byte", "not_dicom", "truncated", "no_pixel_data", "bad_header", "undecodable", "unreadable")


class DicomReadError(InputError, ValueError):
    """A file that cannot be used, with the file name and a short reason code.

    Attributes
    ----------
    path : str
        The offending file.
    reason : str
        One of :data:`READ_REASONS`.
    detail : str
        A readable explanation (without the path).
    """

    def __init__(self, path: str | Path, reason: str, detail: str):
        if reason not in READ_REASONS:
            raise ValueError(f"unknown read failure reason {reason!r}; known: {', '.join(READ_REASONS)}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail} [{reason}]")

    def __reduce__(self):  # across a process pool: rebuilt from its three fields, not from the message
        return (type(self), (self.path, self.reason, self.detail))
