"""What a run shows while it trains: a live bar on a terminal, plain periodic lines elsewhere.

A bar drawn into a log file or a CI console is cut to the width the console guessed, so off a
terminal every `every`-th step (and the last) prints one complete line instead.
"""

from __future__ import annotations

import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers.utils import logging as hf_logging


class RunProgress:
    """`update(completed, status)` after each step; use as a context manager."""

    def __init__(
        self, total: int, start: int, every: int, enabled: bool = True, console: Console | None = None, label: str = ""
    ):
        """`label` names what progresses (plain lines start with it; the bar shows it, or 'train')."""
        self.total, self.start, self.every, self.enabled, self.label = total, start, every, enabled, label
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self.started = time.monotonic()
        self.bar = Progress(
            TextColumn(f"[bold]{label or 'train'}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, disable=not self.live,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, status="")

    def __enter__(self) -> RunProgress:
        if not self.live:
            hf_logging.disable_progress_bar()  # transformers' own bars would interleave with the lines
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, completed: int, status: str) -> None:
        self.bar.update(self.task, completed=completed, status=status)
        if self.enabled and not self.live and (completed % self.every == 0 or completed == self.total):
            print(self.line(completed, status), flush=True)

    def line(self, completed: int, status: str) -> str:
        """'[label ]step 20/200 (10%)  elapsed 0:00:38  eta 0:05:42  <status>'."""
        elapsed = time.monotonic() - self.started
        done = completed - self.start
        eta = elapsed / done * (self.total - completed) if done else 0.0
        return (f"{self.label + ' ' if self.label else ''}step {completed}/{self.total} ({completed / self.total:.0%})  elapsed {_clock(elapsed)}  "
                f"eta {_clock(eta)}  {status}").rstrip()


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
