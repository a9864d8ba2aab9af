"""The transport-agnostic teacher: validates, resolves prompts, admits, and calls the backend.

HTTP and gRPC adapters hand it plain data and get typed results or a `TeacherError` back.
The backend schedules its own work (the HF backend batches concurrent requests on its worker
thread); the number of requests admitted (running or waiting) is bounded, and a request beyond
the bound is refused at once with `Overloaded` instead of piling up behind the model.

Weights can be replaced while serving (`load_weights`): the new tensors are read and checked
while requests go on, then a gate holds new requests back, the admitted ones finish on the old
weights, the backend swaps, and the gate opens again. So every request runs on one version,
which each result carries (`model_version`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from teacher_service.backends.base import Backend, ChatTemplateOptions, GenerateItem, PromptInput, SamplingParams, ScoreItem
from teacher_service.errors import BackendUnavailable, InvalidRequest, Overloaded, TeacherError
from teacher_service.media import MediaLimits, RequestMedia, has_media, resolve_chat
from teacher_service.metrics import ServiceMetrics
from teacher_service.protocol import (
    ChatMessage,
    GenerateRequest,
    GenerateResponse,
    Limits,
    ModelInfo,
    ScoreRequest,
    SamplingSettings,
    ScoreResponse,
    StrictModel,
    WeightsLoaded,
    parse,
)
from teacher_service.weights import read_weights

T = TypeVar("T")


def sampling_params(settings: SamplingSettings, n: int, max_tokens: int, top_logprobs: int) -> SamplingParams:
    """A backend's `SamplingParams` from a request's sampling settings (native or OpenAI)."""
    fields = settings.sampling_fields()
    return SamplingParams(
        n=n, max_tokens=max_tokens, top_logprobs=top_logprobs,
        **{**fields, "stop": tuple(fields["stop"]), "stop_token_ids": tuple(fields["stop_token_ids"])},
    )


class SwapGate:
    """Requests pass while the weights stay; a swap closes the gate, waits for the requests inside
    to finish, and opens it again once the new weights serve."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._inside = 0

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        while not self._open.is_set():  # a waiter woken by one swap may meet the next one
            await self._open.wait()
        self._inside += 1
        self._empty.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if not self._inside:
                self._empty.set()

    @contextlib.asynccontextmanager
    async def swap(self) -> AsyncIterator[None]:
        self._open.clear()
        try:
            await self._empty.wait()
            yield
        finally:
            self._open.set()


@dataclass(frozen=True)
class ServiceSettings:
    model: str
    backend: str
    max_top_logprobs: int = Limits.max_top_logprobs
    max_samples: int = Limits.max_samples
    max_new_tokens: int = Limits.max_new_tokens
    max_batch: int = Limits.max_batch
    max_queued_requests: int = 64
    max_prompt_chars: int | None = None
    max_images: int = MediaLimits.max_images
    max_videos: int = MediaLimits.max_videos
    max_video_frames: int = MediaLimits.max_video_frames
    max_image_pixels: int = MediaLimits.max_image_pixels
    allowed_local_media_path: str | None = None

    @property
    def media_limits(self) -> MediaLimits:
        return MediaLimits(self.max_images, self.max_videos, self.max_video_frames, self.max_image_pixels, self.allowed_local_media_path)


