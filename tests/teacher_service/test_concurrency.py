"""Many callers at once, over HTTP JSON, HTTP protobuf and gRPC mixed: each gets its own answer.

Every request has distinct input, so an answer delivered to the wrong caller, or a batch that
mixed two requests' rows, shows up as a difference from the answers given one at a time.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire

from .conftest import PROTOBUF, grpc_target

TRANSPORTS = ("json", "protobuf", "grpc")


def jobs() -> list[tuple[str, dict]]:
    """Distinct score and generate requests: different prompts, lengths, k and seeds."""
    rng = random.Random(0)
    work = []
    for index in range(12):
        prompt = [rng.randrange(5, 384) for _ in range(rng.randrange(1, 20))]
        completion = [rng.randrange(5, 384) for _ in range(rng.randrange(1, 12))]
        work.append(("score", {"sequences": [{"prompt": prompt, "completion": completion}], "top_logprobs": 1 + index % 5}))
    for index in range(8):
        prompts = [[rng.randrange(5, 384) for _ in range(rng.randrange(1, 10))] for _ in range(1 + index % 2)]
        work.append(("generate", {"prompts": prompts, "n": 2, "max_tokens": 6, "seed": 1000 + index, "top_logprobs": 3}))
    return work


def call(base_url: str, target: str, kind: str, request: dict, transport: str) -> list[dict]:
    """One request over one transport; the answer as plain lists, however it travelled."""
    path = f"/v1/{kind}"
    if transport == "json":
        response = httpx.post(base_url + path, json=request, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["results"]
    message = wire.score_request_pb(request) if kind == "score" else wire.generate_request_pb(request)
    if transport == "protobuf":
        response = httpx.post(
            base_url + path, content=message.SerializeToString(),
            headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF}, timeout=120,
        )
        assert response.status_code == 200, response.text
        answer = (pb.ScoreResponse if kind == "score" else pb.GenerateResponse).FromString(response.content)
    else:
        with grpc.insecure_channel(target) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            answer = (stub.Score if kind == "score" else stub.Generate)(message, timeout=120)
    decoded = wire.score_response(answer) if kind == "score" else wire.generate_response(answer)
    return decoded.to_json()["results"]


def assert_same(one, other) -> None:
    """Equal structure and ids; log-probs equal to float32 noise."""
    if isinstance(one, dict):
        assert one.keys() == other.keys()
        for key in one:
            assert_same(one[key], other[key])
    elif isinstance(one, list) and one and isinstance(np.ravel(one)[0], float):
        np.testing.assert_allclose(np.asarray(one, dtype=np.float64), np.asarray(other, dtype=np.float64), rtol=0, atol=1e-6)
    elif isinstance(one, list) and one and isinstance(one[0], dict):
        assert len(one) == len(other)
        for left, right in zip(one, other):
            assert_same(left, right)
    else:
        assert one == other


@pytest.mark.timeout(300)
def test_concurrent_callers_each_get_their_own_answer(teacher):
    base_url, target = teacher.http_url, grpc_target(teacher)
    work = jobs()
    sequential = [call(base_url, target, kind, request, "json") for kind, request in work]
    # Every job over every transport, shuffled, 16 at a time: 60 requests in flight together.
    calls = [(index, transport) for index in range(len(work)) for transport in TRANSPORTS]
    random.Random(1).shuffle(calls)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda c: call(base_url, target, *work[c[0]], c[1]), calls))
    for (index, transport), answer in zip(calls, answers):
        assert len(answer) == len(sequential[index]), (index, transport)
        assert_same(answer, sequential[index])
    # The answers of distinct requests differ: a swap could not go unnoticed.
    distinct = {repr(answer) for answer in sequential}
    assert len(distinct) == len(work)
