"""The error a user's own mistake raises: the command line prints it as one line and exits 2."""

from __future__ import annotations


class UsageError(Exception):
    """A wrong flag, a missing file, an unreachable endpoint: the message names it and says what to do."""
