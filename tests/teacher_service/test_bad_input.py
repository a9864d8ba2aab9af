"""Bad input is refused with a 4xx naming the field (INVALID_ARGUMENT over gRPC), never a 500.

One table holds every bad request: each case is sent over HTTP and, where protobuf can express
it, over gRPC. Then the refusals that are not about the input: a full queue (429 /
RESOURCE_EXHAUSTED), a model not loaded yet (503 / UNAVAILABLE) and a missing API key
(401 / UNAUTHENTICATED).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.backends import BACKENDS
from teacher_service.testing import BackgroundTeacher

from .conftest import PROTOBUF, grpc_target

VOCAB, CONTEXT, MAX_K, MAX_N, MAX_NEW, MAX_BATCH = 384, 256, 20, 8, 64, 256  # the shared teacher's limits
SMALL_BODY = 4096  # max_body_bytes and max_message_bytes of the `small` teacher
OK_SEQUENCE = {"prompt": [1, 2, 3], "completion": [4, 5]}
OK_MESSAGES = [{"role": "user", "content": "hi"}]
_ABSENT = object()


@dataclass(frozen=True)
class Case:
    path: str
    field: str  # what error.field (and the start of the gRPC details) must name
    body: Any = _ABSENT  # sent as JSON
    raw: bytes | None = None  # sent as is, with `content_type`
    content_type: str = "application/json"
    chunked: bool = False  # send `raw` without a Content-Length
    as_pb: Callable[[], Any] | None = None  # the same bad request as a protobuf message, where expressible
    status: int = 400
    grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    server: str = "shared"  # or "small": a teacher with SMALL_BODY limits


def ids(*values: int) -> pb.TokenIds:
    return pb.TokenIds(ids=values)


def prompt_ids(*values: int) -> pb.Prompt:
    return pb.Prompt(token_ids=ids(*values))


def completion_ids(*values: int) -> pb.Completion:
    return pb.Completion(token_ids=ids(*values))


def chat(*messages: dict) -> pb.Prompt:
    return pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]))


def score_pb(prompt: Any = "ok", completion: Any = "ok", count: int = 1, **options) -> Callable[[], pb.ScoreRequest]:
    """A ScoreRequest of `count` copies of one sequence; None leaves the prompt or the completion unset."""

    def build() -> pb.ScoreRequest:
        parts = {
            "prompt": prompt_ids(1, 2, 3) if prompt == "ok" else prompt,
            "completion": completion_ids(4, 5) if completion == "ok" else completion,
        }
        sequence = pb.ScoreSequence(**{name: part for name, part in parts.items() if part is not None})
        return pb.ScoreRequest(sequences=[sequence] * count, **options)

    return build


def generate_pb(*prompts: pb.Prompt, **options) -> Callable[[], pb.GenerateRequest]:
    return lambda: pb.GenerateRequest(prompts=list(prompts) or [pb.Prompt(text="hi")], **options)


def score(sequence: dict | None = None, **fields) -> dict:
    """A JSON score request: one sequence (a good one by default) and other fields."""
    return {"sequences": [sequence or OK_SEQUENCE], **fields}


def pair(prompt: Any = (1,), completion: Any = (4,)) -> dict:
    """A JSON score request of one sequence."""
    return score({"prompt": list(prompt) if isinstance(prompt, tuple) else prompt,
                  "completion": list(completion) if isinstance(completion, tuple) else completion})


def gen(**fields) -> dict:
    """A JSON generate request: one short prompt and the given fields."""
    return {"prompts": ["hi"], **fields}


S, G, C, CHAT = "/v1/score", "/v1/generate", "/v1/completions", "/v1/chat/completions"
LONG = list(range(5, 205))  # 200 token ids
OVER = CONTEXT + 1 - len(LONG)  # completion tokens or max_tokens that make LONG one token too long
MANY = [7] * 5000  # more than SMALL_BODY bytes in JSON and in protobuf
ROBOT = {"role": "robot", "content": "x"}
TOO_BIG = {"status": 413, "server": "small"}

CASES = {
    # --- missing or empty sequences and prompts ---
    "score-sequences-missing": Case(S, "sequences", {}, as_pb=lambda: pb.ScoreRequest()),
    "score-sequences-empty": Case(S, "sequences", {"sequences": []}, as_pb=lambda: pb.ScoreRequest(sequences=[])),
    "score-sequences-not-a-list": Case(S, "sequences", {"sequences": "abc"}),
    "score-too-many-sequences": Case(S, "sequences", {"sequences": [OK_SEQUENCE] * (MAX_BATCH + 1)}, as_pb=score_pb(count=MAX_BATCH + 1)),
    "score-prompt-missing": Case(S, "sequences.0.prompt", score({"completion": [4]}), as_pb=score_pb(prompt=None)),
    "score-prompt-empty-text": Case(S, "sequences.0.prompt", pair(prompt=""), as_pb=score_pb(pb.Prompt(text=""))),
    "score-prompt-empty-ids": Case(S, "sequences.0.prompt", pair(prompt=[]), as_pb=score_pb(prompt_ids())),
    "score-prompt-empty-chat": Case(S, "sequences.0.prompt", pair(prompt=[]), as_pb=score_pb(chat())),
    "score-prompt-wrong-type": Case(S, "sequences.0.prompt", pair(prompt=5)),
    "score-completion-missing": Case(S, "sequences.0.completion", score({"prompt": [1]}), as_pb=score_pb(completion=None)),
    "score-completion-empty-text": Case(S, "sequences.0.completion", pair(completion=""), as_pb=score_pb(completion=pb.Completion(text=""))),
    "score-completion-empty-ids": Case(S, "sequences.0.completion", pair(completion=[]), as_pb=score_pb(completion=completion_ids())),
    "score-completion-as-chat": Case(S, "sequences.0.completion", pair(completion=OK_MESSAGES)),
    "generate-prompts-missing": Case(G, "prompts", {}, as_pb=lambda: pb.GenerateRequest()),
    "generate-prompts-empty": Case(G, "prompts", {"prompts": []}),
    "generate-prompts-not-a-list": Case(G, "prompts", {"prompts": "hi"}),
    "generate-prompt-empty-text": Case(G, "prompts.0", {"prompts": [""]}, as_pb=generate_pb(pb.Prompt(text=""))),
    "generate-prompt-unset": Case(G, "prompts.0", {"prompts": [None]}, as_pb=generate_pb(pb.Prompt())),
    # --- k, n, max_tokens and sampling options out of range ---
    "score-top-logprobs-negative": Case(S, "top_logprobs", score(top_logprobs=-1), as_pb=score_pb(top_logprobs=-1)),
    "score-top-logprobs-above-max": Case(S, "top_logprobs", score(top_logprobs=MAX_K + 1), as_pb=score_pb(top_logprobs=MAX_K + 1)),
    "generate-top-logprobs-negative": Case(G, "top_logprobs", gen(top_logprobs=-1), as_pb=generate_pb(top_logprobs=-1)),
    "generate-top-logprobs-above-max": Case(G, "top_logprobs", gen(top_logprobs=MAX_K + 1), as_pb=generate_pb(top_logprobs=MAX_K + 1)),
    "generate-n-zero": Case(G, "n", gen(n=0), as_pb=generate_pb(n=0)),
    "generate-n-above-max": Case(G, "n", gen(n=MAX_N + 1), as_pb=generate_pb(n=MAX_N + 1)),
    "generate-max-tokens-zero": Case(G, "max_tokens", gen(max_tokens=0), as_pb=generate_pb(max_tokens=0)),
    "generate-max-tokens-above-limit": Case(G, "max_tokens", gen(max_tokens=MAX_NEW + 1), as_pb=generate_pb(max_tokens=MAX_NEW + 1)),
    "score-temperature-zero": Case(S, "temperature", score(temperature=0.0), as_pb=score_pb(temperature=0.0)),
    "generate-temperature-negative": Case(G, "temperature", gen(temperature=-0.5), as_pb=generate_pb(temperature=-0.5)),
    "generate-top-p-zero": Case(G, "top_p", gen(top_p=0), as_pb=generate_pb(top_p=0.0)),
    "generate-top-p-above-one": Case(G, "top_p", gen(top_p=1.5), as_pb=generate_pb(top_p=1.5)),
    "generate-seed-negative": Case(G, "seed", gen(seed=-1), as_pb=generate_pb(seed=-1)),
    "generate-top-k-below-minus-one": Case(G, "top_k", gen(top_k=-2), as_pb=generate_pb(top_k=-2)),
    "generate-min-p-above-one": Case(G, "min_p", gen(min_p=1.5), as_pb=generate_pb(min_p=1.5)),
    "generate-presence-penalty-above-two": Case(G, "presence_penalty", gen(presence_penalty=3.0), as_pb=generate_pb(presence_penalty=3.0)),
    "generate-repetition-penalty-zero": Case(G, "repetition_penalty", gen(repetition_penalty=0.0), as_pb=generate_pb(repetition_penalty=0.0)),
    "generate-stop-empty": Case(G, "stop.0", gen(stop=""), as_pb=generate_pb(stop=[""])),
    "generate-too-many-stops": Case(G, "stop", gen(stop=["x"] * 17), as_pb=generate_pb(stop=["x"] * 17)),
    "generate-stop-token-id-above-vocab": Case(G, "stop_token_ids", gen(stop_token_ids=[VOCAB]), as_pb=generate_pb(stop_token_ids=[VOCAB])),
    # --- longer than the model's context (256) ---
    "score-longer-than-context": Case(S, "sequences.0", pair(LONG, LONG[:OVER]), as_pb=score_pb(prompt_ids(*LONG), completion_ids(*LONG[:OVER]))),
    "generate-longer-than-context": Case(G, "prompts.0", {"prompts": [LONG], "max_tokens": OVER}, as_pb=generate_pb(prompt_ids(*LONG), max_tokens=OVER)),
    # --- token ids outside the vocabulary ---
    "score-prompt-id-above-vocab": Case(S, "sequences.0.prompt", pair(prompt=[1, VOCAB]), as_pb=score_pb(prompt_ids(1, VOCAB))),
    "score-prompt-id-negative": Case(S, "sequences.0.prompt.1", pair(prompt=[1, -3]), as_pb=score_pb(prompt_ids(1, -3))),
    "score-completion-id-above-vocab": Case(S, "sequences.0.completion", pair(completion=[4, 10**6]), as_pb=score_pb(completion=completion_ids(4, 10**6))),
    "generate-prompt-id-above-vocab": Case(G, "prompts.0", {"prompts": [[VOCAB + 5]]}, as_pb=generate_pb(prompt_ids(VOCAB + 5))),
    # --- unknown fields and wrong types (JSON only: protobuf can express neither) ---
    "score-unknown-field": Case(S, "topk", score(topk=5)),
    "score-unknown-sequence-field": Case(S, "sequences.0.weight", score({**OK_SEQUENCE, "weight": 2})),
    "generate-unknown-field": Case(G, "best_of", gen(best_of=2)),
    "score-top-logprobs-string": Case(S, "top_logprobs", score(top_logprobs="5")),
    "score-top-logprobs-float": Case(S, "top_logprobs", score(top_logprobs=2.5)),
    "score-top-logprobs-bool": Case(S, "top_logprobs", score(top_logprobs=True)),
    "score-temperature-string": Case(S, "temperature", score(temperature="hot")),
    "score-token-id-string": Case(S, "sequences.0.completion.1", pair(completion=[4, "5"])),
    "generate-n-string": Case(G, "n", gen(n="2")),
    "generate-seed-float": Case(G, "seed", gen(seed=1.5)),
    # --- chat messages ---
    "score-chat-bad-role": Case(S, "sequences.0.prompt.0.role", pair(prompt=[ROBOT]), as_pb=score_pb(chat(ROBOT))),
    "score-chat-missing-content": Case(S, "sequences.0.prompt.0.content", pair(prompt=[{"role": "user"}])),
    "score-chat-unknown-field": Case(S, "sequences.0.prompt.0.weight", pair(prompt=[{**OK_MESSAGES[0], "weight": "x"}])),
    "generate-chat-bad-role": Case(G, "prompts.0.1.role", {"prompts": [[*OK_MESSAGES, ROBOT]]}, as_pb=generate_pb(chat(*OK_MESSAGES, ROBOT))),
    # --- bodies that are not a request ---
    "malformed-json": Case(S, "body", raw=b'{"sequences": ['),
    "empty-body": Case(S, "body", raw=b""),
    "not-utf8": Case(S, "body", raw=b"\xff\xfe\x00{"),
    "body-is-a-list": Case(S, "body", [OK_SEQUENCE]),
    "body-is-a-string": Case(G, "body", "hello"),
    "body-is-null": Case(G, "body", None),
    "json-nan-temperature": Case(S, "temperature", raw=b'{"sequences": [{"prompt": [1], "completion": [2]}], "temperature": NaN}'),
    "json-infinite-top-p": Case(G, "top_p", raw=b'{"prompts": ["hi"], "top_p": Infinity}'),
    "json-huge-seed": Case(G, "seed", raw=b'{"prompts": ["hi"], "seed": 1e400}'),
    "deeply-nested-json": Case(S, "body", raw=b'{"sequences": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "malformed-protobuf": Case(S, "body", raw=b"\xff\xff\xff", content_type=PROTOBUF),
    "oversized-body": Case(S, "body", pair(completion=MANY), **TOO_BIG,
                           as_pb=score_pb(completion=completion_ids(*MANY)), grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED),
    "oversized-chunked-body": Case(S, "body", raw=b" " * (2 * SMALL_BODY) + b"{}", chunked=True, **TOO_BIG),
    "oversized-protobuf-body": Case(S, "body", raw=score_pb(completion=completion_ids(*MANY))().SerializeToString(),
                                    content_type=PROTOBUF, **TOO_BIG),
    # --- the OpenAI-compatible routes ---
    "completions-stream-options-without-stream": Case(C, "stream_options", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    "completions-stream-not-bool": Case(C, "stream", {"prompt": "hi", "stream": "yes"}),
    "completions-prompt-missing": Case(C, "prompt", {"max_tokens": 2}),
    "completions-prompt-empty": Case(C, "prompt", {"prompt": ""}),
    "completions-prompt-list-with-empty-text": Case(C, "prompt.1", {"prompt": ["a", ""]}),
    "completions-too-many-prompts": Case(C, "prompt", {"prompt": ["a"] * (MAX_BATCH + 1)}),
    "completions-logit-bias": Case(C, "logit_bias", {"prompt": "hi", "logit_bias": {"5": 100}}),
    "completions-n-above-max": Case(C, "n", {"prompt": "hi", "n": MAX_N + 1}),
    "completions-logprobs-above-max": Case(C, "logprobs", {"prompt": "hi", "logprobs": MAX_K + 1}),
    "completions-prompt-logprobs-negative": Case(C, "prompt_logprobs", {"prompt": "hi", "prompt_logprobs": -1}),
    "completions-max-tokens-above-limit": Case(C, "max_tokens", {"prompt": "hi", "max_tokens": MAX_NEW + 1}),
    "completions-echo-not-bool": Case(C, "echo", {"prompt": "hi", "echo": "yes"}),
    "completions-unknown-field": Case(C, "suffix", {"prompt": "hi", "suffix": "!"}),
    "completions-return-token-ids-not-bool": Case(C, "return_token_ids", {"prompt": "hi", "return_token_ids": 1}),
    "completions-longer-than-context": Case(C, "prompt", {"prompt": LONG, "max_tokens": 60}),
    "completions-echo-longer-than-context": Case(C, "prompt", {"prompt": LONG * 2, "max_tokens": 0, "echo": True, "logprobs": 1}),
    "chat-messages-missing": Case(CHAT, "messages", {}),
    "chat-messages-empty": Case(CHAT, "messages", {"messages": []}),
    "chat-bad-role": Case(CHAT, "messages.0.role", {"messages": [ROBOT]}),
    "chat-content-part-without-text": Case(CHAT, "messages.0.content.0", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    "chat-tools": Case(CHAT, "tools", {"messages": OK_MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    "chat-continue-with-generation-prompt": Case(CHAT, "continue_final_message", {"messages": OK_MESSAGES, "continue_final_message": True}),
    "chat-prompt-logprobs-streamed": Case(CHAT, "prompt_logprobs", {"messages": OK_MESSAGES, "stream": True, "prompt_logprobs": 1}),
    "chat-n-above-max": Case(CHAT, "n", {"messages": OK_MESSAGES, "n": MAX_N + 1}),
    "chat-top-logprobs-above-max": Case(CHAT, "top_logprobs", {"messages": OK_MESSAGES, "top_logprobs": MAX_K + 1}),
    "chat-logprobs-not-bool": Case(CHAT, "logprobs", {"messages": OK_MESSAGES, "logprobs": "yes"}),
    "chat-max-tokens-zero": Case(CHAT, "max_tokens", {"messages": OK_MESSAGES, "max_tokens": 0}),
    "chat-max-completion-tokens-above-limit": Case(
        CHAT, "max_completion_tokens", {"messages": OK_MESSAGES, "max_completion_tokens": MAX_NEW + 1}
    ),
    "chat-longer-than-context": Case(CHAT, "messages", {"messages": [{"role": "user", "content": "7" * 240}], "max_tokens": 30}),
}


@pytest.fixture(scope="module")
def small_teacher(start_teacher):
    with start_teacher(max_body_bytes=SMALL_BODY, max_message_bytes=SMALL_BODY) as running:
        yield running


@pytest.fixture(scope="module")
def servers(teacher, small_teacher) -> dict[str, BackgroundTeacher]:
    return {"shared": teacher, "small": small_teacher}


def send_http(server: BackgroundTeacher, case: Case) -> httpx.Response:
    headers = {"Content-Type": case.content_type}
    if case.raw is not None:
        content = iter([case.raw[:100], case.raw[100:]]) if case.chunked else case.raw
    else:
        assert case.body is not _ABSENT, "a case needs a JSON body or raw bytes"
        content = json.dumps(case.body).encode()
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        return client.post(case.path, content=content, headers=headers)


def send_grpc(server: BackgroundTeacher, message) -> grpc.RpcError | None:
    with grpc.insecure_channel(grpc_target(server)) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        method = stub.Score if isinstance(message, pb.ScoreRequest) else stub.Generate
        try:
            method(message, timeout=60)
        except grpc.RpcError as error:
            return error
    return None


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=name) for name, case in CASES.items()],
)
def test_bad_input_is_refused_naming_the_field(servers, case: Case):
    server = servers[case.server]
    response = send_http(server, case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["field"] == case.field and error["message"] and error["type"]
    if case.as_pb is not None:
        failure = send_grpc(server, case.as_pb())
        assert failure is not None, "gRPC accepted the request"
        assert failure.code() == case.grpc_code, failure.details()
        if case.grpc_code == grpc.StatusCode.INVALID_ARGUMENT:
            assert failure.details().startswith(f"{case.field}: "), failure.details()


def test_the_server_still_answers_after_bad_input(servers, http, stub):
    assert http.post("/v1/score", json=score(top_logprobs=2)).status_code == 200
    assert len(stub.Score(wire.score_request_pb(score(top_logprobs=2))).results) == 1
    small = servers["small"]
    assert httpx.post(small.http_url + "/v1/score", json=score()).status_code == 200
    for server in servers.values():
        exposition = httpx.get(server.http_url + "/metrics").text
        assert 'outcome="5' not in exposition and 'outcome="INTERNAL"' not in exposition


def test_the_limits_themselves_are_accepted(http, stub):
    """Every bound is inclusive: k, n, max_tokens, batch size, vocabulary and context at their maximum."""
    full = {"prompt": LONG, "completion": LONG[: OVER - 2] + [VOCAB - 1]}  # exactly CONTEXT tokens
    request = {"sequences": [full] + [OK_SEQUENCE] * (MAX_BATCH - 1), "top_logprobs": MAX_K}
    response = http.post("/v1/score", json=request)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == MAX_BATCH and len(response.json()["results"][0]["top_ids"][0]) == MAX_K
    assert len(stub.Score(wire.score_request_pb(request)).results) == MAX_BATCH
    fits = {"prompts": [LONG[: CONTEXT - MAX_NEW]], "n": MAX_N, "max_tokens": MAX_NEW, "top_logprobs": MAX_K, "seed": 0}
    response = http.post("/v1/generate", json=fits)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["samples"]) == MAX_N


# --- refusals that are not about the input ---


SLOW_GENERATE = {"prompts": ["a", "b", [7, 8]], "n": 8, "max_tokens": 200, "temperature": 1.0}


def queue_depth(http_url: str, headers: dict | None = None) -> float:
    for line in httpx.get(http_url + "/metrics", headers=headers).text.splitlines():
        if line.startswith("potstill_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no potstill_queue_depth in /metrics")


def test_a_full_queue_is_refused(start_teacher):
    with start_teacher(max_queued_requests=1, max_new_tokens=200) as server:
        barrier = threading.Barrier(6)
        outcomes: list[tuple[str, Any]] = []

        def over_http():
            barrier.wait()
            response = httpx.post(server.http_url + "/v1/generate", json=SLOW_GENERATE, timeout=300)
            outcomes.append(("http", response))

        def over_grpc():
            with grpc.insecure_channel(grpc_target(server)) as channel:
                stub = teacher_pb2_grpc.TeacherStub(channel)
                stub.GetModelInfo(pb.ModelInfoRequest())  # connect before the race
                barrier.wait()
                try:
                    outcomes.append(("grpc", stub.Generate(wire.generate_request_pb(SLOW_GENERATE), timeout=300)))
                except grpc.RpcError as error:
                    outcomes.append(("grpc", error))

        threads = [threading.Thread(target=f) for f in (over_http, over_grpc) * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        refused = {"http": 0, "grpc": 0}
        served = 0
        for transport, outcome in outcomes:
            if isinstance(outcome, httpx.Response) and outcome.status_code == 429:
                assert outcome.json()["error"]["type"] == "overloaded"
                refused[transport] += 1
            elif isinstance(outcome, grpc.RpcError):
                assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.details()
                refused[transport] += 1
            else:
                results = outcome.json()["results"] if isinstance(outcome, httpx.Response) else outcome.results
                assert len(results) == 3
                served += 1
        # One request holds the only place; the others arrive while it runs.
        assert len(outcomes) == 6 and served >= 1 and refused["http"] >= 1 and refused["grpc"] >= 1
        assert queue_depth(server.http_url) == 0
        assert httpx.post(server.http_url + "/v1/score", json=score()).status_code == 200


def test_requests_before_the_model_is_loaded_get_503(start_teacher, monkeypatch):
    loaded = threading.Event()

    def load_when_allowed(config):
        loaded.wait(timeout=120)
        return BACKENDS["hf"](config)

    monkeypatch.setitem(BACKENDS, "gated", load_when_allowed)
    teacher = start_teacher(backend="gated")
    starting = threading.Thread(target=teacher.start)
    starting.start()
    try:
        health = wait_for_http(teacher)
        assert health.status_code == 503 and health.json()["status"] != "ok"
        with httpx.Client(base_url=teacher.http_url) as http:
            for path, body in [("/v1/model", None), ("/v1/score", score()), ("/v1/generate", gen())]:
                response = http.request("GET" if body is None else "POST", path, json=body)
                assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable", path
        with grpc.insecure_channel(grpc_target(teacher)) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            for call in (lambda: stub.GetModelInfo(pb.ModelInfoRequest()), lambda: stub.Score(score_pb()())):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            health_stub = health_pb2_grpc.HealthStub(channel)
            not_serving = health_stub.Check(health_pb2.HealthCheckRequest(service="potstill.v1.Teacher"))
            assert not_serving.status == health_pb2.HealthCheckResponse.NOT_SERVING
            loaded.set()
            starting.join(timeout=120)
            assert httpx.get(teacher.http_url + "/health").json() == {"status": "ok"}
            serving = health_stub.Check(health_pb2.HealthCheckRequest(service="potstill.v1.Teacher"))
            assert serving.status == health_pb2.HealthCheckResponse.SERVING
            assert len(stub.Score(score_pb()()).results) == 1
    finally:
        loaded.set()
        starting.join(timeout=120)
        teacher.stop()


def wait_for_http(teacher: BackgroundTeacher, timeout: float = 60) -> httpx.Response:
    """The first answer of /health once the server is constructed and listening."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if teacher.server is not None:
            try:
                return httpx.get(teacher.http_url + "/health")
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise AssertionError("the HTTP server never answered")


def test_api_key_is_required_where_configured(start_teacher):
    key = "s3cret-key"
    with start_teacher(api_keys=(key,)) as server:
        good = {"Authorization": f"Bearer {key}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):
            response = httpx.post(server.http_url + "/v1/score", json=score(), headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "unauthenticated"
        assert httpx.get(server.http_url + "/v1/model").status_code == 401
        assert httpx.post(server.http_url + "/v1/score", json=score(), headers=good).status_code == 200
        assert httpx.get(server.http_url + "/v1/model", headers=good).status_code == 200
        assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}  # open to probes
        for api_key in ("wrong", key):
            client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=api_key, max_retries=0)
            if api_key == key:
                assert len(client.completions.create(model="m", prompt="hi", max_tokens=1).choices) == 1
                continue
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model="m", prompt="hi", max_tokens=1)

        with grpc.insecure_channel(grpc_target(server)) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong")]):
                for call in (stub.Score, stub.GetModelInfo):
                    request = score_pb()() if call is stub.Score else pb.ModelInfoRequest()
                    with pytest.raises(grpc.RpcError) as refused:
                        call(request, metadata=metadata)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(stub.Score(score_pb()(), metadata=[("authorization", f"Bearer {key}")]).results) == 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
