"""A pool of teacher endpoints: replicas grouped into logical teachers, balanced, retried, failed over.

Endpoint specs are strings, a URL with an optional fragment of options:

    grpc://node1:50051
    http://node2:8000#name=math&tags=math,large&weight=2&max_concurrency=8
    openai+http://node3:8000/v1?model=Qwen/Qwen2.5-7B#name=qwen&fingerprint=3b69…&vocab_size=152064

| key               | meaning                                                                 | default      |
|-------------------|-------------------------------------------------------------------------|--------------|
| `name`            | the logical teacher this endpoint serves; endpoints with one name are   | see below    |
|                   | replicas of one teacher                                                  |              |
| `tags`            | comma-separated labels, to pick teachers by task (`pool.groups("math")`) | none         |
| `weight`          | the teacher's weight in a mixture (> 0); replicas must agree             | 1            |
| `max_concurrency` | requests in flight at this endpoint at once (>= 1)                       | 8            |
| `fingerprint`     | the tokenizer fingerprint, for endpoints that cannot report it (OpenAI)  | reported     |
| `vocab_size`      | the vocabulary size, likewise                                            | reported     |
| `model_version`   | the weights' version every answer must carry (replicas must agree)       | any          |

Grouping: endpoints with the same explicit `name` are one teacher (they must report the same
tokenizer fingerprint and vocabulary size); endpoints without one are grouped by (model,
tokenizer fingerprint) as they report them, and named after the model's last path component.
A group's tags are the union of its endpoints' tags.

Requests (`score`, `generate`) go to the group's live replica with the fewest requests in
flight. `TeacherUnavailable` is retried with exponential backoff (tenacity), on another replica
when there is one; the failing replica is marked dead and probed again (with `model_info`)
after a backoff of its own. When no replica is alive the request waits, probing, for up to
`max_wait` seconds, then raises `TeacherUnavailable`. `TeacherRequestError` propagates at once.
A teacher can be pinned to a `model_version` (the spec option, or `pool.pin_version` after a
weight push): an answer computed with another version counts as `TeacherUnavailable` from that
replica, which stays out of service until its model info reports the pinned version, so the
request is retried elsewhere or waits for it (and after `max_wait` fails, naming both versions).
A request's answer is always whole: the pool returns the full answer or raises, so a training
step is never lost half-way nor counted twice. A batch larger than the teacher's `max_batch`
goes as several requests (spread over the replicas like any others), answered in order; so does one
holding more distinct images or videos than the teacher's `max_images` / `max_videos`, and to a
vision teacher every distinct picture travels once per request (the request's `media` list, named
`media:i` by the parts that show it: the samples of one prompt, the candidates scored after it).

`PoolRunner` runs a pool in a background thread for synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Awaitable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urldefrag, urlsplit

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from teacher_service.protocol import GenerateResponse, ModelInfo, ScoreResponse
from trainer_client.media import pictures, share_media
from trainer_client.teachers import (
    CLIENTS,
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailable,
    connect_client,
)

log = logging.getLogger("potstill.pool")
T = TypeVar("T")

# --- endpoint specs ---


@dataclass(frozen=True)
class TeacherSpec:
    """One endpoint and its options; `TeacherSpec.parse("URL#name=…&tags=a,b&weight=2")`."""

    url: str
    name: str | None = None
    tags: tuple[str, ...] = ()
    weight: float = 1.0
    max_concurrency: int = 8
    fingerprint: str | None = None
    vocab_size: int | None = None
    model_version: int | None = None

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme.lower()
        if scheme not in CLIENTS:
            raise ValueError(f"teacher {self.url!r}: the URL scheme must be one of {', '.join(sorted(CLIENTS))}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"teacher {self.url!r}: weight must be a positive number, got {self.weight}")
        if self.max_concurrency < 1:
            raise ValueError(f"teacher {self.url!r}: max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.name is not None and not self.name:
            raise ValueError(f"teacher {self.url!r}: name must not be empty")

    @classmethod
    def parse(cls, text: str) -> TeacherSpec:
        url, fragment = urldefrag(text.strip())
        options: dict[str, str] = {}
        for key, value in parse_qsl(fragment, keep_blank_values=True):
            if key not in _SPEC_OPTIONS:
                raise ValueError(f"teacher {text!r}: unknown option {key!r}; known: {', '.join(_SPEC_OPTIONS)}")
            if key in options:
                raise ValueError(f"teacher {text!r}: option {key!r} given twice")
            options[key] = value
        try:
            values = {key: _SPEC_OPTIONS[key](value) for key, value in options.items()}
        except ValueError as error:
            raise ValueError(f"teacher {text!r}: {error}") from None
        return cls(url=url, **values)

    def __str__(self) -> str:
        return self.url


def _tags(value: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in value.split(",") if tag.strip())


_SPEC_OPTIONS = {
    "name": str,
    "tags": _tags,
    "weight": float,
    "max_concurrency": int,
    "fingerprint": str,
    "vocab_size": int,
    "model_version": int,
}


# --- endpoints and groups ---


@dataclass
class EndpointStats:
    """Traffic of one endpoint, for the training report."""

    requests: int = 0  # attempts sent here (retries included)
    failures: int = 0  # attempts that ended in TeacherUnavailable
    retries: int = 0  # attempts that retried a request which had failed before (here or elsewhere)
    refused: int = 0  # attempts that ended in TeacherRequestError
    seconds: float = 0.0  # wall time of the attempts, waiting for a concurrency slot excluded


class Endpoint:
    """One replica: its client, its concurrency limit, its health and its traffic."""

    def __init__(self, spec: TeacherSpec, client: TeacherClient, info: ModelInfo):
        self.spec = spec
        self.client = client
        self.info = info
        self.slots = asyncio.Semaphore(spec.max_concurrency)
        self.outstanding = 0
        self.alive = True
        self.stats = EndpointStats()
        self.probe_delay = 0.0
        self.next_probe = 0.0
        self.probing: asyncio.Task | None = None
        self.down_reason = ""  # why it is out of service, for the error that gives up on it
        self.pinned_version = spec.model_version  # answers on another version are refused
        self.last_version = info.model_version  # of the latest answer (0: the server does not say)

    def check_version(self, versions: set[int]) -> None:
        """Raise `TeacherUnavailable` when an answer's results were computed with other weights than the pinned ones."""
        if self.pinned_version is not None and versions != {self.pinned_version}:
            raise TeacherUnavailable(
                f"answered on model_version {', '.join(map(str, sorted(versions)))}, but the pool pins "
                f"{self.pinned_version}", url=self.url,
            )
        self.last_version = max(versions, default=self.last_version)

    @property
    def url(self) -> str:
        return self.spec.url

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, alive={self.alive}, outstanding={self.outstanding})"


