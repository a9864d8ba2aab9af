"""The teacher cache on disk: Arrow shards of teacher answers plus a JSON manifest.

A cache directory holds `manifest.json` and shard files `shard-NNNNN.arrow` (Arrow IPC, read
memory-mapped, so a cache larger than memory is read without loading it). A shard holds every
teacher answer for one contiguous range of data rows; it is written to a temporary name and
renamed, then listed in the manifest (also replaced atomically), so after a crash or Ctrl-C a
shard is either complete and listed, or absent and redone.

One shard row is one teacher distribution along a sequence: a scored sequence (`kind="score"`)
or one sample of a prompt (`kind="generate"`, `sample` = 0..n-1). It is found by its request
key, a digest of everything in the request that decides the answer (see `score_key`,
`generate_key`). Arrays are stored as bytes: values as float32 or float16, token ids as int32
or, packed, `id_bits` bits each (`pack_ids`).

The manifest records the teachers (their model info: fingerprint, vocabulary, model version
when reported), the request settings, the storage format, and per shard its rows, counts,
positions, size and SHA-256. Reading a cache checks every shard's checksum first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from teacher_service.protocol import ModelInfo, Sample, ScoredSequence, TokenDistributions

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("teacher", pa.dictionary(pa.int16(), pa.string())),  # a few distinct values: stored once per shard
        ("kind", pa.dictionary(pa.int8(), pa.string())),
        ("key", pa.binary(16)),
        ("sample", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("length", pa.int32()),
        ("k", pa.int32()),
        ("token_ids", pa.binary()),
        ("token_logprobs", pa.binary()),
        ("top_ids", pa.binary()),
        ("top_logprobs", pa.binary()),
    ]
)


class CacheError(ValueError):
    """A cache that cannot be used as asked: corrupted, or made for other teachers or settings."""


# --- request keys ---


def _digest(payload: Any) -> bytes:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).digest()


def score_key(request: dict, sequence: dict) -> bytes:
    """What decides a scored sequence: its prompt and completion, k and temperature."""
    return _digest(["score", sequence["prompt"], sequence["completion"], request.get("top_logprobs", 0), request.get("temperature", 1.0)])


def generate_key(request: dict, prompt: Any) -> bytes:
    """What decides a prompt's samples, except the seed: a cache keeps one set of samples per prompt
    and sampling settings, whatever step (and so seed) a run asks for them at."""
    settings = [request.get(name, default) for name, default in (("n", 1), ("max_tokens", 16), ("temperature", 1.0), ("top_p", 1.0), ("top_logprobs", 0))]
    return _digest(["generate", prompt, *settings])


# --- arrays as bytes ---


def id_bits_for(vocab_size: int) -> int:
    """The fewest bits that hold every id of a vocabulary (at least 1)."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2))))


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Token ids (any shape, each in [0, 2**bits)) as `bits` bits each, flattened in C order.

    32 bits is plain little-endian int32. Otherwise bit j of id i is bit i*bits + j of the
    stream (least significant first); the stream is zero-padded to whole bytes.
    """
    flat = np.ascontiguousarray(ids, dtype=np.uint32).ravel()
    if bits == 32:
        return flat.astype("<u4").tobytes()
    bit_matrix = (flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_ids(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """The `count` ids `pack_ids` wrote, as int32 [count]."""
    if bits == 32:
        return np.frombuffer(data, dtype="<i4", count=count).astype(np.int32)
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count * bits)
    weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
    return (stream.reshape(count, bits).astype(np.uint32) @ weights).astype(np.int32)


# --- the manifest ---


class StorageFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: Literal["float32", "float16"] = "float32"
    id_bits: int = Field(32, ge=1, le=32)


PARTS = ("train", "eval", "steps")


class ShardRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    part: Literal[PARTS] = Field(description="train / eval: collected over those data rows; steps: recorded by a training run.")
    rows: tuple[int, int] = Field(description="Data rows [start, end) this shard answers for (steps: the run's steps).")
    entries: dict[str, int] = Field(description="Distributions stored, per kind (score, generate).")
    positions: int = Field(description="Token positions stored (sum of lengths).")
    bytes: int
    sha256: str


class CachedTeacher(BaseModel):
    """A teacher as the cache knows it; `TeacherInfo` for the methods reading from the cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tags: tuple[str, ...] = ()
    weight: float = 1.0
    info: ModelInfo

    @classmethod
    def of(cls, teacher: Any) -> CachedTeacher:
        """The cached form of any `TeacherInfo` (a live pool's group)."""
        return cls(name=teacher.name, tags=teacher.tags, weight=teacher.weight, info=teacher.info)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    teachers: list[CachedTeacher]
    settings: dict[str, Any] = Field(description="The request settings the shards were collected with.")
    storage: StorageFormat
    data: dict[str, Any] = Field(description="Where the rows came from and how many there are, per part.")
    shard_rows: int
    shards: list[ShardRecord] = Field(default_factory=list)

    def write(self, directory: Path) -> None:
        _atomic_write(directory / MANIFEST, self.model_dump_json(indent=2).encode())

    def add(self, directory: Path, file: str, part: str, rows: tuple[int, int], entries: list[Entry]) -> ShardRecord:
        """Write `entries` as shard `file` (one per teacher, kind, key and sample, in a fixed order, so the same
        answers make the same shard), then list it here and rewrite the manifest."""
        counts, positions, size, digest = write_shard(directory, file, unique_sorted(entries), self.storage)
        record = ShardRecord(file=file, part=part, rows=rows, entries=counts, positions=positions, bytes=size, sha256=digest)
        self.shards = sorted([*(s for s in self.shards if s.file != file), record], key=lambda s: (PARTS.index(s.part), s.rows))
        self.write(directory)
        return record

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            raise CacheError(f"{directory}: not a teacher cache (no {MANIFEST}); make one with `potstill collect`")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as error:
            raise CacheError(f"{path}: unreadable manifest: {error}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- writing shards ---


@dataclass
class Entry:
    """One distribution to store: a scored sequence or one sample of a prompt."""

    teacher: str
    kind: Literal["score", "generate"]
    key: bytes
    sample: int
    prompt_tokens: int
    distributions: TokenDistributions


def unique_sorted(entries: list[Entry]) -> list[Entry]:
    """One entry per (teacher, kind, key, sample), the first received (a row repeated in the data is stored
    once), ordered by that tuple."""
    unique = {(e.teacher, e.kind, e.key, e.sample): e for e in reversed(entries)}
    return [unique[key] for key in sorted(unique)]


def write_shard(directory: Path, name: str, entries: Iterable[Entry], storage: StorageFormat) -> tuple[dict[str, int], int, int, str]:
    """Write `entries` to `directory/name` atomically; returns (counts per kind, positions, bytes, sha256)."""
    entries = list(entries)
    value_type = np.dtype(storage.values)
    columns: dict[str, list] = {field.name: [] for field in SCHEMA}
    for entry in entries:
        d = entry.distributions
        row = {
            "teacher": entry.teacher, "kind": entry.kind, "key": entry.key, "sample": entry.sample,
            "prompt_tokens": entry.prompt_tokens, "text": getattr(d, "text", ""),
            "finish_reason": getattr(d, "finish_reason", ""), "length": len(d.token_ids), "k": d.top_ids.shape[1] if d.top_ids.ndim == 2 else 0,
            "token_ids": pack_ids(d.token_ids, storage.id_bits), "token_logprobs": d.token_logprobs.astype(value_type).tobytes(),
            "top_ids": pack_ids(d.top_ids, storage.id_bits), "top_logprobs": d.top_logprobs.astype(value_type).tobytes(),
        }
        for column, value in row.items():
            columns[column].append(value)
    table = pa.table(columns, schema=SCHEMA)
    path = directory / name
    temporary = path.with_name(f".{name}.tmp")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    os.replace(temporary, path)
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ("score", "generate")}
    positions = sum(len(e.distributions.token_ids) for e in entries)
    return counts, positions, path.stat().st_size, sha256_of(path)


