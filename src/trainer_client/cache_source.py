"""Teacher sources over the cache: a reader that answers from shards, a recorder that fills them.

`CacheSource` answers `score` / `generate` from a `TeacherCache`; a request it has no answer for
raises `CacheMiss`, or, given a live `fallback` source (`--cache-miss live`), goes to it for the
missing items only. `RecordingSource` passes requests to another source and keeps every answer
as a cache entry (`potstill collect` writes them as shards). Both are `TeacherSource`s, so a
method cannot tell a cached answer from a live one.

Before a run reads a cache, `check_cache` compares what the cache was made with to what the run
would ask, and names every difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teacher_service.protocol import GenerateResponse, GenerateResult, ScoreResponse
from trainer_client.cache_store import (
    MANIFEST,
    CachedTeacher,
    CacheError,
    Entry,
    Manifest,
    ShardReader,
    StorageFormat,
    generate_key,
    score_key,
    sha256_of,
)
from trainer_client.config import TrainConfig
from trainer_client.source import TeacherInfo, TeacherSource


class CacheMiss(CacheError):
    pass


class TeacherCache:
    """A cache directory, checked (every shard's SHA-256) and indexed by request key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        self.shards: list[ShardReader] = []
        self._index: dict[tuple[str, str, bytes], list[tuple[int, int]]] = {}
        for number, record in enumerate(self.manifest.shards):
            path = self.directory / record.file
            verify_shard(path, record.sha256)
            shard = ShardReader(path, self.manifest.storage)
            self.shards.append(shard)
            for teacher, kind, key, sample, row in shard.keys():
                places = self._index.setdefault((teacher, kind, key), [])
                if sample == len(places):  # a request seen in two shards (a repeated data row) is kept once
                    places.append((number, row))

    def lookup(self, teacher: str, kind: str, key: bytes) -> list[tuple[Any, int]] | None:
        """The stored distributions for a request item (one for score, n samples for generate), or None."""
        places = self._index.get((teacher, kind, key))
        return [self.shards[shard].distribution(row) for shard, row in places] if places else None

    def __len__(self) -> int:
        return len(self._index)


def verify_shard(path: Path, expected_sha256: str) -> None:
    if not path.is_file():
        raise CacheError(f"{path}: shard listed in the manifest is missing; run `potstill collect` with the same --output to redo it")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise CacheError(
            f"{path}: corrupted shard (SHA-256 {actual[:16]}…, the manifest records {expected_sha256[:16]}…); "
            "run `potstill collect` with the same --output to redo it"
        )


class CacheSource:
    """A `TeacherSource` answering from a `TeacherCache`, and from `fallback` for what it lacks."""

    def __init__(self, cache: TeacherCache, fallback: TeacherSource | None = None):
        self.cache = cache
        self.fallback = fallback
        self._teachers = {teacher.name: teacher for teacher in cache.manifest.teachers}
        self._counts = {name: {"cache_hits": 0, "cache_misses": 0} for name in self._teachers}

    def groups(self, tag: str | None = None) -> list[CachedTeacher]:
        return [teacher for teacher in self._teachers.values() if tag is None or tag in teacher.tags]

    def group(self, name: str) -> CachedTeacher:
        if name not in self._teachers:
            raise KeyError(f"no teacher named {name!r}; the cache has {', '.join(self._teachers)}")
        return self._teachers[name]

    async def score(self, group_name: str, request: dict) -> ScoreResponse:
        found = [self.cache.lookup(group_name, "score", score_key(request, s)) for s in request["sequences"]]
        results = [stored[0][0] if stored else None for stored in found]
        return ScoreResponse(await self._fill_misses(group_name, "score", request, "sequences", results))

    async def generate(self, group_name: str, request: dict) -> GenerateResponse:
        found = [self.cache.lookup(group_name, "generate", generate_key(request, p)) for p in request["prompts"]]
        results = [GenerateResult([sample for sample, _ in stored], stored[0][1]) if stored else None for stored in found]
        return GenerateResponse(await self._fill_misses(group_name, "generate", request, "prompts", results))

    async def _fill_misses(self, group_name: str, kind: str, request: dict, items_key: str, results: list) -> list:
        """`results` with every None replaced by the fallback's answer (one request for all of them), or CacheMiss."""
        self.group(group_name)
        missing = [index for index, result in enumerate(results) if result is None]
        counts = self._counts[group_name]
        counts["cache_hits"] += len(results) - len(missing)
        counts["cache_misses"] += len(missing)
        if not missing:
            return results
        if self.fallback is None:
            raise CacheMiss(
                f"teacher cache {self.cache.directory} has no {kind} answer from teacher {group_name!r} for "
                f"{len(missing)} of {len(results)} items of a request (first: {_describe(request[items_key][missing[0]])}); "
                "collect over these rows with these settings, or pass --cache-miss live with --teacher URLs"
            )
        answer = await getattr(self.fallback, kind)(group_name, {**request, items_key: [request[items_key][i] for i in missing]})
        for index, result in zip(missing, answer.results):
            results[index] = result
        return results

    def stats(self) -> dict[str, dict[str, Any]]:
        live = self.fallback.stats() if self.fallback is not None else {}
        return {f"cache:{name}": {"group": name, **counts} for name, counts in self._counts.items()} | live

    def versions(self) -> dict[str, int]:
        return self.fallback.versions() if self.fallback is not None else {}  # a cache keeps no versions

    async def close(self) -> None:
        if self.fallback is not None:
            await self.fallback.close()


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        return f"a sequence of {len(item['prompt'])} prompt + {len(item['completion'])} completion tokens"
    return f"a prompt of {len(item)} tokens"


class RecordingSource:
    """A `TeacherSource` passing requests to `inner` and keeping what it received as cache `entries`."""

    def __init__(self, inner: TeacherSource):
        self.inner = inner
        self.entries: list[Entry] = []

    def groups(self, tag: str | None = None) -> list[TeacherInfo]:
        return self.inner.groups(tag)

    def group(self, name: str) -> TeacherInfo:
        return self.inner.group(name)

    async def score(self, group_name: str, request: dict) -> ScoreResponse:
        response = await self.inner.score(group_name, request)
        for sequence, result in zip(request["sequences"], response.results):
            self.entries.append(Entry(group_name, "score", score_key(request, sequence), 0, result.prompt_tokens, result))
        return response

    async def generate(self, group_name: str, request: dict) -> GenerateResponse:
        response = await self.inner.generate(group_name, request)
        for prompt, result in zip(request["prompts"], response.results):
            key = generate_key(request, prompt)
            self.entries += [Entry(group_name, "generate", key, n, result.prompt_tokens, s) for n, s in enumerate(result.samples)]
        return response

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.inner.stats()

    def versions(self) -> dict[str, int]:
        return self.inner.versions()

    async def close(self) -> None:
        await self.inner.close()


# --- does a cache fit a run? ---


def request_settings(config: TrainConfig, student_fingerprint: str) -> dict[str, Any]:
    """The settings that decide a method's teacher requests, hence the cache's keys.

    Loss settings (divergence, tail, beta, ce_weight) and optimisation are not among them: a
    cache serves any sweep over those."""
    settings: dict[str, Any] = {"method": config.method, "student_tokenizer": student_fingerprint, "route": config.route}
    if config.method == "logit-kd":
        settings.update(kd_targets=config.kd_targets, top_k=config.top_k, temperature=config.temperature, max_seq_len=config.max_seq_len)
    if config.method in ("seq-kd", "multi-sample") or (config.method == "logit-kd" and config.kd_targets == "teacher"):
        settings.update(samples_per_prompt=config.samples_per_prompt, sample_temperature=config.sample_temperature,
                        max_new_tokens=config.max_new_tokens)
    if config.select == "judge":
        settings.update(judge_rubrics=config.judge_rubrics, judge_yes=config.judge_yes, judge_no=config.judge_no)
    return settings


def check_cache(manifest: Manifest, settings: dict[str, Any], student_vocab_size: int, white_box: bool, where: Path) -> None:
    """Refuse a cache made with other request settings, or (white-box) for another tokenizer or vocabulary."""
    differences = [
        f"{name}: the cache has {manifest.settings.get(name)!r}, this run asks {value!r}"
        for name, value in settings.items()
        if manifest.settings.get(name) != value
    ]
    if white_box:
        for teacher in manifest.teachers:
            if teacher.info.tokenizer_fingerprint != settings["student_tokenizer"]:
                differences.append(f"teacher {teacher.name!r} tokenizer fingerprint {teacher.info.tokenizer_fingerprint} "
                                   f"differs from the student's {settings['student_tokenizer']}")
            if teacher.info.vocab_size != student_vocab_size:
                differences.append(f"teacher {teacher.name!r} vocab_size {teacher.info.vocab_size} differs from the student's {student_vocab_size}")
    if differences:
        raise CacheError(f"teacher cache {where} does not fit this run: " + "; ".join(differences))


def open_for_writing(directory: Path, fresh: Manifest, live: list[TeacherInfo]) -> Manifest:
    """The manifest to add shards to: `fresh` (written) in a new directory, else the existing one if it was
    made the same way by the same teachers; its shards that are missing or fail their checksum are dropped,
    to be made again."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / MANIFEST).exists():
        fresh.write(directory)
        return fresh
    existing = Manifest.read(directory)
    check_live_teachers(existing.teachers, live, directory)
    differences = [
        f"{name}: the cache has {getattr(existing, name)!r}, now {getattr(fresh, name)!r}"
        for name in ("settings", "storage", "data", "shard_rows")
        if getattr(existing, name) != getattr(fresh, name)
    ]
    if differences:
        raise CacheError(f"{directory} holds a teacher cache made differently ({'; '.join(differences)}); "
                         "use another directory, or the same settings to add to it")
    intact = [record for record in existing.shards
              if (directory / record.file).is_file() and sha256_of(directory / record.file) == record.sha256]
    for record in existing.shards:
        if record not in intact:
            print(f"{directory / record.file}: missing or corrupted; it will be made again")
    existing.shards = intact
    existing.write(directory)
    return existing


def record_run(directory: Path, recorder: RecordingSource, settings: dict[str, Any], data: dict[str, Any], steps: tuple[int, int]) -> None:
    """Write what a live run's `recorder` received during `steps` as one shard of the teacher cache in `directory`."""
    if not recorder.entries:
        return
    fresh = Manifest(teachers=[CachedTeacher.of(g) for g in recorder.groups()], settings=settings, storage=StorageFormat(),
                     data=data, shard_rows=0)
    manifest = open_for_writing(directory, fresh, recorder.groups())
    manifest.add(directory, f"steps-{steps[0]:010d}-{steps[1]:010d}.arrow", "steps", steps, recorder.entries)


def check_live_teachers(cached: list[CachedTeacher], live: list[TeacherInfo], where: Path) -> None:
    """The live teachers answering misses must be the cached ones: same names, models, tokenizers, versions."""
    compared = ("model", "tokenizer_fingerprint", "vocab_size", "model_version")
    live_by_name = {teacher.name: teacher for teacher in live}
    differences = []
    for teacher in cached:
        other = live_by_name.get(teacher.name)
        if other is None:
            differences.append(f"no live teacher named {teacher.name!r} (live: {', '.join(live_by_name) or 'none'})")
            continue
        for field in compared:
            ours, theirs = getattr(teacher.info, field, None), getattr(other.info, field, None)
            if ours != theirs:
                differences.append(f"teacher {teacher.name!r} {field}: the cache has {ours!r}, the live teacher {theirs!r}")
    if differences:
        raise CacheError(f"the live teachers differ from those in teacher cache {where}: " + "; ".join(differences))
