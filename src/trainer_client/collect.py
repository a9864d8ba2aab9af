"""`potstill collect`: ask the teachers once over a dataset and keep their answers as a cache.

The requests are the ones `potstill train` would send, built by the same method code from the
same settings (the same `--config` file serves both), so a run with `--teacher-cache DIR` finds
every answer it needs: top-k scores of the data's completions (logit-kd), n samples per prompt
(seq-kd), or both (logit-kd on teacher samples), plus, with `--eval-data`, the held-out
references scored at temperature 1 for the run's evaluation.

Rows are taken in data order, `--shard-rows` per shard. A shard's batches are all sent at once;
the pool spreads them over the replicas of each teacher. Shards are written and listed in the
manifest one by one, in order (each while the next one's requests are out), so after Ctrl-C or
a crash the same command keeps the finished shards (checked by SHA-256) and redoes the rest:
no row is collected twice or lost.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoConfig, AutoTokenizer

from potstill.flags import add_schema_arguments, settings_values
from trainer_client.cache_source import RecordingSource, open_for_writing, request_settings
from trainer_client.cache_store import CachedTeacher, Entry, Manifest, StorageFormat, id_bits_for
from trainer_client.config import TrainConfig
from trainer_client.data import Row, load_rows, stream_rows
from trainer_client.pool import PoolRunner
from trainer_client.samples import StudentTokens
from trainer_client import trainer

# The run settings collect reads: what decides the teachers' requests, the data, and how to reach teachers.
REQUEST_FIELDS = {
    "student", "data", "eval_data", "eval_rows", "skip_bad_rows", "prompt_column", "completion_column", "answer_column",
    "data_split", "eval_split", "data_streaming", "method", "kd_targets", "top_k", "temperature",
    "samples_per_prompt", "sample_temperature", "max_new_tokens", "max_seq_len", "batch_size", "seed", "route", "select",
    "judge_yes", "judge_no", "verifier",
    "teacher_timeout", "teacher_max_wait", "api_key_file", "teacher_ca_file",
}


class CollectOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: Path = Field(description="Cache directory (created; an existing one with the same settings is resumed).")
    shard_rows: int = Field(1024, ge=1, description="Data rows per shard: the unit that is redone after an interruption.")
    fp16: bool = Field(False, description="Store log-probs as float16 (half the bytes of float32; ~1e-3 relative error).")
    pack_ids: bool = Field(False, description="Store token ids in ceil(log2(vocab_size)) bits instead of 32.")


@dataclass(frozen=True)
class ShardPlan:
    part: str  # "train" or "eval"
    start: int
    end: int

    @property
    def file(self) -> str:
        return f"{self.part}-{self.start:010d}-{self.end:010d}.arrow"


def shards(part: str, rows: Sequence[Row] | Iterable[Row], shard_rows: int, done: set[str]) -> Iterator[tuple[ShardPlan, list[Row]]]:
    """The shards of one part that are not `done`, with their rows: consecutive ranges covering the part
    exactly once. A sequence is sliced (finished shards are never read); a stream is read through once."""
    if isinstance(rows, Sequence):
        chunks = ((start, rows[start : start + shard_rows]) for start in range(0, len(rows), shard_rows))
    else:
        iterator = iter(rows)
        chunks = ((start, list(itertools.islice(iterator, shard_rows))) for start in itertools.count(0, shard_rows))
    for start, chunk in chunks:
        if not chunk:
            return
        plan = ShardPlan(part, start, start + len(chunk))
        if plan.file not in done:
            yield plan, chunk


@dataclass
class CollectResult:
    manifest: Manifest
    traffic: dict  # per endpoint: the pool's counters (requests, retries, seconds, ...)


def collect(config: TrainConfig, options: CollectOptions, progress: bool = True) -> CollectResult:
    """Fill `options.output` with the teachers' answers for every row."""
    if config.method == "sft":
        raise ValueError("method 'sft' asks no teacher: there is nothing to collect")
    if trainer.METHODS[config.method].uses_student:
        raise ValueError(f"method {config.method!r} asks teachers about the student's own samples, which change as it "
                         "learns: its teacher answers cannot be collected ahead")
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    vocab_size = AutoConfig.from_pretrained(config.student).get_text_config().vocab_size
    tokens = trainer.student_tokens(config, tokenizer)
    if config.data_streaming:  # in data order; a resumed collect reads past the finished shards' rows
        parts: dict[str, Sequence[Row] | Iterable[Row]] = {"train": stream_rows(config.data, config.columns, config.data_split)}
    else:
        parts = {"train": load_rows(config.data, config.skip_bad_rows, config.columns, config.data_split).rows}
    if config.white_box:
        parts["eval"] = trainer.load_eval_rows(config)
    sizes = {part: len(rows) if isinstance(rows, Sequence) else None for part, rows in parts.items()}
    with trainer.connect_teachers(config, tokenizer, vocab_size) as runner:
        manifest = _start_or_resume(options, runner, request_settings(config, tokens.fingerprint), sizes, config)
        done = {record.file for record in manifest.shards}
        with _progress_bar(progress) as bar:
            total = None if None in sizes.values() else sum(sizes.values())
            task = bar.add_task("collect", total=total, completed=sum(s.rows[1] - s.rows[0] for s in manifest.shards))
            try:
                # A shard's answers are written while the next shard's requests are already out.
                previous = None
                for plan, rows in (item for part, rows in parts.items() for item in shards(part, rows, options.shard_rows, done)):
                    answers = runner.submit(_answers(config, tokens, runner.pool, plan, rows, lambda n: bar.advance(task, n)))
                    if previous:
                        _store(options.output, manifest, *previous)
                    previous = plan, answers
                if previous:
                    _store(options.output, manifest, *previous)
            except KeyboardInterrupt:
                print(f"interrupted: the {len(manifest.shards)} finished shards are kept in {options.output}; "
                      "run the same command again to finish")
                raise
        return CollectResult(manifest, runner.pool.stats())


