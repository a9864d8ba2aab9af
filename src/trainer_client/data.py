"""Training data: JSONL rows with `prompt`, optional `completion`, `answer`, `task` and `tags`.

A malformed row is an error naming its file and line, or, when asked, skipped and counted.
The order of rows in a run is a pure function of (seed, epoch), so a step number alone says
which rows it trains on: that is what makes `--resume` exact.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Row(BaseModel):
    """A training row. Fields beyond these are kept (metadata a method or a later stage may use)."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(min_length=1)
    completion: str | None = None
    answer: str | None = None
    task: str | None = Field(None, description="The row's task; teachers tagged with it serve it (--route tags).")
    tags: list[str] = Field(default_factory=list, description="More labels that pick teachers, like `task`.")

    def labels(self) -> set[str]:
        """The task and tags that pick this row's teachers."""
        return set(self.tags) | ({self.task} if self.task else set())


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Dataset:
    rows: list[Row]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def load_rows(path: str | Path, skip_bad_rows: bool = False) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows, skipped = [], 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as error:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{number}: malformed row: {_first_problem(error)}") from None
                skipped += 1
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return Dataset(rows=rows, skipped=skipped)


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        return f"{'.'.join(map(str, first['loc'])) or 'row'}: {first['msg']}"
    return str(error)


def rows_for_step(dataset: Dataset, step: int, batch_size: int, seed: int) -> list[Row]:
    """The `batch_size` rows of micro-batch number `step`, walking epochs shuffled by (seed, epoch)."""
    size = len(dataset)
    start = step * batch_size
    return [dataset.rows[_epoch_order(size, seed, index // size)[index % size]] for index in range(start, start + batch_size)]


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)
