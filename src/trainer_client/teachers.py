"""Teacher clients: one async interface over gRPC, HTTP and OpenAI-compatible servers.

`connect_client(url)` picks the implementation from the URL's scheme (the `CLIENTS` dict):

| scheme                          | client                | wire                                            |
|---------------------------------|-----------------------|-------------------------------------------------|
| `grpc://host:port`              | `GrpcTeacherClient`   | potstill.v1.Teacher over grpc.aio, round-robin  |
|                                 |                       | over every address the host resolves to         |
| `grpcs://host:port`             | `GrpcTeacherClient`   | the same over TLS (system roots, or `ca_file`)  |
| `http://host:port`, `https://…` | `HttpTeacherClient`   | /v1/score, /v1/generate with protobuf bodies    |
| `openai+http://host:port/v1`,   | `OpenAITeacherClient` | /v1/completions of vLLM, SGLang, our own server |
| `openai+https://…/v1`           |                       | (`?model=NAME` picks one of several served)     |

Every client speaks in the teacher service's own types: requests are dicts shaped like the JSON
bodies of /v1/score and /v1/generate, answers are `teacher_service.protocol` results over numpy
arrays. Every failure is one of two exceptions:

- `TeacherUnavailable`: transient, worth retrying or failing over (connection refused or reset,
  timeout, HTTP 408/429/5xx, gRPC UNAVAILABLE / RESOURCE_EXHAUSTED (overload) / DEADLINE_EXCEEDED /
  CANCELLED / ABORTED / UNKNOWN / INTERNAL). `overloaded` is True when the teacher is up but
  refused for load. A server fault counts as transient: a replica shutting down or a crashed
  handler must not end a training run; a fault that persists ends it after the pool's `max_wait`.
- `TeacherRequestError`: the teacher refused this request (HTTP 4xx, gRPC INVALID_ARGUMENT /
  UNAUTHENTICATED / ...), with the server's message and field: it would be refused anywhere.

Potstill teachers send the error's kind (and field) in gRPC trailing metadata; the client
classifies by it (`_KIND_TRANSIENT`), by the status code only where a server sends none.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import numpy as np

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.protocol import (
    GenerateResponse,
    GenerateResult,
    ModelInfo,
    Sample,
    ScoredSequence,
    ScoreResponse,
)

PROTOBUF = "application/x-protobuf"
# The teacher's own limit (teacher_service.grpc_server.DEFAULT_MAX_MESSAGE_BYTES), not imported:
# a trainer node does not install the server's dependencies.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20


# --- errors ---


class TeacherClientError(Exception):
    """Base of the two client errors: the endpoint's URL, the server's message and field."""

    def __init__(self, message: str, *, url: str | None = None, field: str | None = None):
        self.message = message
        self.url = url
        self.field = field
        where = f"{url}: " if url else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")


class TeacherUnavailable(TeacherClientError):
    """Transient: the teacher did not answer (down, unreachable, too slow or overloaded)."""

    def __init__(self, message: str, *, url: str | None = None, field: str | None = None, overloaded: bool = False):
        super().__init__(message, url=url, field=field)
        self.overloaded = overloaded


class TeacherRequestError(TeacherClientError):
    """The teacher refused (or failed on) this request; retrying it elsewhere would not help."""


_TRANSIENT_HTTP = {408: False, 429: True, 500: False, 502: False, 503: False, 504: False}  # status -> overloaded
# The kinds of teacher_service.errors (not imported: a trainer node does not install the server):
# kind -> overloaded, for the transient ones; any other kind is the request's own fault.
_KIND_METADATA, _FIELD_METADATA = "potstill-error-kind", "potstill-error-field"
_KIND_TRANSIENT = {"overloaded": True, "unavailable": False, "internal_error": False, "request_timeout": False}
# Servers that send no kind: by status code. RESOURCE_EXHAUSTED without a kind is gRPC's own
# message size limit, which the same request would hit again anywhere.
_TRANSIENT_GRPC = {
    grpc.StatusCode.UNAVAILABLE: False,
    grpc.StatusCode.DEADLINE_EXCEEDED: False,
    grpc.StatusCode.CANCELLED: False,
    grpc.StatusCode.ABORTED: False,
    grpc.StatusCode.UNKNOWN: False,
    grpc.StatusCode.INTERNAL: False,
}
# How the teacher service words gRPC details: "field: message" (teacher_service.errors.grpc_details).
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)


def _grpc_error(url: str, error: grpc.aio.AioRpcError) -> TeacherClientError:
    details = error.details() or error.code().name
    trailers = dict(error.trailing_metadata() or ())
    field = trailers.get(_FIELD_METADATA)
    if field and details.startswith(f"{field}: "):
        details = details.removeprefix(f"{field}: ")
    elif not trailers and (match := _FIELD_PREFIX.match(details)):  # an older teacher
        field, details = match.group(1), match.group(2)
    message = f"{details} ({error.code().name})"
    kind = trailers.get(_KIND_METADATA)
    transient = _KIND_TRANSIENT if kind is not None else _TRANSIENT_GRPC
    key = kind if kind is not None else error.code()
    if key in transient:
        return TeacherUnavailable(message, url=url, field=field, overloaded=transient[key])
    return TeacherRequestError(message, url=url, field=field)


def _error_body(response: httpx.Response) -> tuple[str, str | None]:
    """(message, field) from the error shapes of Potstill, OpenAI, vLLM and FastAPI."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase, None
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or str(error)
        field = error.get("field") or error.get("param")
        return str(message), (str(field) if field else None)
    return str(error), None


