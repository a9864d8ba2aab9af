"""Training data: rows with a `prompt`, optional `completion`, `answer`, `task` and `tags`, and
optional `images` / `video` (file paths or encoded bytes; see media.py).

`--data` (and `--eval-data`) takes:
- a JSONL file (`.jsonl` / `.json`): one object per line;
- a Parquet file (`.parquet`), read through Hugging Face `datasets` into its Arrow cache;
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict and a split);
- a hub dataset name (`org/name`), or a directory of data files laid out like a hub dataset
  repository, loaded with `datasets.load_dataset` and a split.

Arrow-backed data (everything but JSONL) is memory-mapped: rows are read when a step needs
them, so data larger than memory trains without loading it. With `--data-streaming`, rows are
read as a stream with no local copy at all: in order by `potstill collect` (`stream_rows`),
shuffled through a buffer by training (`StreamedRows`).
Column-mapping settings say which columns hold the prompt, completion and answer.

A row may carry OpenAI-style chat `messages` ([{"role", "content"}, ...]) instead of a prompt:
the turns before a closing assistant turn are the prompt (kept as turns, for the student's chat
template and for teachers to render with theirs), and that turn's content is the completion.

A malformed row is an error naming its file and line (or row index), or, when asked, skipped
and counted. The order of rows in a run is a pure function of (seed, epoch), so a step number
alone says which rows it trains on: that is what makes `--resume` exact.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ARROW_BATCH_ROWS = 4096  # rows checked at a time when a dataset is opened


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Row(BaseModel):
    """A training row. Fields beyond these are kept (metadata a method or a later stage may use)."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str | list[ChatTurn] = Field(min_length=1)
    completion: str | None = None
    answer: str | None = None
    task: str | None = Field(None, description="The row's task; teachers tagged with it serve it (--route tags).")
    tags: list[str] = Field(default_factory=list, description="More labels that pick teachers, like `task`.")
    images: list[str | bytes] | None = Field(None, min_length=1, description="Images for the prompt: file paths or encoded bytes (media.py).")
    video: list[str | bytes] | None = Field(None, min_length=1, description="A video for the prompt, as its frames: paths or encoded bytes.")

    @model_validator(mode="before")
    @classmethod
    def _from_messages(cls, data: Any) -> Any:
        """`messages` rows: a closing assistant turn becomes the completion, the turns before it the prompt."""
        if not isinstance(data, dict) or data.get("messages") is None:
            return data
        if data.get("prompt") is not None:
            raise ValueError("a row has 'prompt' or 'messages', not both")
        messages = data["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a non-empty list of {role, content} turns")
        rest = {key: value for key, value in data.items() if key not in ("messages", "prompt")}
        if messages[-1].get("role") == "assistant" and rest.get("completion") is None:
            return {**rest, "prompt": messages[:-1], "completion": messages[-1].get("content")}
        return {**rest, "prompt": messages}

    def chat_turns(self) -> list[dict] | None:
        """The prompt's chat turns as plain dicts (what teachers receive), or None for a text prompt."""
        return [turn.model_dump() for turn in self.prompt] if isinstance(self.prompt, list) else None

    @property
    def prompt_text(self) -> str:
        """The prompt as text: itself, or its turns' contents one per line (for a judge's rubric)."""
        return self.prompt if isinstance(self.prompt, str) else "\n".join(turn.content for turn in self.prompt)

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.video)

    def labels(self) -> set[str]:
        """The task and tags that pick this row's teachers."""
        return set(self.tags) | ({self.task} if self.task else set())


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Columns:
    """Which dataset columns hold each `Row` field (JSONL rows use the field names themselves)."""

    prompt: str = "prompt"
    completion: str = "completion"
    answer: str = "answer"

    def row(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record's fields under `Row`'s names; other columns (task, tags, metadata) pass through."""
        mapped = {field: record.get(column) for field, column in (("prompt", self.prompt), ("completion", self.completion), ("answer", self.answer))}
        return {**{name: value for name, value in record.items() if name not in (self.prompt, self.completion, self.answer)}, **mapped}


@dataclass(frozen=True)
class Dataset:
    rows: Sequence[Row]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows)


class ArrowRows(Sequence):
    """The rows of a Hugging Face `datasets.Dataset`, read from its memory-mapped Arrow files on access."""

    def __init__(self, dataset, columns: Columns):
        self.dataset = dataset
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return Row.model_validate(self.columns.row(self.dataset[index]))


def load_rows(source: str | Path, skip_bad_rows: bool = False, columns: Columns = Columns(), split: str = "train") -> Dataset:
    """The rows of a JSONL file, a Parquet file, a saved `datasets` dataset or a hub dataset (see the module docstring)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():  # a file, not a hub dataset name
        raise DataError(f"{source}: no such file")
    if path.is_file() and path.suffix != ".parquet":
        return _load_jsonl(path, skip_bad_rows)
    return _load_arrow(str(source), _open_dataset(str(source), split), columns, skip_bad_rows)


def _open_dataset(source: str, split: str):
    import datasets  # imported on use: a JSONL run does not pay for it

    path = Path(source)
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if path.is_dir() and any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return _split(loaded, split, source) if isinstance(loaded, datasets.DatasetDict) else loaded
    if not path.is_dir() and _looks_like_a_path(source):
        raise DataError(f"{source}: no such data file (JSONL, Parquet) or dataset directory")
    # A hub name, or a directory of data files laid out like a hub repository: one loader for both.
    try:
        return datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(f"{source}: could not load split {split!r} with datasets.load_dataset: {error}") from None


def _looks_like_a_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".parquet") or source.count("/") > 1


