"""A record of the offloads applied in this process (and in processes a Hydra job starts).

:func:`~hydra_offload.apply_offload` notes each one; the Hydra job callback that comes with the
``offload`` group reads the record at the end of a job to tell a user whose config selects a
backend that nothing applied it. Imports nothing but the standard library, so the core can
note applications without depending on Hydra.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["APPLIED_FILE_ENV", "applied_count", "note_applied"]

APPLIED_FILE_ENV = "HYDRA_OFFLOAD_APPLIED_FILE"
"""While a job that selects a backend runs: a file that :func:`note_applied` appends to, so
that processes the job starts (Lightning's ``ddp_spawn``) count too."""

_applied = 0


def note_applied() -> None:
    """Record that this process put the job's offload settings to use.

    :func:`~hydra_offload.apply_offload` calls this when it applies an offload. Code that uses
    the settings some other way, or that only plans on purpose (a dry run), calls it too, so
    that the job does not end with an ``OffloadNotAppliedWarning``.

    Example:
        >>> before = applied_count()
        >>> note_applied()
        >>> applied_count() - before
        1
    """
    global _applied
    _applied += 1
    path = os.environ.get(APPLIED_FILE_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a") as handle:
            handle.write(f"{os.getpid()}\n")


def applied_count() -> int:
    """How many times :func:`note_applied` was called in this process."""
    return _applied