@dataclass
class TeacherGroup:
    """One logical teacher: replicas serving the same model."""

    name: str
    tags: tuple[str, ...]
    weight: float
    info: ModelInfo
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [endpoint.url for endpoint in self.endpoints]

    @property
    def alive(self) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.alive]

    @property
    def model_version(self) -> int:
        """The version of the group's latest answer (0 where its servers do not say)."""
        return max(endpoint.last_version for endpoint in self.endpoints)


def _default_name(info: ModelInfo) -> str:
    return PurePosixPath(info.model.rstrip("/")).name or info.model or "teacher"


def _group_endpoints(endpoints: list[Endpoint]) -> list[TeacherGroup]:
    """Replicas by explicit name, else by (model, fingerprint); checks that replicas agree."""
    by_key: dict[tuple, list[Endpoint]] = {}
    for endpoint in endpoints:
        info = endpoint.info
        key = ("name", endpoint.spec.name) if endpoint.spec.name else ("model", info.model, info.tokenizer_fingerprint)
        by_key.setdefault(key, []).append(endpoint)
    groups: list[TeacherGroup] = []
    taken = {key[1] for key in by_key if key[0] == "name"}
    for key, members in by_key.items():
        first = members[0]
        name = key[1] if key[0] == "name" else _unique(_default_name(first.info), taken)
        taken.add(name)
        for other in members[1:]:
            if (other.info.tokenizer_fingerprint, other.info.vocab_size) != (first.info.tokenizer_fingerprint, first.info.vocab_size):
                raise ValueError(
                    f"replicas of teacher {name!r} serve different tokenizers: {first.url} has fingerprint "
                    f"{first.info.tokenizer_fingerprint or 'unknown'} (vocab {first.info.vocab_size}), {other.url} has "
                    f"{other.info.tokenizer_fingerprint or 'unknown'} (vocab {other.info.vocab_size}); give them different names"
                )
            for option in ("weight", "model_version"):
                if getattr(other.spec, option) != getattr(first.spec, option):
                    raise ValueError(f"replicas of teacher {name!r} disagree on {option}: {getattr(first.spec, option)} "
                                     f"({first.url}) vs {getattr(other.spec, option)} ({other.url})")
        tags = tuple(dict.fromkeys(tag for member in members for tag in member.spec.tags))
        groups.append(TeacherGroup(name=name, tags=tags, weight=first.spec.weight, info=first.info, endpoints=members))
    return groups


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 2
    while candidate in taken:
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate


