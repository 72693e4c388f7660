"""Header values as file names (one safe file-name component, whatever the header says) and in messages."""

from __future__ import annotations

import os
import re

__all__ = ["MAX_NAME_LENGTH", "safe_name", "shown_value"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Longest name made, in characters (CBIS-DDSM case names are under 40).
MAX_NAME_LENGTH = 120


def safe_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Make a header value safe to use as one file-name component.

    Anything outside ``[A-Za-z0-9._-]`` (slashes, NUL, spaces, ``..``) becomes ``_``; leading dots are removed so
    that the name can never be ``.``/``..`` or hidden. Raises ``ValueError`` when nothing usable is left.
    """
    cleaned = _UNSAFE.sub("_", str(text)).strip("._-")
    cleaned = re.sub(r"\.{2,}", "_", cleaned)[:max_length]
    if not cleaned or os.sep in cleaned:
        raise ValueError(f"no usable file name can be made from {text!r}")
    return cleaned


def shown_value(value: object, limit: int) -> str:
    """A header value fit for a one-line message: its repr (NULs and control characters visible), cut to
    ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
