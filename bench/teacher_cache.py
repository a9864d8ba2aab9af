"""Training from a teacher cache vs from a live teacher; cache size; collect vs plain scoring.

    python bench/teacher_cache.py [--rows 2048] [--steps 40] [--prefetch 4]

The demo's setup, with models of the toy world's sizes built on the spot (random weights: speed
does not depend on them): two `potstill serve` processes of a 2-layer 128-wide teacher, one
thread each, and a 2-layer 96-wide student trained with batches of 128. In one run:
1. collect: `potstill collect` of logit-kd top-20 scores over every row, timed, against the same
   requests sent through the same pool with nothing recorded or written (plain scoring),
   alternating `--repeats` times after a first collect that pays the one-time imports;
2. the cache's size per 1,000 token positions, stored as float32 / float16 values and 32-bit /
   packed ids (the collected shards, re-encoded in each format), for the toy's short answers
   and for 64-token completions;
3. training: the same logit-kd run with the live teachers (prefetch on) and from the cache,
   alternating `--repeats` times: steps per second, the share of step time spent waiting on
   the teachers, and the step time not spent waiting (the student's own work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.testing import TeacherProcess
from trainer_client.cache_source import TeacherCache
from trainer_client.cache_store import Entry, StorageFormat, id_bits_for, write_shard
from trainer_client.collect import CollectOptions, collect
from trainer_client.config import TrainConfig
from trainer_client.data import load_rows
from trainer_client.samples import StudentTokens
from trainer_client.trainer import METHODS, connect_teachers, load_student, train

SHARD_ROWS = 256
BATCH_SIZE = 128  # the demo's
TEACHER = {"hidden_size": 128, "layers": 2, "heads": 4}  # the toy world's teacher and student sizes
STUDENT = {"hidden_size": 96, "layers": 2, "heads": 4}


def plain_scoring_seconds(config: TrainConfig) -> float:
    """The collect's requests (the same batches), all sent at once through the same pool (its per-endpoint
    concurrency limit applies), with nothing kept: the fastest the teachers answer them."""
    tokenizer, model = load_student(config.student)
    tokens = StudentTokens(tokenizer, config.max_seq_len)
    rows = load_rows(config.data).rows
    with connect_teachers(config, tokenizer, model.get_output_embeddings().weight.shape[0]) as runner:
        method = METHODS[config.method](config, tokens, runner.pool)
        started = time.perf_counter()
        batches = range(0, len(rows), config.batch_size)
        runner.run(_gather(method.annotate(rows[start : start + config.batch_size], None, start // config.batch_size) for start in batches))
        return time.perf_counter() - started


async def _gather(coroutines):
    return await asyncio.gather(*coroutines)


def long_completions(rows: list[dict], tokens: int = 64) -> list[dict]:
    """Rows whose completion is a run of following problems and answers, about `tokens` tokens long."""
    chained = []
    for index, row in enumerate(rows):
        following = rows[index + 1 :] + rows[: index + 1]
        text = " ".join(other["prompt"] + other["completion"] for other in following[: tokens // 7])
        chained.append({"prompt": row["prompt"], "completion": row["completion"] + " " + text})
    return chained


def bytes_per_1k_positions(cache: TeacherCache, storage: StorageFormat, scratch: Path) -> float:
    """The cache's shards written again in `storage`: file bytes per 1,000 stored positions."""
    entries = []
    for shard in cache.shards:
        for teacher, kind, key, sample, row in shard.keys():
            distributions, prompt_tokens = shard.distribution(row)
            entries.append(Entry(teacher, kind, key, sample, prompt_tokens, distributions))
    scratch.mkdir(parents=True, exist_ok=True)
    size = positions = 0
    for start in range(0, len(entries), SHARD_ROWS):
        _, shard_positions, shard_bytes, _ = write_shard(scratch, f"shard-{start}.arrow", entries[start : start + SHARD_ROWS], storage)
        size, positions = size + shard_bytes, positions + shard_positions
    return 1000 * size / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each pair (this machine is shared: timings vary)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        teacher = build_tiny_model(root / "teacher", **TEACHER)
        student = build_tiny_model(root / "student", seed=1, **STUDENT)
        rows = make_rows(args.rows, seed=0)
        data = write_jsonl(rows, root / "train.jsonl")
        long_data = write_jsonl(long_completions(rows[:SHARD_ROWS]), root / "long.jsonl")
        with TeacherProcess(str(teacher), threads=1) as first, TeacherProcess(str(teacher), threads=1) as second:
            config = TrainConfig(
                student=str(student), teachers=[first.grpc_url, second.grpc_url], data=str(data), output=str(root / "live"),
                method="logit-kd", steps=args.steps, batch_size=BATCH_SIZE, prefetch=args.prefetch, save_every=10**9, top_k=20,
            )
            cold = _timed_collect(config, root / "cache")  # pays the process's one-time imports (pyarrow loads pandas)
            collects = [(plain_scoring_seconds(config), _timed_collect(config, root / f"again-{r}")) for r in range(args.repeats)]
            collect(config.model_copy(update={"data": str(long_data)}), CollectOptions(output=root / "long", shard_rows=SHARD_ROWS), progress=False)
            from_cache = config.model_copy(update={"teachers": [], "teacher_cache": str(root / "cache"), "output": str(root / "cached")})
            trainings = [(_timed_train(config), _timed_train(from_cache)) for _ in range(args.repeats)]
        manifest = TeacherCache(root / "cache").manifest
        vocab = manifest.teachers[0].info.vocab_size
        sizes = {
            (name, values, bits): bytes_per_1k_positions(TeacherCache(root / name), StorageFormat(values=values, id_bits=bits),
                                                         root / f"size-{name}-{values}-{bits}")
            for name in ("cache", "long") for values in ("float32", "float16") for bits in (32, id_bits_for(vocab))
        }
        per_sequence = {name: _positions_per_sequence(TeacherCache(root / name)) for name in ("cache", "long")}
    console = Console()
    positions = sum(shard.positions for shard in manifest.shards)
    table = Table(title=f"collect: {args.rows} rows, {positions} positions, logit-kd top-20, batch {BATCH_SIZE}, two teachers over gRPC")
    for column in ("run", "plain scoring s (nothing kept)", "potstill collect s (recorded, written)", "collect speed vs plain"):
        table.add_column(column, justify="right")
    table.add_row("first collect of the process", "", f"{cold:.2f}", "")
    for number, (plain, collected) in enumerate(collects, start=1):
        table.add_row(str(number), f"{plain:.2f}", f"{collected:.2f}", f"{plain / collected:.2f}x")
    table.add_row("median", f"{statistics.median([p for p, _ in collects]):.2f}", f"{statistics.median([c for _, c in collects]):.2f}",
                  f"{statistics.median([p / c for p, c in collects]):.2f}x")
    console.print(table)

    table = Table(title=f"cache size at k = 20 (vocabulary {vocab}: packed ids take {id_bits_for(vocab)} bits)")
    for column in ("completions", "positions per sequence", "values", "ids", "bytes per 1k positions", "vs float32 + int32"):
        table.add_column(column, justify="right")
    for (name, values, bits), size in sizes.items():
        label = "toy answers" if name == "cache" else "chained problems"
        table.add_row(label, f"{per_sequence[name]:.1f}", values, f"{bits} bits", f"{size:,.0f}", f"{size / sizes[(name, 'float32', 32)]:.2f}")
    console.print(table)

    table = Table(title=f"logit-kd training, {args.steps} steps of batch {BATCH_SIZE}, prefetch {args.prefetch}: live (two teachers) vs cache")
    for column in ("run", "live steps/s", "live waiting", "live step ms not waiting", "cache steps/s", "cache waiting",
                   "cache step ms not waiting", "live speed vs cache"):
        table.add_column(column, justify="right")
    for number, (live, cached) in enumerate(trainings, start=1):
        table.add_row(str(number), f"{live[0]:.2f}", f"{live[1]:.1%}", f"{live[2]:.0f}", f"{cached[0]:.2f}", f"{cached[1]:.1%}",
                      f"{cached[2]:.0f}", f"{live[0] / cached[0]:.2f}")
    table.add_row("median", *(
        f"{statistics.median([pair[side][index] for pair in trainings]):{style}}"
        for side in (0, 1) for index, style in ((0, ".2f"), (1, ".1%"), (2, ".0f"))
    ), f"{statistics.median([live[0] / cached[0] for live, cached in trainings]):.2f}")
    console.print(table)


def _timed_collect(config: TrainConfig, output: Path) -> float:
    started = time.perf_counter()
    collect(config, CollectOptions(output=output, shard_rows=SHARD_ROWS), progress=False)
    return time.perf_counter() - started


def _positions_per_sequence(cache: TeacherCache) -> float:
    shards = cache.manifest.shards
    return sum(s.positions for s in shards) / sum(sum(s.entries.values()) for s in shards)


def _timed_train(config: TrainConfig) -> tuple[float, float, float]:
    """From each step's logged time: steps per second, the share of step time waiting on the teacher, and
    the mean milliseconds of a step spent not waiting (the student's own work, slowed by whatever shares its cores)."""
    result = train(config.model_copy(update={"log_every": 1, "overwrite": True}), progress=False)  # repeats reuse the output
    steps = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    working = sum(step["step_s"] - step["teacher_wait_s"] for step in steps) / len(steps)
    return len(steps) / sum(step["step_s"] for step in steps), result.teacher_wait_fraction, 1000 * working


if __name__ == "__main__":
    main()
