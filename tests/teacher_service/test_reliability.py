"""The service as a hostile client or a flaky cluster finds it: every input answered, nothing stalls.

Each test here was a defect: a huge prompt froze health checks, tiny temperatures put NaN on
the wire, a handler crash was a bare 500 missing from the metrics (and OK over gRPC), garbage
protobuf over gRPC was UNKNOWN, a hang-up logged a traceback, an empty key file turned
authentication off, the API's documents were open with a key set, queued requests at shutdown
answered 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import threading
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from potstill.usage import UsageError
from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.config import ServeOptions
from teacher_service.errors import FIELD_METADATA, KIND_METADATA
from teacher_service.http_server import build_app
from teacher_service.protocol import CHARS_PER_TOKEN_BOUND, MIN_TEMPERATURE
from teacher_service.serve import TeacherServer
from teacher_service.service import ServiceSettings, TeacherService
from teacher_service.testing import TeacherProcess

from .conftest import PROTOBUF, grpc_target

CONTEXT = 256  # the shared teacher's context length
SCORE = {"sequences": [{"prompt": [1, 2, 3], "completion": [4, 5]}], "top_logprobs": 2}
GENERATE = {"prompts": [[1, 2, 3]], "max_tokens": 2, "top_logprobs": 2}


def _raw_call(channel: grpc.Channel, method: str):
    """A Teacher method taking and returning bytes, to send what no stub would."""
    return channel.unary_unary(f"/potstill.v1.Teacher/{method}")


def _error(http_response: httpx.Response) -> dict:
    return http_response.json()["error"]


# --- prompt size ---


def test_a_huge_text_prompt_is_refused_before_tokenising(http, stub):
    too_long = "1+2 " * (CHARS_PER_TOKEN_BOUND * CONTEXT // 4 + 1)
    answer = http.post("/v1/score", json={"sequences": [{"prompt": too_long, "completion": "1"}]})
    assert answer.status_code == 400 and _error(answer)["field"] == "sequences.0.prompt"
    assert "max_prompt_chars" in _error(answer)["message"]
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": too_long}]})
    assert chat.status_code == 400 and _error(chat)["field"] == "messages"
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(wire.generate_request_pb({"prompts": [too_long]}))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("prompts.0: ")


def _resident_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_memory_comes_back_after_huge_prompts(tiny_model_dir):
    """A 31 MiB prompt once left the server at 7.2 GB; refused ones must give their memory back."""
    teacher = TeacherProcess(tiny_model_dir, "--http-port", "0", "--grpc-port", "0", threads=1).start()
    try:
        with httpx.Client(base_url=teacher.http_url, timeout=120) as client:
            assert client.post("/v1/score", json=SCORE).status_code == 200
            before = _resident_mib(teacher.process.pid)
            huge = "1+2 " * (30 * 2**20 // 4)
            for _ in range(3):
                answer = client.post("/v1/score", json={"sequences": [{"prompt": huge, "completion": "1"}]})
                assert answer.status_code == 400
            del huge
            deadline = time.monotonic() + 30
            while _resident_mib(teacher.process.pid) > before + 32:  # freed once the last request is cleaned up
                assert time.monotonic() < deadline, f"{_resident_mib(teacher.process.pid):.0f} MiB, was {before:.0f}"
                time.sleep(0.1)
    finally:
        teacher.stop()


def test_health_answers_while_a_prompt_is_tokenised(start_teacher):
    with start_teacher() as server:
        backend = server.server.service._require_backend()
        entered, release = threading.Event(), threading.Event()
        encode = backend.encode

        def slow_encode(text, add_special_tokens=True):
            entered.set()
            release.wait(timeout=60)
            return encode(text, add_special_tokens)

        backend.encode = slow_encode
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(httpx.post(
            server.http_url + "/v1/score", json={"sequences": [{"prompt": "1+2=", "completion": "3"}]}, timeout=60)))
        sender.start()
        try:
            assert entered.wait(timeout=30)
            # The tokenizer holds its thread, not the event loop: both health services answer.
            assert httpx.get(server.http_url + "/health/live", timeout=10).status_code == 200
            with grpc.insecure_channel(grpc_target(server)) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            release.set()
            sender.join(timeout=60)
        assert answers[0].status_code == 200


# --- temperatures ---

TINY = [5e-324, 1e-40, MIN_TEMPERATURE / 10]


@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperatures_are_refused_on_every_route(http, stub, temperature):
    routes = [
        ("/v1/score", {**SCORE, "temperature": temperature}),
        ("/v1/generate", {**GENERATE, "temperature": temperature}),
        ("/v1/completions", {"prompt": "1+2=", "max_tokens": 2, "temperature": temperature}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": temperature}),
    ]
    for path, body in routes:
        answer = http.post(path, json=body)
        assert answer.status_code == 400 and _error(answer)["field"] == "temperature", (path, answer.text)
    protobuf = http.post("/v1/score", content=wire.score_request_pb({**SCORE, "temperature": temperature}).SerializeToString(),
                         headers={"content-type": PROTOBUF, "accept": PROTOBUF})
    assert protobuf.status_code == 400
    calls = [(stub.Score, wire.score_request_pb({**SCORE, "temperature": temperature}))]
    if temperature >= 1e-45:  # smaller is 0 in the float32 field: greedy decoding, fine for generate
        calls.append((stub.Generate, wire.generate_request_pb({**GENERATE, "temperature": temperature})))
    for call, message in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call(message)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_smallest_temperature_gives_finite_numbers(http, stub):
    scored = http.post("/v1/score", json={**SCORE, "temperature": MIN_TEMPERATURE}).json()["results"][0]
    sampled = stub.Generate(wire.generate_request_pb({**GENERATE, "temperature": MIN_TEMPERATURE, "seed": 1}))
    values = scored["token_logprobs"] + sum(scored["top_logprobs"], [])
    values += wire.generate_response(sampled).results[0].samples[0].top_logprobs.ravel().tolist()
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("stream", [0, 1, "false"])
def test_stream_must_be_a_boolean(http, stream):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})):
        answer = http.post(path, json={**body, "stream": stream})
        assert answer.status_code == 400 and _error(answer)["field"] == "stream"
        assert http.post(path, json={**body, "stream": False}).status_code == 200


# --- errors end where they start ---


def _requests_counted(http_url: str, endpoint: str, transport: str, outcome: str) -> float:
    wanted = f'potstill_requests_total{{endpoint="{endpoint}",outcome="{outcome}",transport="{transport}"}}'
    for line in httpx.get(http_url + "/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


def test_a_handler_crash_is_a_counted_500_and_grpc_internal(start_teacher, caplog):
    with start_teacher() as server:
        async def crash(request):
            raise RuntimeError("boom")

        server.server.service.score = crash
        answer = httpx.post(server.http_url + "/v1/score", json=SCORE)
        assert answer.status_code == 500
        assert _error(answer) == {"type": "internal_error", "message": "internal error (RuntimeError); see the teacher's log",
                                  "param": None, "code": 500, "field": None}
        assert _requests_counted(server.http_url, "/v1/score", "http", "500") == 1
        with grpc.insecure_channel(grpc_target(server)) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                teacher_pb2_grpc.TeacherStub(channel).Score(wire.score_request_pb(SCORE))
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert dict(failed.value.trailing_metadata())[KIND_METADATA] == "internal_error"
        assert _requests_counted(server.http_url, "Score", "grpc", "INTERNAL") == 1
        assert _requests_counted(server.http_url, "Score", "grpc", "OK") == 0
    logged = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(logged) == 2  # once per crash, by us


def test_the_error_kind_and_field_travel_in_grpc_trailing_metadata(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Score(wire.score_request_pb({**SCORE, "top_logprobs": 10**6}))
    trailers = dict(refused.value.trailing_metadata())
    assert trailers[KIND_METADATA] == "invalid_request" and trailers[FIELD_METADATA] == "top_logprobs"


def test_random_and_truncated_protobuf_never_crash_either_transport(http, grpc_channel):
    """Random bytes and every prefix of valid messages: answered, or refused as the caller's fault."""
    rng = random.Random(0)
    valid = {
        "Score": wire.score_request_pb({**SCORE, "temperature": 0.5}).SerializeToString(),
        "Generate": wire.generate_request_pb({**GENERATE, "prompts": ["1+2="], "seed": 3}).SerializeToString(),
    }
    bodies = {method: [message[:cut] for cut in range(len(message))] + [rng.randbytes(rng.randrange(1, 64)) for _ in range(60)]
              for method, message in valid.items()}
    paths = {"Score": "/v1/score", "Generate": "/v1/generate"}
    codes = set()
    for method, payloads in bodies.items():
        call = _raw_call(grpc_channel, method)
        for payload in payloads:
            try:
                call(payload, timeout=60)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.add(error.code())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, payload, error.details())
            answer = http.post(paths[method], content=payload, headers={"content-type": PROTOBUF})
            assert answer.status_code in (200, 400), (method, payload, answer.text)
    assert grpc.StatusCode.INVALID_ARGUMENT in codes