def _store(directory: Path, manifest: Manifest, plan: ShardPlan, answers: Future) -> None:
    manifest.add(directory, plan.file, plan.part, (plan.start, plan.end), answers.result())


async def _answers(config: TrainConfig, tokens: StudentTokens, pool, plan: ShardPlan, rows: list[Row], advance) -> list[Entry]:
    """The teachers' answers for one shard's rows: its batches go out at once, recorded as they come back."""
    recorder = RecordingSource(pool)
    method = trainer.METHODS[config.method](config, tokens, recorder)
    if plan.part == "eval":
        await trainer.annotate_held_out(method, method.reference_groups([row for row in rows if row.completion is not None]))
        advance(len(rows))
    else:

        async def batch(start: int) -> None:
            chunk = rows[start : start + config.batch_size]
            await method.annotate(chunk, None, (plan.start + start) // config.batch_size)
            advance(len(chunk))

        await asyncio.gather(*(batch(start) for start in range(0, len(rows), config.batch_size)))
    return recorder.entries


def _start_or_resume(options: CollectOptions, runner: PoolRunner, settings: dict, sizes: dict, config: TrainConfig) -> Manifest:
    """The output's manifest: new, or the one of an interrupted collect made the same way."""
    teachers = [CachedTeacher.of(group) for group in runner.pool.groups()]
    id_bits = id_bits_for(max(t.info.vocab_size for t in teachers)) if options.pack_ids else 32
    fresh = Manifest(
        teachers=teachers, settings=settings,
        storage=StorageFormat(values="float16" if options.fp16 else "float32", id_bits=id_bits),
        data={part: {"source": config.data if part == "train" else config.eval_data, "rows": size} for part, size in sizes.items()},
        shard_rows=options.shard_rows,
    )
    return open_for_writing(options.output, fresh, runner.pool.groups())


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not enabled,
    )


# --- command line ---


USER_ERRORS = trainer.USER_ERRORS  # a mismatched or corrupted cache, bad data, a refused request: one line, exit 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    trainer.add_arguments(parser, only=REQUEST_FIELDS)
    parser.add_argument("--output", type=Path, required=True, help=CollectOptions.model_fields["output"].description)
    add_schema_arguments(parser, CollectOptions, skip={"output"})


def main(args: argparse.Namespace) -> None:
    config = trainer.config_from_args(args, skip=("output",))  # `--output` here is the cache directory
    options = CollectOptions(**settings_values(args, CollectOptions))
    manifest = collect(config, options).manifest
    print(json.dumps({"output": str(options.output), "shards": len(manifest.shards),
                      "entries": sum(sum(s.entries.values()) for s in manifest.shards),
                      "positions": sum(s.positions for s in manifest.shards), "bytes": sum(s.bytes for s in manifest.shards)}))
