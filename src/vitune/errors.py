"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (74 when the
disk filled up or failed while writing)."""

from __future__ import annotations

import errno

# a full or failing disk: not the user's config or data, and not a bug (exit 74)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


class UserError(Exception):
    """A mistake in the user's config, data or paths.

    The message says what is wrong, where (file, row, key or value) and what to do.
    """

    exit_code = 2


class ConfigError(UserError):
    """A key or value in the run config is wrong."""


class DataError(UserError):
    """A data file or one of its rows cannot be used."""


class DiskError(UserError):
    """The disk filled up or failed while vitune was writing (a checkpoint, the final model).

    Not a mistake in the input, but the user's to fix (free space, check the disk), so it is
    printed as one line like a UserError; its own exit code (74, sysexits' EX_IOERR) lets a
    script tell it apart and resume once space is freed.
    """

    exit_code = 74
