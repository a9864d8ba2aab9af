"""The run directory (`--output`): one writer at a time, a readable metrics log, what a stopped run kept.

A run takes an exclusive lock on `output/.potstill.lock` for its whole life: a second trainer
on the same directory is refused at once, naming the holder, instead of interleaving metrics
and racing checkpoint rotation. A directory that already holds a run is continued only with
`--resume` and started over only with `--overwrite`. Incomplete checkpoints (`checkpoints.py`:
a crash or a full disk mid-save) are deleted at start. An error that stops a run carries a
note saying where its progress is (`note_stop`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.usage import UsageError
from trainer_client.checkpoints import CHECKPOINT_MARKER

LOCK_FILE = ".potstill.lock"
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "self_teacher")  # what a previous run leaves behind


STOP_NOTE = "potstill: "  # how the note a stopped run adds to its error begins


def note_stop(error: BaseException, output: Path, completed: int, checkpoint_error: OSError | None = None) -> None:
    """Add to the error that stopped a run where its progress is (a note: tracebacks show it, the
    error keeps its type and message) and that --resume continues it."""
    if checkpoint_error is None:
        where = f"{completed} completed steps are checkpointed in {output}"
    else:
        where = f"the steps since the last checkpoint are lost: {checkpoint_error}"
    error.add_note(f"{STOP_NOTE}{where}; continue with --resume")


def stop_note(error: BaseException) -> str | None:
    """The note `note_stop` added, without its prefix; None for an error that stopped no run."""
    notes = [n for n in getattr(error, "__notes__", ()) if n.startswith(STOP_NOTE)]
    return notes[-1].removeprefix(STOP_NOTE) if notes else None


@contextlib.contextmanager
def locked(output: Path) -> Iterator[None]:
    """Hold the run directory for this process; `UsageError` if another one holds it."""
    output.mkdir(parents=True, exist_ok=True)
    handle = (output / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--output {output} is in use by another trainer ({holder}); give each run its own directory") from None
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def prepare(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a previous run unless asked; delete incomplete checkpoints."""
    previous = [name for name in RUN_OUTPUTS if (output / name).exists()]
    if previous and not resume:
        if not overwrite:
            raise UsageError(
                f"--output {output} already holds a run ({', '.join(previous)}): "
                "pass --resume to continue it or --overwrite to start over"
            )
        for name in previous:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for partial in (output / "checkpoints").glob("step-*"):
        if not (partial / CHECKPOINT_MARKER).is_file():
            shutil.rmtree(partial)


def whole_records(text: str) -> list[dict[str, Any]]:
    """The records of a metrics log; only its last line may be torn (and is then left out)."""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UsageError(f"metrics.jsonl line {number} is not JSON: the log was edited; fix or remove it") from None
    return records