class TeacherService:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.created = int(time.time())  # the Unix time OpenAI's model list reports
        self._backend: Backend | None = None
        self._limits: Limits | None = None
        self._admitted = 0
        self._draining = False
        self._gate = SwapGate()
        self._push_lock = asyncio.Lock()

    # --- lifecycle ---

    def attach(self, backend: Backend) -> None:
        """Start serving `backend` (loaded elsewhere, so servers can answer /health meanwhile)."""
        description = backend.description
        self._limits = Limits(
            vocab_size=description.vocab_size,
            max_model_len=description.max_model_len,
            max_top_logprobs=self.settings.max_top_logprobs,
            max_samples=self.settings.max_samples,
            max_new_tokens=self.settings.max_new_tokens,
            max_batch=self.settings.max_batch,
            max_prompt_chars=self.settings.max_prompt_chars,
        )
        backend.observe_passes(self.metrics.observe_pass)
        self._backend = backend
        self.metrics.model_version.set(backend.model_version)

    @property
    def ready(self) -> bool:
        """Loaded and not shutting down: where load balancers should send requests."""
        return self._backend is not None and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Report not ready from now on (requests are still answered until the servers stop)."""
        self._draining = True

    def abandon_queued(self) -> None:
        """Answer every request not yet answered with `BackendUnavailable` (503 / UNAVAILABLE,
        which clients retry elsewhere), those on the model now included."""
        if self._backend is not None:
            self._backend.abandon_waiting(
                BackendUnavailable("the teacher shut down before this request was answered; retry")
            )

    def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    @property
    def limits(self) -> Limits:
        self._require_backend()
        return self._limits

    def _require_backend(self) -> Backend:
        if self._backend is None:
            raise BackendUnavailable("the model is not loaded yet")
        return self._backend

    def parse(self, request_type: type[StrictModel], data: Any) -> Any:
        return parse(request_type, data, self.limits)

    # --- endpoints ---

    def model_info(self) -> ModelInfo:
        description = self._require_backend().description
        return ModelInfo(
            model=self.settings.model,
            backend=self.settings.backend,
            tokenizer_fingerprint=description.tokenizer_fingerprint,
            eos_token_id=description.eos_token_id,
            model_version=self._backend.model_version,
            accepts_media=description.accepts_media,
            accepts_video=description.accepts_video,
            max_images=self.settings.max_images,
            max_videos=self.settings.max_videos,
            max_video_frames=self.settings.max_video_frames,
            max_image_pixels=self.settings.max_image_pixels,
            **asdict(self.limits),  # what the teacher enforces is what it reports
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        backend = self._require_backend()
        media = RequestMedia(self.settings.media_limits, request.media)
        items = []
        for index, s in enumerate(request.sequences):
            prompt = await self.prompt_input(s.prompt, f"sequences.{index}.prompt", media)
            completion = await self._completion_ids(s.completion)
            items.append(ScoreItem(prompt.ids, completion, request.top_logprobs, request.temperature, prompt.media))
        for index, item in enumerate(items):
            self._check_length(len(item.prompt_ids) + len(item.completion_ids), f"sequences.{index}")
        results = await self._run("score", lambda: backend.score(items))
        self.metrics.tokens_scored.inc(sum(len(item.completion_ids) for item in items))
        return ScoreResponse(results=[r.with_logprobs_dtype(request.logprobs_dtype) for r in results])

    async def generate(self, request: GenerateRequest, prompts: list[PromptInput] | None = None) -> GenerateResponse:
        """n samples per prompt; `prompts`: the request's prompts already resolved (`prompt_input`)."""
        backend = self._require_backend()
        if prompts is None:
            media = RequestMedia(self.settings.media_limits, request.media)
            prompts = [await self.prompt_input(prompt, f"prompts.{index}", media) for index, prompt in enumerate(request.prompts)]
        for index, prompt in enumerate(prompts):
            self._check_length(len(prompt.ids) + request.max_tokens, f"prompts.{index}")
        params = sampling_params(request, request.n, request.max_tokens, request.top_logprobs)
        results = await self._run("generate", lambda: backend.generate([GenerateItem(p.ids, params, p.media) for p in prompts]))
        self.metrics.tokens_generated.inc(sum(len(s.token_ids) for r in results for s in r.samples))
        return GenerateResponse(results=[
            replace(r, samples=[s.with_logprobs_dtype(request.logprobs_dtype) for s in r.samples]) for r in results
        ])

    async def load_weights(self, files: list[Path], model_version: int | None, field: str) -> WeightsLoaded:
        """Serve the safetensors `files` as `model_version` (none: the current version + 1); a file
        that cannot be read is refused at `field`, a tensor that does not fit at `weights.<name>`.
        One push at a time; requests wait only for the swap itself."""
        backend = self._require_backend()
        async with self._push_lock:
            started = time.perf_counter()
            try:
                tensors = await asyncio.to_thread(read_weights, files, field)
                await asyncio.to_thread(backend.check_weights, tensors)
            except TeacherError:
                self.metrics.weight_pushes.labels("refused").inc()
                raise
            version = model_version or backend.model_version + 1
            async with self._gate.swap():
                await backend.load_weights(tensors, version)
            self.metrics.weight_pushes.labels("loaded").inc()
            self.metrics.model_version.set(version)
            return WeightsLoaded(model_version=version, tensors=len(tensors), seconds=time.perf_counter() - started)

    # --- helpers shared by the OpenAI-compatible layer ---

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._require_backend().decode(ids, skip_special_tokens=skip_special_tokens)

    async def prompt_ids(self, prompt: str | list, template: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
        """Token ids of a prompt; a text gets the tokenizer's special tokens unless `template` says
        otherwise, chat turns are rendered as it says. Tokenising runs on a thread: a long text
        must not hold the event loop (health checks and every other request wait on it)."""
        backend = self._require_backend()
        if isinstance(prompt, str):
            return await asyncio.to_thread(backend.encode, prompt, template.add_special_tokens)
        if isinstance(prompt[0], ChatMessage):
            return (await self.prompt_input(prompt, "prompt", template=template)).ids
        return prompt

    async def prompt_input(
        self, prompt: str | list, field: str, media: RequestMedia | None = None, template: ChatTemplateOptions = ChatTemplateOptions(),
    ) -> PromptInput:
        """A prompt's token ids and, for chat turns holding pictures, its decoded media (refused at
        `field` by a model that takes none); `media`: the request's, shared by its prompts and
        counted against the limits; `template`: how text and chat turns are tokenised."""
        backend = self._require_backend()
        if not (isinstance(prompt, list) and isinstance(prompt[0], ChatMessage)):
            return PromptInput(await self.prompt_ids(prompt, template))
        if has_media(prompt) and not backend.description.accepts_media:
            raise InvalidRequest("this teacher's model takes no images or videos", field=field)
        if has_media(prompt, ("video_url",)) and not backend.description.accepts_video:
            raise InvalidRequest("this teacher's model takes images but no videos", field=field)
        chat = await asyncio.to_thread(resolve_chat, prompt, field, media or RequestMedia(self.settings.media_limits))
        pictures = chat.media()
        if pictures is None:
            return PromptInput(await asyncio.to_thread(backend.encode_chat, chat.messages, template))
        return PromptInput(*await asyncio.to_thread(backend.encode_chat_media, chat.messages, pictures, template))

    async def _completion_ids(self, completion: str | list[int]) -> list[int]:
        if isinstance(completion, str):
            return await asyncio.to_thread(self._require_backend().encode_continuation, completion)
        return completion

    def _check_length(self, tokens: int, field: str) -> None:
        if tokens > self.limits.max_model_len:
            raise InvalidRequest(
                f"{tokens} tokens exceed the teacher's context of {self.limits.max_model_len}", field=field
            )

    async def _run(self, endpoint: str, work: Callable[[], Awaitable[T]]) -> T:
        """Admit the request or refuse it, then await the backend's `work()`."""
        if self._admitted >= self.settings.max_queued_requests:
            self.metrics.rejected.labels(endpoint).inc()
            raise Overloaded(
                f"{self._admitted} requests are already queued (limit {self.settings.max_queued_requests}); retry later"
            )
        self._admitted += 1
        self.metrics.queue_depth.set(self._admitted)
        started = time.perf_counter()
        try:
            async with self._gate.request():
                return await work()
        finally:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)
            self.metrics.backend_seconds.labels(endpoint).observe(time.perf_counter() - started)
