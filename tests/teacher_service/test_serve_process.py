"""`potstill serve` as a real process: it reports readiness, answers, and drains on SIGTERM."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire

READY = re.compile(r"potstill teacher ready: http://(\S+):(\d+) grpc://(\S+):(\d+)")
LISTENING = re.compile(r"listening: http://(\S+):(\d+) grpc://")
SCORE = {"sequences": [{"prompt": "the teacher", "completion": " learns"}], "top_logprobs": 3}
SLOW_GENERATE = {"prompts": ["a", "b", [7, 8]], "n": 4, "max_tokens": 100}
# A grace period no loaded CI machine exceeds: the drain is what is tested, not the timeout.
GRACE = ("--grace-seconds", "180")

pytestmark = pytest.mark.timeout(300)


@dataclass
class ServeProcess:
    process: subprocess.Popen
    http_url: str
    grpc_target: str
    log: Path

    def exit_code(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


def wait_for(pattern: re.Pattern, read, timeout: float, process: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(read())
        if match:
            return match
        assert process.poll() is None, f"potstill serve exited early with {process.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout}s")


@contextlib.contextmanager
def serve(model_dir: str, tmp_path: Path, *extra: str) -> Iterator[ServeProcess]:
    """Start `python -m potstill.cli serve` on free ports; yields once it printed its ready line."""
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "potstill.cli", "serve", "--model", model_dir, "--http-port", "0", "--grpc-port", "0", *GRACE, *extra]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    printed: list[str] = []

    def stdout() -> str:
        while not lines.empty():
            printed.append(lines.get())
        return "".join(printed)

    try:
        # Listening comes before loading: /health answers 503 (or already 200, with a model this small).
        listening = wait_for(LISTENING, log.read_text, 120, process)
        with contextlib.suppress(httpx.TransportError):
            early = httpx.get(f"http://{listening[1]}:{listening[2]}/health")
            assert early.status_code == 200 or (early.status_code == 503 and early.json() == {"status": "loading"})
        ready = wait_for(READY, stdout, 120, process)
        yield ServeProcess(process, f"http://{ready[1]}:{ready[2]}", f"{ready[3]}:{ready[4]}", log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def in_flight(http_url: str, headers: dict) -> float:
    for line in httpx.get(http_url + "/metrics", headers=headers).text.splitlines():
        if line.startswith("potstill_queue_depth "):
            return float(line.split()[1])
    return 0.0


def drain_on_sigterm(server: ServeProcess, api_key: str | None = None) -> None:
    """SIGTERM while slow generates run (one over HTTP, one over gRPC): both still get their answer, then exit 0."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    finished: dict[str, tuple[object, float]] = {}

    def over_http():
        response = httpx.post(server.http_url + "/v1/generate", json=SLOW_GENERATE, headers=headers, timeout=240)
        finished["http"] = (response, time.monotonic())

    def over_grpc():
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            answer = stub.Generate(wire.generate_request_pb(SLOW_GENERATE), metadata=metadata, timeout=240)
            finished["grpc"] = (wire.generate_response(answer).to_json(), time.monotonic())

    callers = [threading.Thread(target=over_http), threading.Thread(target=over_grpc)]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 60
    while in_flight(server.http_url, headers) < 2:  # both admitted: one on the model, one waiting for it
        assert time.monotonic() < deadline and all(c.is_alive() for c in callers), "the slow requests never started"
        time.sleep(0.01)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for caller in callers:
        caller.join(timeout=240)
    assert finished.keys() == {"http", "grpc"}, server.log.read_text()[-3000:]
    response, http_done = finished["http"]
    assert response.status_code == 200, response.text
    answer, grpc_done = finished["grpc"]
    for results in (response.json()["results"], answer["results"]):
        assert [len(r["samples"]) for r in results] == [4, 4, 4]
    assert min(http_done, grpc_done) > signalled, "a request was not in flight when the signal came"
    # Promptly: once the last request is answered, not at the end of the grace period.
    assert server.exit_code(timeout=30) == 0, server.log.read_text()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(server.http_url + "/health", timeout=2)


def test_serve_answers_and_drains_on_sigterm(tiny_model_dir, tmp_path):
    with serve(tiny_model_dir, tmp_path, "--max-batch", "3") as server:
        assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}
        response = httpx.post(server.http_url + "/v1/score", json=SCORE)
        assert response.status_code == 200 and len(response.json()["results"][0]["token_ids"]) >= 1
        too_many = httpx.post(server.http_url + "/v1/score", json={**SCORE, "sequences": SCORE["sequences"] * 4})
        assert too_many.status_code == 400 and too_many.json()["error"]["field"] == "sequences", too_many.text
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            info = stub.GetModelInfo(pb.ModelInfoRequest())
            assert (info.model, info.max_batch) == (tiny_model_dir, 3)
            scored = wire.score_response(stub.Score(wire.score_request_pb(SCORE)))
        assert scored.to_json()["results"] == response.json()["results"]
        drain_on_sigterm(server)


