"""The one family of errors that means "the input is wrong", not "the code is wrong".

Bad data, a bad configuration, a missing or unreadable input file and a full disk are :class:`InputError`\\ s:
the command line and the workflow's scripts turn them into one line naming the file (or the config key) and the
reason, and exit with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "ConfigError", "NoSpaceError"]


class InputError(Exception):
    """Bad input data, configuration or environment; the message names the file or key and the reason."""


class ConfigError(InputError, ValueError):
    """A configuration that violates the schema; the message names the key and what is allowed."""


class NoSpaceError(InputError, OSError):
    """An output could not be written because its disk is full (``ENOSPC``, ``EDQUOT``, ``EFBIG``).

    The message starts with the output's path; ``errno`` keeps the original code.
    """
