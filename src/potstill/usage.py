"""The error a user's own mistake raises: the command line prints it as one line and exits 2."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


class UsageError(Exception):
    """A wrong flag, a missing file, an unreachable endpoint: the message names it and says what to do."""


def one_line(error: Exception) -> str:
    """An error as one line; a settings `ValidationError` names the flag (`--steps: ...`)."""
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "settings"
        given = first.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        return f"{flag}: {first['msg'].removeprefix('Value error, ')}{shown}"
    return " ".join(str(error).split())


def check_model_source(flag: str, name: str) -> None:
    """`UsageError` naming `flag` when `name` is written as a local path (./x, /x, ~/x, a/b/c) that does not exist;
    a hub id (org/name) is left to the loader."""
    if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(f"{flag} {name}: no such directory")