def test_serve_with_an_api_key_file(tiny_model_dir, tmp_path, monkeypatch):
    key_file = tmp_path / "api-key"
    key_file.write_text("# trainers of team A\nfile-key-123\n  team-b-key  \n")  # surrounding whitespace is not part of a key
    monkeypatch.setenv("POTSTILL_API_KEYS", "env-key-1,env-key-2")  # more keys, from the environment
    with serve(tiny_model_dir, tmp_path, "--api-key-file", str(key_file)) as server:
        good = {"Authorization": "Bearer file-key-123"}
        assert httpx.get(server.http_url + "/health").status_code == 200
        assert httpx.get(server.http_url + "/metrics").status_code == 200  # Prometheus scrapes without the key
        assert httpx.post(server.http_url + "/v1/score", json=SCORE).status_code == 401
        assert httpx.post(server.http_url + "/v1/score", json=SCORE, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(server.http_url + "/v1/score", json=SCORE, headers=good).status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.ModelInfoRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", "Bearer file-key-123")]).vocab_size == 384
            for key in ("team-b-key", "env-key-1", "env-key-2"):
                bearer = {"Authorization": f"Bearer {key}"}
                assert httpx.post(server.http_url + "/v1/score", json=SCORE, headers=bearer).status_code == 200, key
                assert stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", f"Bearer {key}")]).vocab_size == 384
            for wrong in ("# trainers", "env-key-1,env-key-2", "team-b"):
                assert httpx.post(server.http_url + "/v1/score", json=SCORE, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        drain_on_sigterm(server, api_key="file-key-123")


def test_settings_come_from_a_yaml_file_then_the_environment_then_flags(tiny_model_dir, tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("max-batch: 5\nmax_top_logprobs: 7\nmax-samples: 3\n")
    monkeypatch.setenv("POTSTILL_MAX_BATCH", "4")  # the environment beats the file
    monkeypatch.setenv("POTSTILL_MAX_SAMPLES", "2")  # a flag beats the environment
    with serve(tiny_model_dir, tmp_path, "--config", str(config), "--max-samples", "6", "--log-format", "json") as server:
        info = httpx.get(server.http_url + "/v1/model").json()
        assert (info["max_batch"], info["max_top_logprobs"], info["max_samples"]) == (4, 7, 6)
        drain_on_sigterm(server)
    logged = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("listening: ") and entry["level"] == "INFO" for entry in logged)
    assert {"time", "level", "logger", "message"} <= logged[0].keys()


def test_sigterm_turns_readiness_false_while_requests_are_still_answered(tiny_model_dir, tmp_path):
    # The drain delay is long enough for a loaded machine to send three requests within it.
    with serve(tiny_model_dir, tmp_path, "--drain-delay-seconds", "15") as server:
        assert httpx.get(server.http_url + "/health/ready").json() == {"status": "ok"}
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="potstill.v1.Teacher")).status == health_pb2.HealthCheckResponse.SERVING
            server.process.send_signal(signal.SIGTERM)
            wait_for(re.compile("shutting down"), server.log.read_text, 30, server.process)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
        ready = httpx.get(server.http_url + "/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        assert httpx.get(server.http_url + "/health").status_code == 503
        assert httpx.get(server.http_url + "/health/live").json() == {"status": "alive"}
        assert httpx.post(server.http_url + "/v1/score", json=SCORE).status_code == 200
        assert server.exit_code(timeout=120) == 0


SERVE_MISTAKES = [
    (["--model", "/no/such/model"], "potstill serve: error: --model /no/such/model: no such directory"),
    (["--model", "./missing-model-dir"], "potstill serve: error: --model ./missing-model-dir: no such directory"),
]
if importlib.util.find_spec("vllm") is None:
    SERVE_MISTAKES.append((["--backend", "vllm", "--model", "MODEL"], "potstill serve: error: --backend vllm needs vLLM"))


@pytest.mark.parametrize(("arguments", "message"), SERVE_MISTAKES)
def test_a_serving_mistake_is_one_line_and_exit_status_2(tiny_model_dir, arguments, message):
    arguments = [tiny_model_dir if a == "MODEL" else a for a in arguments]
    finished = subprocess.run([sys.executable, "-m", "potstill.cli", "serve", *arguments, "--http-port", "0", "--grpc-port", "0"],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in finished.stderr