def _split(dataset_dict, split: str, source: str):
    if split not in dataset_dict:
        raise DataError(f"{source}: no split {split!r} (splits: {', '.join(dataset_dict)}); choose one with the split setting")
    return dataset_dict[split]


def _load_arrow(source: str, dataset, columns: Columns, skip_bad_rows: bool) -> Dataset:
    """Check every row once (a batch of columns at a time, without building rows), then read rows on access."""
    if columns.prompt not in dataset.column_names and "messages" not in dataset.column_names:
        raise DataError(f"{source}: no column {columns.prompt!r} for the prompt (columns: {', '.join(dataset.column_names)}); "
                        "name the right one with --prompt-column")
    checked = (columns.prompt, columns.completion, columns.answer, "messages", "task", "tags", "images", "video")
    present = [column for column in checked if column in dataset.column_names]
    bad: list[int] = []
    for start, batch in zip(itertools.count(0, ARROW_BATCH_ROWS), dataset.select_columns(present).iter(batch_size=ARROW_BATCH_ROWS)):
        for offset, record in enumerate(_records(batch)):
            problem = _problem(columns.row(record))
            if problem is None:
                continue
            if not skip_bad_rows:
                raise DataError(f"{source}: row {start + offset}: malformed row: {problem}")
            bad.append(start + offset)
    if bad:
        bad_set = set(bad)
        dataset = dataset.select([index for index in range(len(dataset)) if index not in bad_set])
    if len(dataset) == 0:
        raise DataError(f"{source}: no usable rows")
    return Dataset(rows=ArrowRows(dataset, columns), skipped=len(bad))


def _records(batch: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(batch)
    return (dict(zip(names, values)) for values in zip(*(batch[name] for name in names)))


def _problem(record: dict[str, Any]) -> str | None:
    try:
        Row.model_validate(record)
    except ValidationError as error:
        return _first_problem(error)
    return None


def stream_rows(source: str, columns: Columns = Columns(), split: str = "train") -> Iterator[Row]:
    """The rows of a hub dataset, a Parquet or a JSONL file, streamed in order (nothing is copied to disk);
    a malformed row is an error."""
    return _valid_rows(_open_stream(source, split), columns, source)


def _open_stream(source: str, split: str):
    import datasets

    path = Path(source)
    if path.is_file():
        builder = "parquet" if path.suffix == ".parquet" else "json"
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    return datasets.load_dataset(source, split=split, streaming=True)


def _valid_rows(records, columns: Columns, source: str) -> Iterator[Row]:
    for index, record in enumerate(records):
        try:
            row = Row.model_validate(columns.row(record))
        except ValidationError as error:
            raise DataError(f"{source}: row {index}: malformed row: {_first_problem(error)}") from None
        yield row


class StreamedRows:
    """Training rows read from a stream (`stream_rows`' sources), epoch after epoch, each epoch
    shuffled through a buffer of `buffer` rows seeded by (seed, epoch) (`IterableDataset.shuffle`
    and `set_epoch`). Micro-batch `step` holds rows [step * size, (step + 1) * size) of that endless
    sequence, so a step number alone still says which rows it trains on. Batches are read in
    increasing order; asking for an earlier one (a resumed run's first) reads the stream again
    from its start, skipping to it."""

    skipped = 0  # a malformed streamed row is an error, never skipped

    def __init__(self, source: str, columns: Columns = Columns(), split: str = "train", seed: int = 0, buffer: int = 10_000):
        self.source, self.columns, self.split, self.seed, self.buffer = source, columns, split, seed, buffer
        self._restart()

    def _restart(self) -> None:
        self._rows, self.position = self._endless(), 0

    def _endless(self) -> Iterator[Row]:
        for epoch in itertools.count():
            stream = _open_stream(self.source, self.split).shuffle(seed=self.seed, buffer_size=self.buffer)
            stream.set_epoch(epoch)
            empty = True
            for row in _valid_rows(stream, self.columns, self.source):
                empty = False
                yield row
            if empty:
                raise DataError(f"{self.source}: no usable rows")

    def batch(self, step: int, size: int) -> list[Row]:
        start = step * size
        if start < self.position:
            self._restart()
        for _ in range(start - self.position):
            next(self._rows)
        self.position = start + size
        return [next(self._rows) for _ in range(size)]


def _load_jsonl(path: Path, skip_bad_rows: bool) -> Dataset:
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


def rows_for_step(dataset: Dataset | StreamedRows, step: int, batch_size: int, seed: int) -> list[Row]:
    """The `batch_size` rows of micro-batch number `step`, walking epochs shuffled by (seed, epoch)."""
    if isinstance(dataset, StreamedRows):
        return dataset.batch(step, batch_size)
    size = len(dataset)
    start = step * batch_size
    return [dataset.rows[_epoch_order(size, seed, index // size)[index % size]] for index in range(start, start + batch_size)]


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)