def _http_error(url: str, response: httpx.Response) -> TeacherClientError:
    message, field = _error_body(response)
    message = f"{message} (HTTP {response.status_code})"
    if response.status_code in _TRANSIENT_HTTP:
        return TeacherUnavailable(message, url=url, field=field, overloaded=_TRANSIENT_HTTP[response.status_code])
    return TeacherRequestError(message, url=url, field=field)


def _encode(url: str, build: Callable[[dict], Any], request: dict) -> Any:
    """A request dict as protobuf, or a TeacherRequestError saying why it cannot be one."""
    try:
        return build(request)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        field = error.args[0] if isinstance(error, KeyError) else None
        raise TeacherRequestError(f"malformed request: {type(error).__name__}: {error}", url=url, field=field) from None


def _decode(url: str, convert: Callable[[Any], Any], message: Any) -> Any:
    try:
        return convert(message)
    except ValueError as error:
        raise TeacherRequestError(f"malformed answer from the teacher: {error}", url=url) from None


# --- the interface ---


class TeacherClient(Protocol):
    """One teacher endpoint. Answers in `teacher_service.protocol` types; raises only the two errors above."""

    url: str

    async def model_info(self) -> ModelInfo: ...

    async def score(self, request: dict) -> ScoreResponse: ...

    async def generate(self, request: dict) -> GenerateResponse: ...

    async def close(self) -> None: ...


# --- gRPC ---


