"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, data or paths.

    The message says what is wrong, where (file, row, key or value) and what to do.
    """

    exit_code = 2


class ConfigError(UserError):
    """A key or value in the run config is wrong."""


class DataError(UserError):
    """A data file or one of its rows cannot be used."""
