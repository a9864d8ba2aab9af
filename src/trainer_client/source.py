"""Where teacher outputs come from: the one protocol methods depend on.

The live `TeacherPool` implements it; so do an offline cache reader and a recorder that writes
what a live run received. A method asks a source for a teacher's scores or samples by the
teacher's name, with a `/v1/score` or `/v1/generate` body, and never needs to know whether the
answer came over the network or from disk.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from teacher_service.protocol import GenerateResponse, ModelInfo, ScoreResponse


@runtime_checkable
class TeacherInfo(Protocol):
    """One logical teacher as a method sees it."""

    name: str
    tags: tuple[str, ...]
    weight: float
    info: ModelInfo


@runtime_checkable
class TeacherSource(Protocol):
    def groups(self, tag: str | None = None) -> list[TeacherInfo]:
        """The logical teachers, in a fixed order; only those tagged `tag` when given."""

    def group(self, name: str) -> TeacherInfo:
        """The teacher called `name`; `KeyError` naming the known ones otherwise."""

    async def score(self, group_name: str, request: dict) -> ScoreResponse:
        """The teacher's top-k distributions for a `/v1/score` body, one result per sequence, in order."""

    async def generate(self, group_name: str, request: dict) -> GenerateResponse:
        """Samples for a `/v1/generate` body, one result per prompt, in order."""

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-teacher traffic counters, written to the run's `teacher_traffic.json`."""

    def versions(self) -> dict[str, int]:
        """Each teacher's weights version of its latest answer, where known (live teachers that report one)."""