class GrpcTeacherClient:
    """potstill.v1.Teacher over grpc.aio; the channel is opened on first use, in the caller's event loop."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        ca_file: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dns_server: str | None = None,
        **_: Any,
    ):
        """dns_server: host:port of the DNS server that resolves the URL's host (default: the system's)."""
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"{url!r} names no host:port")
        self.url = url
        self.timeout = timeout
        # Every address the name resolves to (each pod behind a headless Service) gets a
        # connection, and requests go round-robin over them instead of sticking to the first.
        self._target = f"dns://{dns_server or ''}/{parts.netloc}"
        self._tls = parts.scheme == "grpcs"
        self._ca_file = ca_file
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A restarted teacher is found again within seconds, not after gRPC's default 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 5000),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: teacher_pb2_grpc.TeacherStub | None = None

    def _teacher(self) -> teacher_pb2_grpc.TeacherStub:
        if self._stub is None:
            if self._tls:
                roots = Path(self._ca_file).read_bytes() if self._ca_file else None
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                self._channel = grpc.aio.secure_channel(self._target, credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            self._stub = teacher_pb2_grpc.TeacherStub(self._channel)
        return self._stub

    async def _call(self, method: str, message: Any) -> Any:
        try:
            return await getattr(self._teacher(), method)(message, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _grpc_error(self.url, error) from None

    async def model_info(self) -> ModelInfo:
        return wire.model_info(await self._call("GetModelInfo", pb.ModelInfoRequest()))

    async def score(self, request: dict) -> ScoreResponse:
        answer = await self._call("Score", _encode(self.url, wire.score_request_pb, request))
        return _decode(self.url, wire.score_response, answer)

    async def generate(self, request: dict) -> GenerateResponse:
        answer = await self._call("Generate", _encode(self.url, wire.generate_request_pb, request))
        return _decode(self.url, wire.generate_response, answer)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


# --- HTTP ---


class _HttpSession:
    """An httpx.AsyncClient whose failures are already classified into the two client errors."""

    def __init__(
        self,
        url: str,
        base_url: str,
        api_key: str | None,
        timeout: float,
        ca_file: str | None,
        transport: httpx.AsyncBaseTransport | None,
    ):
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=verify,
            transport=transport,
        )

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
            raise TeacherUnavailable(f"{type(error).__name__}: {error or 'no answer'}", url=self.url) from None
        except httpx.HTTPError as error:
            raise TeacherRequestError(f"{type(error).__name__}: {error}", url=self.url) from None
        if response.status_code >= 400:
            raise _http_error(self.url, response)
        return response

    async def close(self) -> None:
        await self._client.aclose()


class HttpTeacherClient:
    """The teacher's HTTP endpoints with protobuf bodies both ways (no JSON lists of floats)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        ca_file: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **_: Any,
    ):
        self.url = url
        self._http = _HttpSession(url, url.rstrip("/"), api_key, timeout, ca_file, transport)

    async def _exchange(self, method: str, path: str, message: Any | None, answer_type: type) -> Any:
        headers = {"Accept": PROTOBUF}
        content = None
        if message is not None:
            headers["Content-Type"] = PROTOBUF
            content = message.SerializeToString()
        response = await self._http.send(method, path, content=content, headers=headers)
        if PROTOBUF not in response.headers.get("content-type", ""):
            raise TeacherRequestError(
                f"{path} answered {response.headers.get('content-type')!r}, not protobuf: is this a Potstill teacher?",
                url=self.url,
            )
        return _decode(self.url, answer_type.FromString, response.content)

    async def model_info(self) -> ModelInfo:
        return wire.model_info(await self._exchange("GET", "/v1/model", None, pb.ModelInfo))

    async def score(self, request: dict) -> ScoreResponse:
        message = _encode(self.url, wire.score_request_pb, request)
        return _decode(self.url, wire.score_response, await self._exchange("POST", "/v1/score", message, pb.ScoreResponse))

    async def generate(self, request: dict) -> GenerateResponse:
        message = _encode(self.url, wire.generate_request_pb, request)
        answer = await self._exchange("POST", "/v1/generate", message, pb.GenerateResponse)
        return _decode(self.url, wire.generate_response, answer)

    async def close(self) -> None:
        await self._http.close()


# --- OpenAI-compatible servers ---

# vLLM's request extensions that put token ids in the answer: `return_token_ids` adds
# choices[].token_ids, `return_tokens_as_token_ids` writes every token of the logprobs object as
# "token_id:N". Servers that refuse unknown fields (the official API, our own) answer 400 naming
# them; the client then stops sending them and falls back to token strings.
_ID_EXTENSIONS = {"return_token_ids": True, "return_tokens_as_token_ids": True}
_TOKEN_ID_PREFIX = "token_id:"