def test_garbage_protobuf_over_grpc_is_invalid_argument(grpc_channel):
    with pytest.raises(grpc.RpcError) as refused:
        _raw_call(grpc_channel, "Score")(b"\xff\xff\xff\xff", timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("body: not a valid potstill.v1.ScoreRequest")


def test_a_client_hanging_up_mid_body_logs_no_traceback(teacher, caplog):
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", int(teacher.http_url.rsplit(":", 1)[1]))) as connection:
                connection.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 1000\r\n\r\n{\"sequences\": ")
        assert httpx.get(teacher.http_url + "/health/live").status_code == 200
        time.sleep(0.5)  # let the server notice the hang-ups before the log is read
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []


def test_a_trickling_body_times_out_with_408(start_teacher):
    with start_teacher(body_timeout_seconds=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.server.http_port)) as connection:
            connection.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{")
            connection.settimeout(30)
            head = connection.recv(4096).decode()
        assert head.startswith("HTTP/1.1 408"), head


def test_connections_beyond_max_connections_are_answered_503(start_teacher):
    with start_teacher(max_connections=3) as server:
        address = ("127.0.0.1", server.server.http_port)
        idle = [socket.create_connection(address) for _ in range(2)]
        try:
            # The server accepts connections in order, so both idle ones count before this request.
            crowded = httpx.get(server.http_url + "/health/live")
        finally:
            for connection in idle:
                connection.close()
        assert crowded.status_code == 503
        deadline = time.monotonic() + 30
        while httpx.get(server.http_url + "/health/live").status_code != 200:  # room again once they left
            assert time.monotonic() < deadline, "connections were never released"
            time.sleep(0.05)


def test_429_says_when_to_retry(start_teacher):
    with start_teacher(max_queued_requests=1) as server:
        service = server.server.service
        service._admitted = 1  # the one place is taken
        try:
            answer = httpx.post(server.http_url + "/v1/score", json=SCORE)
        finally:
            service._admitted = 0
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"


# --- shutdown ---


def test_requests_unanswered_past_the_grace_period_are_answered_503_at_once(start_teacher):
    """Queued requests and the one on the model get 503 when the grace ends; the server stops then,
    without waiting for the pass under way (once it waited, so exit could overrun grace by a pass)."""
    server = start_teacher(grace_seconds=0.3, batch_window_ms=0).start()
    backend = server.server.service._require_backend()
    entered, release = threading.Event(), threading.Event()
    score_pass = backend._score_batcher._run_batch

    def held_score_pass(items):
        entered.set()
        release.wait(timeout=120)
        return score_pass(items)

    backend._score_batcher._run_batch = held_score_pass
    answers: list[httpx.Response] = []
    senders = [threading.Thread(target=lambda: answers.append(httpx.post(server.http_url + "/v1/score", json=SCORE, timeout=60)))
               for _ in range(3)]
    try:
        senders[0].start()
        assert entered.wait(timeout=30)  # on the model before the others arrive, so they wait behind it
        for sender in senders[1:]:
            sender.start()
        while server.server.service._admitted < 3:  # one on the model, two queued behind it
            time.sleep(0.01)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        stopping.join(timeout=60)
        assert not stopping.is_alive(), "the server waited for the pass on the model"
        assert not release.is_set()  # the pass is still held: the stop did not wait for it
        for sender in senders:
            sender.join(timeout=60)
    finally:
        release.set()
    assert [answer.status_code for answer in answers] == [503, 503, 503]
    assert all(_error(a)["type"] == "unavailable" and a.headers["retry-after"] == "1" for a in answers)


def test_the_grace_period_keeps_its_fraction(tiny_model_dir):
    async def http_shutdown_timeout() -> float:
        server = TeacherServer(ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, grace_seconds=0.25))
        server._http_socket.close()
        return server.http.config.timeout_graceful_shutdown

    assert asyncio.run(http_shutdown_timeout()) == pytest.approx(1.25)  # grace + time to answer the 503s