def _pinned(spec: TeacherSpec, info: ModelInfo) -> ModelInfo:
    """The reported info, completed with the spec's fingerprint / vocab_size where the endpoint cannot report them."""
    update: dict[str, Any] = {}
    for key, pinned, unknown in (("tokenizer_fingerprint", spec.fingerprint, ""), ("vocab_size", spec.vocab_size, 0)):
        reported = getattr(info, key)
        if pinned is None:
            continue
        if reported != unknown and reported != pinned:
            raise ValueError(f"teacher {spec.url}: the spec pins {key}={pinned} but the endpoint reports {reported}")
        update[key] = pinned
    return info.model_copy(update=update) if update else info


def _check_white_box(group: TeacherGroup, student_fingerprint: str | None, student_vocab_size: int | None) -> None:
    """White-box methods compare distributions id by id: same tokenizer, same vocabulary size."""
    info = group.info
    if student_fingerprint is not None and info.tokenizer_fingerprint != student_fingerprint:
        reported = info.tokenizer_fingerprint or "unknown (pin it with '#fingerprint=…' once you have checked it)"
        raise ValueError(
            f"teacher {group.name!r} ({', '.join(group.urls)}) tokenizes differently from the student: tokenizer "
            f"fingerprint {reported} vs the student's {student_fingerprint}; white-box methods (logit KD, scoring) "
            "need the same tokenizer, black-box ones (sft, seq-kd) do not"
        )
    if student_vocab_size is not None and info.vocab_size != student_vocab_size:
        raise ValueError(
            f"teacher {group.name!r} ({', '.join(group.urls)}) has vocab_size {info.vocab_size or 'unknown'} but the "
            f"student has {student_vocab_size}; white-box methods need equal vocabulary sizes, so every teacher "
            "top-k id is a row of the student's output layer"
        )


# --- the pool ---