# --- reading shards ---


class ShardReader:
    """One shard, memory-mapped; `distribution(i)` decodes row i."""

    def __init__(self, path: Path, storage: StorageFormat):
        try:
            self.table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (pa.ArrowInvalid, OSError) as error:
            raise CacheError(f"{path}: unreadable shard ({error})") from None
        if self.table.schema != SCHEMA:
            raise CacheError(f"{path}: shard columns differ from this version's format")
        self.storage = storage
        self._columns = {name: self.table.column(name) for name in SCHEMA.names}

    def keys(self) -> Iterable[tuple[str, str, bytes, int, int]]:
        """(teacher, kind, key, sample, row index) of every row."""
        teachers, kinds, keys, samples = (self._columns[c].to_pylist() for c in ("teacher", "kind", "key", "sample"))
        return zip(teachers, kinds, keys, samples, range(len(keys)))

    def _value(self, column: str, index: int) -> Any:
        return self._columns[column][index]

    def distribution(self, index: int) -> tuple[TokenDistributions, int]:
        """Row `index` as a `ScoredSequence` or `Sample` (float32 values, int32 ids) and its prompt_tokens."""
        length, k = self._value("length", index).as_py(), self._value("k", index).as_py()
        bits, values = self.storage.id_bits, np.dtype(self.storage.values)
        arrays = dict(
            token_ids=unpack_ids(self._value("token_ids", index).as_buffer(), bits, length),
            token_logprobs=np.frombuffer(self._value("token_logprobs", index).as_buffer(), dtype=values).astype(np.float32),
            top_ids=unpack_ids(self._value("top_ids", index).as_buffer(), bits, length * k).reshape(length, k),
            top_logprobs=np.frombuffer(self._value("top_logprobs", index).as_buffer(), dtype=values).astype(np.float32).reshape(length, k),
        )
        prompt_tokens = self._value("prompt_tokens", index).as_py()
        if self._value("kind", index).as_py() == "score":
            return ScoredSequence(**arrays, prompt_tokens=prompt_tokens), prompt_tokens
        sample = Sample(**arrays, text=self._value("text", index).as_py(), finish_reason=self._value("finish_reason", index).as_py())
        return sample, prompt_tokens