# --- authentication fails closed ---


@pytest.mark.parametrize("content", ["", "  \n\t"])
def test_an_empty_key_file_refuses_to_start(tiny_model_dir, tmp_path, content):
    key_file = tmp_path / "key"
    key_file.write_text(content)
    with pytest.raises(UsageError, match="holds no key"):
        ServeOptions(model=tiny_model_dir, api_key_file=str(key_file)).with_api_keys()
    with pytest.raises(ValueError, match="empty"):
        ServeOptions(model=tiny_model_dir, api_keys=content)  # as POTSTILL_API_KEYS gives it
    with pytest.raises(ValueError, match="empty"):
        build_app(TeacherService(ServiceSettings(model="m", backend="hf")), api_keys=(content,))


def test_documents_and_reflection_need_the_key_unless_opened(start_teacher):
    key = "k3y"
    for opened in (False, True):
        with start_teacher(api_keys=(key,), docs_without_api_key=opened) as server:
            assert (httpx.get(server.http_url + "/openapi.json").status_code == 200) is opened
            assert (httpx.get(server.http_url + "/docs").status_code == 200) is opened
            authorised = httpx.get(server.http_url + "/openapi.json", headers={"Authorization": f"Bearer {key}"})
            assert authorised.status_code == 200 and "/v1/score" in authorised.json()["paths"]
            with grpc.insecure_channel(grpc_target(server)) as channel:
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                if opened:
                    assert next(iter(stub.ServerReflectionInfo(iter([request])))).list_services_response.service
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        next(iter(stub.ServerReflectionInfo(iter([request]))))
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_takes_the_bearer_scheme_in_any_case(start_teacher):
    with start_teacher(api_keys=("k3y",)) as server, grpc.insecure_channel(grpc_target(server)) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", f"{scheme} k3y")]).vocab_size > 0
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", "bearer")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(refused.value.trailing_metadata())[KIND_METADATA] == "unauthenticated"


# --- the published API ---


def test_openapi_publishes_the_request_schemas(http):
    document = http.get("/openapi.json").json()
    for path, name in (("/v1/score", "ScoreRequest"), ("/v1/generate", "GenerateRequest"),
                       ("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    score = document["components"]["schemas"]["ScoreRequest"]
    assert score["additionalProperties"] is False and score["required"] == ["sequences"]
    assert score["properties"]["temperature"]["minimum"] == MIN_TEMPERATURE
    client = openai.OpenAI(base_url=http.base_url.join("/v1").__str__(), api_key="x", max_retries=0)
    assert client.models.list().data  # the published document does not get in the way of real clients