class TeacherPool:
    """Logical teachers over any number of endpoints; build it with `await TeacherPool.connect(specs)`."""

    def __init__(
        self,
        groups: list[TeacherGroup],
        *,
        max_wait: float = 600.0,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        probe_initial: float = 0.5,
        probe_max: float = 5.0,
        probe_timeout: float = 10.0,
    ):
        self._groups = {group.name: group for group in groups}
        self.max_wait = max_wait
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.probe_initial = probe_initial
        self.probe_max = probe_max
        self.probe_timeout = probe_timeout
        self._closed = False

    @classmethod
    async def connect(
        cls,
        specs: Iterable[str | TeacherSpec],
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        student_fingerprint: str | None = None,
        student_vocab_size: int | None = None,
        require_white_box: bool = False,
        max_wait: float = 600.0,
        ca_file: str | None = None,
        tokenizer: Any | None = None,
        **pool_options: Any,
    ) -> TeacherPool:
        """Read every endpoint's model info, group replicas, and check the tokenizers.

        An endpoint that does not answer at start raises `TeacherUnavailable` naming it (all of
        them, when several fail); an endpoint that refuses (a wrong API key) raises
        `TeacherRequestError`. With `require_white_box`, a teacher whose tokenizer fingerprint
        differs from `student_fingerprint`, or whose vocab_size differs from
        `student_vocab_size` (the rule: equal sizes), is refused with `ValueError`.
        timeout: seconds per request; `pool_options` go to `TeacherPool(...)` (retry and probe delays).
        """
        specs = [TeacherSpec.parse(s) if isinstance(s, str) else s for s in specs]
        if not specs:
            raise ValueError("a teacher pool needs at least one endpoint")
        duplicates = sorted({s.url for s in specs if sum(o.url == s.url for o in specs) > 1})
        if duplicates:
            raise ValueError(f"teacher endpoints given more than once: {', '.join(duplicates)}")
        clients = [
            connect_client(s.url, api_key=api_key, timeout=timeout, ca_file=ca_file, tokenizer=tokenizer) for s in specs
        ]
        try:
            infos = await _model_infos(specs, clients)
            endpoints = [Endpoint(spec, client, _pinned(spec, info)) for spec, client, info in zip(specs, clients, infos)]
            groups = _group_endpoints(endpoints)
            if require_white_box:
                for group in groups:
                    _check_white_box(group, student_fingerprint, student_vocab_size)
        except BaseException:
            await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
            raise
        for group in groups:
            log.info("teacher %s: %d replica(s) of %s (%s)", group.name, len(group.endpoints), group.info.model, ", ".join(group.urls))
        return cls(groups, max_wait=max_wait, **pool_options)

    # --- looking up teachers ---

    def groups(self, tag: str | None = None) -> list[TeacherGroup]:
        """The logical teachers, in spec order; only those tagged `tag` when given."""
        return [group for group in self._groups.values() if tag is None or tag in group.tags]

    def group(self, name: str) -> TeacherGroup:
        if name not in self._groups:
            raise KeyError(f"no teacher named {name!r}; the pool has {', '.join(self._groups)}")
        return self._groups[name]

    def pin_version(self, group_name: str, version: int | None) -> None:
        """From now on accept answers of teacher `group_name` computed with weights `version` only (None: any)."""
        for endpoint in self.group(group_name).endpoints:
            endpoint.pinned_version = version
            if version is not None:
                endpoint.last_version = version

    def versions(self) -> dict[str, int]:
        """Each teacher's version of its latest answer, where its servers report one."""
        return {name: group.model_version for name, group in self._groups.items() if group.model_version}

    # --- requests ---

    async def score(self, group_name: str, request: dict) -> ScoreResponse:
        """The teacher's top-k distributions (a /v1/score body), one result per sequence, in order."""
        return ScoreResponse(await self._split_by_max_batch(group_name, "score", request, "sequences"))

    async def generate(self, group_name: str, request: dict) -> GenerateResponse:
        """Samples (a /v1/generate body), one result per prompt, in order."""
        return GenerateResponse(await self._split_by_max_batch(group_name, "generate", request, "prompts"))

    async def _split_by_max_batch(self, group_name: str, method: str, request: dict, items_key: str) -> list:
        """The results of `request`, sent concurrently as requests within the teacher's limits: at most
        `max_batch` items, `max_images` distinct images and `max_videos` distinct videos each; to a
        vision teacher, each distinct picture goes once per request (`share_media`)."""
        info = self.group(group_name).info
        parts = [{**request, items_key: chunk} for chunk in _within_limits(request[items_key], items_key, info)]
        if info.accepts_media:
            parts = [share_media(part, items_key) for part in parts]
        if len(parts) == 1:
            return (await self._request(group_name, method, parts[0])).results
        answers = await asyncio.gather(*(self._request(group_name, method, part) for part in parts))
        return [result for answer in answers for result in answer.results]

    async def _request(self, group_name: str, method: str, request: dict) -> Any:
        group = self.group(group_name)
        tried: set[Endpoint] = set()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TeacherUnavailable),
            # retry_initial, doubling up to retry_max, plus up to retry_initial of jitter.
            wait=wait_exponential(multiplier=self.retry_initial, max=self.retry_max) + wait_random(0, self.retry_initial),
            stop=stop_after_delay(self.max_wait),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    endpoint = await self._choose(group, tried)
                    is_retry = attempt.retry_state.attempt_number > 1
                    tried.add(endpoint)
                    result = await self._attempt(endpoint, method, request, is_retry)
        except TeacherUnavailable as error:
            raise TeacherUnavailable(
                f"teacher {group.name!r} did not answer within max_wait={self.max_wait:g}s "
                f"(replicas: {', '.join(group.urls)}); last error: {error}"
            ) from error
        return result

    async def _choose(self, group: TeacherGroup, tried: set[Endpoint]) -> Endpoint:
        """The live replica with the fewest requests in flight (untried ones first); probes dead ones that are due."""
        if self._closed:
            raise RuntimeError("the teacher pool is closed")
        alive = group.alive
        # With no replica alive, every dead one is probed now: a teacher back from an outage is
        # used again within one retry delay, not after its probe backoff.
        due = [e for e in group.endpoints if not e.alive and e.probing is None and (not alive or e.next_probe <= time.monotonic())]
        for endpoint in due:
            endpoint.probing = asyncio.create_task(self._probe(endpoint))
        if not alive:
            probes = [e.probing for e in group.endpoints if e.probing is not None]
            if probes:
                await asyncio.wait(probes)
            alive = group.alive
        if not alive:
            reasons = "; ".join(f"{e.url}: {e.down_reason}" for e in group.endpoints if e.down_reason)
            raise TeacherUnavailable(f"no replica of teacher {group.name!r} is alive" + (f" ({reasons})" if reasons else ""))
        return min(alive, key=lambda e: (e in tried, e.outstanding, e.stats.requests))

    async def _attempt(self, endpoint: Endpoint, method: str, request: dict, is_retry: bool) -> Any:
        endpoint.outstanding += 1
        try:
            async with endpoint.slots:
                if not endpoint.alive:  # it failed while this request waited for a slot
                    raise TeacherUnavailable("marked dead while this request waited for it", url=endpoint.url)
                endpoint.stats.requests += 1
                endpoint.stats.retries += is_retry
                started = time.perf_counter()
                try:
                    answer = await getattr(endpoint.client, method)(request)
                    endpoint.check_version({result.model_version for result in answer.results})
                    return answer
                except TeacherUnavailable as error:
                    endpoint.stats.failures += 1
                    if not error.overloaded:
                        self._mark_dead(endpoint, error)
                    raise
                except TeacherRequestError:
                    endpoint.stats.refused += 1
                    raise
                finally:
                    endpoint.stats.seconds += time.perf_counter() - started
        finally:
            endpoint.outstanding -= 1

    # --- health ---

    def _mark_dead(self, endpoint: Endpoint, error: Exception) -> None:
        if not endpoint.alive:
            return
        endpoint.alive = False
        endpoint.down_reason = error.message if isinstance(error, TeacherUnavailable) else str(error)
        endpoint.probe_delay = self.probe_initial
        endpoint.next_probe = time.monotonic() + endpoint.probe_delay
        log.warning("teacher endpoint %s marked dead: %s", endpoint.url, error)

    async def _probe(self, endpoint: Endpoint) -> None:
        """Ask a dead endpoint for its model info; back in service if it answers with the same model."""
        try:
            info = _pinned(endpoint.spec, await asyncio.wait_for(endpoint.client.model_info(), self.probe_timeout))
            same = (info.tokenizer_fingerprint, info.vocab_size) == (endpoint.info.tokenizer_fingerprint, endpoint.info.vocab_size)
            if not same:
                log.error("teacher endpoint %s came back with another tokenizer (%s); kept out of service", endpoint.url, info.tokenizer_fingerprint)
            pinned = endpoint.pinned_version in (None, info.model_version)
            if not pinned:
                endpoint.down_reason = f"serves model_version {info.model_version}, but the pool pins {endpoint.pinned_version}"
            endpoint.alive = same and pinned
        except (TeacherUnavailable, TeacherRequestError, asyncio.TimeoutError, ValueError):
            endpoint.alive = False
        finally:
            endpoint.probing = None
        if endpoint.alive:
            log.info("teacher endpoint %s is back in service", endpoint.url)
        else:
            endpoint.probe_delay = min(max(endpoint.probe_delay * 2, self.probe_initial), self.probe_max)
            endpoint.next_probe = time.monotonic() + endpoint.probe_delay

    # --- reporting and shutdown ---

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per endpoint URL: its group, health and traffic (`EndpointStats`), JSON-ready."""
        return {
            endpoint.url: {"group": group.name, "alive": endpoint.alive, "outstanding": endpoint.outstanding,
                           "model_version": endpoint.last_version, **asdict(endpoint.stats)}
            for group in self._groups.values()
            for endpoint in group.endpoints
        }

    async def close(self) -> None:
        self._closed = True
        endpoints = [endpoint for group in self._groups.values() for endpoint in group.endpoints]
        probes = [endpoint.probing for endpoint in endpoints if endpoint.probing is not None]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await asyncio.gather(*(endpoint.client.close() for endpoint in endpoints), return_exceptions=True)

    async def __aenter__(self) -> TeacherPool:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _model_infos(specs: list[TeacherSpec], clients: list[TeacherClient]) -> list[ModelInfo]:
    """Every endpoint's model info, or one error naming every endpoint that failed."""
    answers = await asyncio.gather(*(client.model_info() for client in clients), return_exceptions=True)
    failed = [(spec, answer) for spec, answer in zip(specs, answers) if isinstance(answer, BaseException)]
    for _, answer in failed:
        if not isinstance(answer, (TeacherUnavailable, TeacherRequestError)):
            raise answer
    if failed:
        kind = TeacherUnavailable if any(isinstance(error, TeacherUnavailable) for _, error in failed) else TeacherRequestError
        details = "; ".join(f"{spec.url} ({error.message})" for spec, error in failed)
        raise kind(f"{len(failed)} of {len(specs)} teacher endpoint(s) did not answer at start: {details}", url=failed[0][0].url)
    return list(answers)


