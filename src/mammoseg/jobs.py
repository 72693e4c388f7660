"""What every script in ``workflow/scripts/`` shares: its log, and one line for bad input.

A rule's script runs one stage function of the package inside :func:`logged_job`::

    with logged_job(snakemake):
        run_extract(snakemake.input.plan, ...)

Everything the job prints, from Python and from libraries writing to the process's file descriptors
(TensorFlow's C++ logs), goes to the rule's ``log:`` file. An :class:`~mammoseg.errors.InputError` (bad data, a
bad config, a full disk) ends the job with one line naming the file and the reason, in the log and on the
console, and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Iterator

from mammoseg.errors import InputError

__all__ = ["logged_job"]


@contextlib.contextmanager
def _redirected(path: str) -> Iterator[None]:
    """Send file descriptors 1 and 2 (and Python's sys.stdout/stderr) to ``path`` (appended) inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Console:
    """Lines a job also shows on the console, not only in its log (a stage's one-line summary); they are printed
    when the job ends."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def show(self, text: str) -> None:
        self.lines.append(text)


@contextlib.contextmanager
def logged_job(snakemake: Any) -> Iterator[Console]:
    """Run the block as the job of ``snakemake`` (the object Snakemake gives a ``script:``), logging to its log.

    Yields a :class:`Console` for the few lines the user should see without opening the log.
    """
    log = str(snakemake.log[0]) if len(snakemake.log) else os.devnull
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    failure = None
    console = Console()
    with _redirected(log):
        try:
            yield console
        except InputError as exc:
            failure = f"mammoseg {snakemake.rule}: error: {exc}"
            print(failure, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            raise
    for line in console.lines:
        print(line, file=sys.stderr)
    if failure is not None:
        print(failure, file=sys.stderr)  # once more on the console, where the user is looking
        sys.exit(2)