class OpenAITeacherClient:
    """Any OpenAI-compatible completions server (vLLM, SGLang, our own /v1/completions) as a teacher.

    Scoring uses `echo=true, max_tokens=0` (1 where a server refuses 0) and vLLM's
    `prompt_logprobs=k` extension: a list aligned with the prompt's tokens, None first, then
    `{str(token_id): {"logprob", "rank", "decoded_token"}}` holding the top k and the actual token.
    The prompt and the completion are sent as token ids, so the completion's positions are known
    exactly; text is tokenized with `tokenizer` (the student's, which white-box distillation
    assumes the teacher shares) or, without one, with vLLM's /tokenize. A server that returns no
    prompt log-probs (the official OpenAI API) supports only black-box methods: scoring raises
    `TeacherRequestError` saying so. Prompt log-probs are the model's raw distribution, so only
    temperature 1 can be scored.

    Generation uses `n, logprobs=k, seed, max_tokens, temperature, top_p`; the numpy arrays are
    built from the legacy `logprobs` object (its top_logprobs are the model's raw distribution,
    like the native endpoint's). Token ids come from vLLM's id extensions where the server accepts
    them. Otherwise the server gives token strings only, and they are mapped to ids with
    `tokenizer`; this is lossy: (1) several ids can decode to the same string (partial UTF-8
    bytes all print as U+FFFD, special tokens as ""), and such a string maps to the lowest id
    ("" to EOS); (2) the server's top_logprobs dict keeps one entry per string, so a row can hold
    fewer than k entries, and the missing slots are padded with the row's first id and a -inf
    log-prob (no mass; the losses skip -inf slots).

    Each sequence or prompt is one /v1/completions call (servers take one prompt per call with
    these options), at most `max_parallel` in flight for one `score` / `generate`.

    `model_info` reads /v1/models: the model id, `max_model_len` where the server lists it (vLLM
    does), the owner in `backend` ("openai:vllm"); what cannot be learnt is 0 (`vocab_size`,
    `max_top_logprobs`, `max_samples`, `max_new_tokens`, `max_batch`) or "" (`tokenizer_fingerprint`,
    unknown).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        ca_file: str | None = None,
        tokenizer: Any | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_parallel: int = 8,
        **_: Any,
    ):
        parts = urlsplit(url)
        scheme = parts.scheme.removeprefix("openai+")
        self.url = url
        self.tokenizer = tokenizer
        self.max_parallel = max_parallel  # completions requests in flight for one score / generate call
        self._model = parse_qs(parts.query).get("model", [None])[0]
        base_url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/') or '/v1'}"
        self._http = _HttpSession(url, base_url, api_key, timeout, ca_file, transport)
        self._root = f"{scheme}://{parts.netloc}"
        self._id_extensions: bool | None = None  # None: not tried yet
        self._scoring_max_tokens = 0
        self._ids_by_text: dict[str, int] | None = None

    # --- model info ---

    async def model_info(self) -> ModelInfo:
        answer = (await self._http.send("GET", "/models")).json()
        cards = answer.get("data") or []
        served = [card.get("id") for card in cards]
        if self._model is not None:
            card = next((c for c in cards if c.get("id") == self._model), None)
        else:
            card = cards[0] if cards else None
        if card is None:
            raise TeacherRequestError(f"model {self._model!r} is not served here (served: {served})", url=self.url, field="model")
        self._model = card["id"]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return ModelInfo(
            model=card["id"],
            backend=f"openai:{card.get('owned_by', 'unknown')}",
            vocab_size=0,
            max_model_len=int(card.get("max_model_len") or 0),
            max_top_logprobs=0,
            max_samples=0,
            max_new_tokens=0,
            tokenizer_fingerprint="",
            eos_token_id=eos if eos is not None else -1,
            max_batch=0,
        )

    async def _model_name(self) -> str:
        if self._model is None:
            await self.model_info()
        return self._model

    # --- scoring ---

    async def score(self, request: dict) -> ScoreResponse:
        sequences = _required(self.url, request, "sequences")
        k = int(request.get("top_logprobs") or 0)
        temperature = request.get("temperature")
        if temperature is not None and temperature != 1.0:
            raise TeacherRequestError(
                "an OpenAI-compatible teacher reports prompt log-probs at temperature 1 only; "
                "score at temperature 1, or serve the model with `potstill serve`",
                url=self.url,
                field="temperature",
            )
        scored = [functools.partial(self._score_one, index, sequence, k) for index, sequence in enumerate(sequences)]
        return ScoreResponse(results=await _gather_limited(scored, self.max_parallel))

    async def _score_one(self, index: int, sequence: dict, k: int) -> ScoredSequence:
        where = f"sequences.{index}"
        prompt = await self._prompt_ids(_required(self.url, sequence, "prompt", where), f"{where}.prompt")
        completion = await self._text_ids(_required(self.url, sequence, "completion", where), f"{where}.completion", False)
        body = {
            "model": await self._model_name(),
            "prompt": prompt + completion,
            "echo": True,
            "temperature": 1.0,
            "prompt_logprobs": k,
        }
        choice = (await self._echo(body))["choices"][0]
        entries = choice.get("prompt_logprobs")
        if not entries:
            raise self._black_box()
        if len(entries) < len(prompt) + len(completion):
            raise TeacherRequestError(
                f"the server returned {len(entries)} prompt log-probs for {len(prompt) + len(completion)} tokens",
                url=self.url,
            )
        token_logprobs, top_ids, top_logprobs = _prompt_logprob_rows(self.url, entries[len(prompt) :], completion, k)
        return ScoredSequence(
            token_ids=np.asarray(completion, dtype=np.int32),
            token_logprobs=token_logprobs,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            prompt_tokens=len(prompt),
        )

    async def _echo(self, body: dict) -> dict:
        """/v1/completions for scoring: max_tokens=0, or 1 where the server refuses 0."""
        while True:
            try:
                return await self._completions({**body, "max_tokens": self._scoring_max_tokens})
            except TeacherRequestError as error:
                if _refuses_field(error, "prompt_logprobs"):
                    raise self._black_box(error) from None
                if self._scoring_max_tokens == 0 and _names(error, "max_tokens"):
                    self._scoring_max_tokens = 1
                    continue
                raise

    def _black_box(self, cause: Exception | None = None) -> TeacherRequestError:
        why = f" ({cause})" if cause else ""
        return TeacherRequestError(
            "this teacher returns no prompt log-probs (vLLM's `prompt_logprobs` extension), so it supports "
            f"only black-box methods (generate: sft, seq-kd, multi-sample), not scoring{why}",
            url=self.url,
        )

    # --- generation ---

    async def generate(self, request: dict) -> GenerateResponse:
        prompts = _required(self.url, request, "prompts")
        k = int(request.get("top_logprobs") or 0)
        options = {
            "n": request.get("n"),
            "max_tokens": request.get("max_tokens", 16),
            "temperature": request.get("temperature"),
            "top_p": request.get("top_p"),
            "seed": request.get("seed"),
            "logprobs": k,
        }
        options = {key: value for key, value in options.items() if value is not None}
        results = [functools.partial(self._generate_one, index, prompt, options, k) for index, prompt in enumerate(prompts)]
        return GenerateResponse(results=await _gather_limited(results, self.max_parallel))

    async def _generate_one(self, index: int, prompt: Any, options: dict, k: int) -> GenerateResult:
        if isinstance(prompt, str) and self.tokenizer is None:
            prompt_form, prompt_tokens = prompt, None  # the server tokenizes it, as the native endpoint would
        else:
            prompt_form = await self._prompt_ids(prompt, f"prompts.{index}")
            prompt_tokens = len(prompt_form)
        body = {"model": await self._model_name(), "prompt": prompt_form, **options}
        answer = await self._with_id_extensions(body)
        choices = sorted(answer.get("choices") or [], key=lambda choice: choice.get("index", 0))
        samples = [self._sample(choice, k) for choice in choices]
        if prompt_tokens is None:
            prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        return GenerateResult(samples=samples, prompt_tokens=prompt_tokens)

    async def _with_id_extensions(self, body: dict) -> dict:
        if self._id_extensions is not False:
            try:
                answer = await self._completions({**body, **_ID_EXTENSIONS})
                self._id_extensions = True
                return answer
            except TeacherRequestError as error:
                if not any(_refuses_field(error, name) for name in _ID_EXTENSIONS):
                    raise
                self._id_extensions = False
        return await self._completions(body)

    def _sample(self, choice: dict, k: int) -> Sample:
        logprobs = choice.get("logprobs")
        if not logprobs or logprobs.get("token_logprobs") is None:
            raise TeacherRequestError("the server returned no log-probs for its samples", url=self.url)
        tokens = logprobs.get("tokens") or []
        ids = choice.get("token_ids") or [self._token_id(token) for token in tokens]
        rows = logprobs.get("top_logprobs") or [{}] * len(ids)
        top = [sorted(((self._token_id(t), float(lp)) for t, lp in (row or {}).items()), key=lambda p: -p[1]) for row in rows]
        top_ids, top_logprobs = _padded_rows(top, k)
        return Sample(
            token_ids=np.asarray(ids, dtype=np.int32),
            token_logprobs=np.asarray([_float(lp) for lp in logprobs["token_logprobs"]], dtype=np.float32),
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            text=choice.get("text") or "",
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        )

    # --- tokens ---

    def _token_id(self, token: str) -> int:
        if token.startswith(_TOKEN_ID_PREFIX):
            return int(token[len(_TOKEN_ID_PREFIX) :])
        if self._ids_by_text is None:
            if self.tokenizer is None:
                raise TeacherRequestError(
                    "this server reports tokens as strings only: pass the student's tokenizer "
                    "(connect_client(url, tokenizer=...)) to map them to ids",
                    url=self.url,
                )
            self._ids_by_text = _ids_by_text(self.tokenizer)
        if token not in self._ids_by_text:
            raise TeacherRequestError(f"token {token!r} is not in the tokenizer's vocabulary", url=self.url)
        return self._ids_by_text[token]

    async def _prompt_ids(self, prompt: Any, field: str) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            if self.tokenizer is None:
                raise TeacherRequestError("chat prompts need the tokenizer (connect_client(url, tokenizer=...))", url=self.url, field=field)
            if any(not isinstance(m.get("content"), str) and any(p.get("type") != "text" for p in m["content"]) for m in prompt):
                raise TeacherRequestError("images and videos need a grpc:// or http(s):// teacher URL: the OpenAI-compatible "
                                          "client sends token ids only", url=self.url, field=field)
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        return await self._text_ids(prompt, field, True)

    async def _text_ids(self, text: Any, field: str, special_tokens: bool) -> list[int]:
        """Token ids of a prompt (the tokenizer's special tokens) or completion (none), as the teacher would."""
        if not isinstance(text, str):
            return [int(i) for i in text]
        if self.tokenizer is not None:
            return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
        try:
            response = await self._http.send(
                "POST", f"{self._root}/tokenize",
                json={"model": await self._model_name(), "prompt": text, "add_special_tokens": special_tokens},
            )
        except TeacherRequestError as error:
            raise TeacherRequestError(
                f"cannot tokenize text here ({error.message}): send token ids, or pass the student's tokenizer",
                url=self.url, field=field,
            ) from None
        return [int(i) for i in response.json()["tokens"]]

    async def _completions(self, body: dict) -> dict:
        return (await self._http.send("POST", "/completions", json=body)).json()

    async def close(self) -> None:
        await self._http.close()


async def _gather_limited(calls: Iterable[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """The calls' results in order, at most `limit` running at once."""
    slots = asyncio.Semaphore(limit)

    async def limited(call: Callable[[], Awaitable[Any]]) -> Any:
        async with slots:
            return await call()

    tasks = [asyncio.ensure_future(limited(call)) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # one failed: the others are not left running
            task.cancel()


def _required(url: str, data: dict, key: str, where: str | None = None) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise TeacherRequestError("field required", url=url, field=f"{where}.{key}" if where else key)
    return data[key]


def _names(error: TeacherClientError, name: str) -> bool:
    return error.field == name or name in error.message


_UNKNOWN_FIELD = re.compile(r"extra|unrecogni[sz]ed|unknown|not permitted|unexpected|unsupported|not supported", re.IGNORECASE)


def _refuses_field(error: TeacherClientError, name: str) -> bool:
    """Whether the server refused a request because it does not know the field `name` at all."""
    return _names(error, name) and _UNKNOWN_FIELD.search(error.message) is not None


def _float(value: Any) -> float:
    return float("-inf") if value is None else float(value)


def _entry_logprob(value: Any) -> tuple[float, float]:
    """(logprob, rank) of one prompt_logprobs entry: vLLM's {"logprob", "rank", ...} or a bare number."""
    if isinstance(value, dict):
        rank = value.get("rank")
        return _float(value.get("logprob")), float(rank) if rank is not None else float("inf")
    return _float(value), float("inf")


def _prompt_logprob_rows(url: str, entries: list, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """token_logprobs [L], top_ids [L, k], top_logprobs [L, k] from vLLM-format prompt log-probs."""
    token_logprobs, rows = [], []
    for position, (entry, token_id) in enumerate(zip(entries, ids)):
        if not entry:
            raise TeacherRequestError(f"no prompt log-probs at completion position {position}", url=url)
        candidates = [(int(key), *_entry_logprob(value)) for key, value in entry.items()]
        by_id = {token_id_: logprob for token_id_, logprob, _ in candidates}
        if token_id not in by_id:
            raise TeacherRequestError(f"the server did not report token {token_id} at completion position {position}", url=url)
        token_logprobs.append(by_id[token_id])
        # Top k and, outside it, the actual token: the k most likely (ties by rank) are the top k.
        ranked = sorted(candidates, key=lambda c: (-c[1], c[2]))
        rows.append([(token_id_, logprob) for token_id_, logprob, _ in ranked])
    top_ids, top_logprobs = _padded_rows(rows, k)
    return np.asarray(token_logprobs, dtype=np.float32), top_ids, top_logprobs


def _padded_rows(rows: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, k] ids and log-probs from rows sorted by descending log-prob; short rows padded with -inf slots."""
    top_ids = np.zeros((len(rows), k), dtype=np.int32)
    top_logprobs = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for position, row in enumerate(rows):
        row = row[:k]
        if row:
            top_ids[position, :] = row[0][0]
            top_ids[position, : len(row)] = [token_id for token_id, _ in row]
            top_logprobs[position, : len(row)] = [logprob for _, logprob in row]
    return top_ids, top_logprobs


def _ids_by_text(tokenizer: Any) -> dict[str, int]:
    """String -> id, lowest id first: each id's decoded text, then its raw token; "" -> EOS."""
    size = len(tokenizer)
    mapping: dict[str, int] = {}
    for token_id in range(size):
        mapping.setdefault(tokenizer.decode([token_id]), token_id)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token is not None:
            mapping.setdefault(token, token_id)
    if tokenizer.eos_token_id is not None:
        mapping.setdefault("", tokenizer.eos_token_id)
    return mapping


# --- choosing a client ---

CLIENTS: dict[str, Callable[..., TeacherClient]] = {
    "grpc": GrpcTeacherClient,
    "grpcs": GrpcTeacherClient,
    "http": HttpTeacherClient,
    "https": HttpTeacherClient,
    "openai+http": OpenAITeacherClient,
    "openai+https": OpenAITeacherClient,
}


def connect_client(
    url: str,
    *,
    api_key: str | None = None,
    timeout: float = 60.0,
    ca_file: str | None = None,
    tokenizer: Any | None = None,
    **options: Any,
) -> TeacherClient:
    """The client for `url`'s scheme (see `CLIENTS`). Nothing is sent until the first call.

    timeout: seconds per request. ca_file: PEM roots for grpcs:// and https:// (default: the
    system's). tokenizer: the student's tokenizer, used by OpenAI-compatible endpoints only (text
    to ids, token strings to ids). Other keyword options go to the client class (for example
    `transport=` an httpx transport, `max_message_bytes=` for gRPC).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in CLIENTS:
        raise ValueError(f"unsupported teacher URL {url!r}: the scheme must be one of {', '.join(sorted(CLIENTS))}")
    return CLIENTS[scheme](url, api_key=api_key, timeout=timeout, ca_file=ca_file, tokenizer=tokenizer, **options)