def _within_limits(items: list, items_key: str, info: ModelInfo) -> list[list]:
    """The items in consecutive runs within the teacher's limits (0: none): `max_batch` items,
    `max_images` distinct images, `max_videos` distinct videos (a picture shown twice counts once,
    as teachers count it). An item beyond a limit on its own goes alone, for the teacher to refuse."""
    runs: list[list] = [[]]
    images: set[str] = set()
    videos: set[str] = set()
    for item in items:
        shown_images, shown_videos = pictures(item["prompt"] if items_key == "sequences" else item)
        full = (
            (info.max_batch and len(runs[-1]) >= info.max_batch)
            or (info.max_images and len(images | shown_images) > info.max_images)
            or (info.max_videos and len(videos | shown_videos) > info.max_videos)
        )
        if full and runs[-1]:
            runs.append([])
            images, videos = set(), set()
        runs[-1].append(item)
        images |= shown_images
        videos |= shown_videos
    return runs


# --- a synchronous facade ---


class PoolRunner:
    """A `TeacherPool` on an event loop in a background thread, for code outside asyncio.

        with PoolRunner.connect(["grpc://node1:50051", "grpc://node2:50051"]) as runner:
            future = runner.submit(runner.pool.score("tiny-teacher", request))  # concurrent.futures.Future
            answer = future.result()

    Coroutines passed to `submit` / `run` run on the pool's loop, so the pool must only be used there.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="potstill-teacher-pool", daemon=True)
        self._thread.start()
        self.pool: TeacherPool | None = None

    @classmethod
    def connect(cls, specs: Iterable[str | TeacherSpec], **options: Any) -> PoolRunner:
        """Start the loop and `TeacherPool.connect(specs, **options)` on it."""
        runner = cls()
        try:
            runner.pool = runner.run(TeacherPool.connect(list(specs), **options))
        except BaseException:
            runner._stop_loop()
            raise
        return runner

    def submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        return self.submit(coroutine).result(timeout)

    def score(self, group_name: str, request: dict) -> concurrent.futures.Future[ScoreResponse]:
        return self.submit(self.pool.score(group_name, request))

    def generate(self, group_name: str, request: dict) -> concurrent.futures.Future[GenerateResponse]:
        return self.submit(self.pool.generate(group_name, request))

    def close(self) -> None:
        """Cancel what is still running on the loop, close the pool's clients, stop the thread."""
        if self._loop.is_running():
            self.run(self._shutdown())
        self._stop_loop()

    async def _shutdown(self) -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> PoolRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
