"""Teacher clients against real servers: every kind answers alike, and failures are classified.

The gRPC, HTTP (protobuf) and OpenAI-compatible clients all talk to the session's `teacher`; the
OpenAI client goes through the server's own /v1/completions. vLLM's answer format, which no
server here speaks, is checked with a mock transport built from vLLM's response schema.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.teachers import (
    CLIENTS,
    GrpcTeacherClient,
    HttpTeacherClient,
    OpenAITeacherClient,
    TeacherRequestError,
    TeacherUnavailable,
    connect_client,
)

KINDS = ("grpc", "http", "openai")
SCORE_REQUEST = {
    "sequences": [
        {"prompt": "what is 12+34?", "completion": " 46 because we add"},
        {"prompt": [5, 6, 7, 8], "completion": [40, 41, 42]},
    ],
    "top_logprobs": 5,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def url_of(teacher: BackgroundTeacher, kind: str) -> str:
    return {"grpc": teacher.grpc_url, "http": teacher.http_url, "openai": f"openai+{teacher.http_url}/v1"}[kind]


def run_with_clients(teacher, kinds, work, **options):
    """Run `work(clients)` in a fresh event loop, with one client per kind, closed afterwards."""

    async def main():
        clients = {kind: connect_client(url_of(teacher, kind), **options) for kind in kinds}
        try:
            return await work(clients)
        finally:
            await asyncio.gather(*(client.close() for client in clients.values()))

    return asyncio.run(main())


def test_the_scheme_picks_the_client():
    assert isinstance(connect_client("grpc://localhost:1"), GrpcTeacherClient)
    assert isinstance(connect_client("grpcs://localhost:1"), GrpcTeacherClient)
    assert isinstance(connect_client("https://localhost:1"), HttpTeacherClient)
    assert isinstance(connect_client("openai+https://localhost:1/v1?model=m"), OpenAITeacherClient)
    assert set(CLIENTS) == {"grpc", "grpcs", "http", "https", "openai+http", "openai+https"}
    with pytest.raises(ValueError, match="scheme must be one of"):
        connect_client("ftp://localhost:1")


def test_model_info_from_every_client(teacher, tiny_model_dir):
    infos = run_with_clients(teacher, KINDS, lambda c: asyncio.gather(*(c[k].model_info() for k in KINDS)))
    grpc_info, http_info, openai_info = infos
    assert grpc_info == http_info
    assert grpc_info.model == tiny_model_dir and grpc_info.vocab_size == 384 and len(grpc_info.tokenizer_fingerprint) == 64
    assert openai_info.model == tiny_model_dir
    assert openai_info.backend == "openai:potstill"
    assert openai_info.tokenizer_fingerprint == "" and openai_info.vocab_size == 0  # unknown


def test_every_client_returns_the_same_scores(teacher, tokenizer):
    answers = run_with_clients(
        teacher, KINDS, lambda c: asyncio.gather(*(c[k].score(SCORE_REQUEST) for k in KINDS)), tokenizer=tokenizer
    )
    reference = answers[0].results
    assert reference[0].top_ids.shape[1] == 5 and reference[1].top_ids.shape == (3, 5)
    for answer in answers[1:]:
        for expected, result in zip(reference, answer.results, strict=True):
            assert result.prompt_tokens == expected.prompt_tokens
            np.testing.assert_array_equal(result.token_ids, expected.token_ids)
            np.testing.assert_array_equal(result.top_ids, expected.top_ids)
            np.testing.assert_allclose(result.token_logprobs, expected.token_logprobs, atol=1e-5)
            np.testing.assert_allclose(result.top_logprobs, expected.top_logprobs, atol=1e-5)
            assert result.top_ids.dtype == np.int32 and result.top_logprobs.dtype == np.float32


def test_openai_client_needs_a_tokenizer_only_for_text(teacher):
    ids_only = {"sequences": [SCORE_REQUEST["sequences"][1]], "top_logprobs": 2}

    async def work(clients):
        scored = await clients["openai"].score(ids_only)
        with pytest.raises(TeacherRequestError, match="tokenizer") as refused:
            await clients["openai"].score(SCORE_REQUEST)
        return scored, refused.value

    scored, refused = run_with_clients(teacher, ["openai"], work)
    assert scored.results[0].top_ids.shape == (3, 2)
    assert refused.field == "sequences.0.prompt"


def test_every_client_returns_the_same_samples(teacher, tokenizer):
    # One prompt per request: the same seed draws the same samples only for the same batch.
    request = {"prompts": ["the teacher"], "n": 2, "max_tokens": 6, "top_logprobs": 3, "seed": 11}
    answers = run_with_clients(
        teacher, KINDS, lambda c: asyncio.gather(*(c[k].generate(request) for k in KINDS)), tokenizer=tokenizer
    )
    grpc_answer, http_answer, openai_answer = (a.results[0] for a in answers)
    assert len(grpc_answer.samples) == 2
    for native, over_http, over_openai in zip(grpc_answer.samples, http_answer.samples, openai_answer.samples, strict=True):
        # Concurrent requests may share a forward pass: the same tokens, log-probs equal to float rounding.
        assert (native.text, native.token_ids.tolist(), native.top_ids.tolist(), native.finish_reason) == (
            over_http.text, over_http.token_ids.tolist(), over_http.top_ids.tolist(), over_http.finish_reason)
        np.testing.assert_allclose(over_http.token_logprobs, native.token_logprobs, atol=1e-5)
        np.testing.assert_allclose(over_http.top_logprobs, native.top_logprobs, atol=1e-5)
        assert over_openai.text == native.text
        assert over_openai.finish_reason == native.finish_reason
        np.testing.assert_allclose(over_openai.token_logprobs, native.token_logprobs, atol=1e-5)
        # Text-keyed top_logprobs keep one of the ids that decode alike: each row is a subset, -inf padded.
        for got, expected in zip(over_openai.top_logprobs, native.top_logprobs, strict=True):
            kept = got[np.isfinite(got)]
            assert len(kept) >= 1
            assert np.abs(kept[:, None] - expected[None, :]).min(axis=1).max() < 1e-5
        # Token strings map back to ids; ids that decode alike (partial UTF-8 bytes) map to one of them.
        for got, expected in zip(over_openai.token_ids, native.token_ids, strict=True):
            assert got == expected or tokenizer.decode([got]) == tokenizer.decode([expected])
        assert over_openai.top_ids.shape == native.top_ids.shape == (len(native.token_ids), 3)


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_a_bad_request_is_refused_naming_the_field(teacher, kind):
    too_many = {**SCORE_REQUEST, "top_logprobs": 1000}
    outside = {"sequences": [{"prompt": [1, 2], "completion": [10_000]}], "top_logprobs": 1}

    async def work(clients):
        errors = []
        for request in (too_many, outside):
            with pytest.raises(TeacherRequestError) as refused:
                await clients[kind].score(request)
            errors.append(refused.value)
        return errors

    k_error, id_error = run_with_clients(teacher, [kind], work)
    assert k_error.field == "top_logprobs" and "at most 20" in str(k_error) and "top_logprobs" in str(k_error)
    assert id_error.field == "sequences.0.completion" and "outside the vocabulary" in str(id_error)


def test_openai_client_refuses_what_it_cannot_do(teacher, tokenizer):
    async def work(clients):
        client = clients["openai"]
        with pytest.raises(TeacherRequestError) as too_many:
            await client.score({**SCORE_REQUEST, "top_logprobs": 1000})
        with pytest.raises(TeacherRequestError) as hot:
            await client.score({**SCORE_REQUEST, "temperature": 2.0})
        return too_many.value, hot.value

    too_many, hot = run_with_clients(teacher, ["openai"], work, tokenizer=tokenizer)
    assert too_many.field == "prompt_logprobs" and "at most 20" in too_many.message
    assert hot.field == "temperature"


def test_a_stopped_teacher_is_unavailable(tiny_model_dir):
    stopped = BackgroundTeacher(ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0)).start()
    stopped.stop()

    async def work(clients):
        errors = {}
        for kind, client in clients.items():
            with pytest.raises(TeacherUnavailable) as down:
                await client.model_info()
            errors[kind] = down.value
        return errors

    errors = run_with_clients(stopped, KINDS, work, timeout=5.0)
    for kind, error in errors.items():
        assert error.url == url_of(stopped, kind) and url_of(stopped, kind) in str(error)
        assert not error.overloaded
    assert "UNAVAILABLE" in errors["grpc"].message


def test_api_key_is_sent_by_every_client(tiny_model_dir, tokenizer):
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, api_keys=("s3cret",))
    with BackgroundTeacher(options) as locked:

        async def attempt(clients):
            outcomes = {}
            for kind, client in clients.items():
                try:
                    outcomes[kind] = await client.model_info()
                except TeacherRequestError as error:
                    outcomes[kind] = error
            return outcomes

        refused = run_with_clients(locked, KINDS, attempt)
        admitted = run_with_clients(locked, KINDS, attempt, api_key="s3cret")
    assert all(isinstance(error, TeacherRequestError) for error in refused.values())
    assert "UNAUTHENTICATED" in refused["grpc"].message and "HTTP 401" in refused["http"].message
    assert all(info.model == tiny_model_dir for info in admitted.values())


# --- vLLM's answer format, served by a mock transport ---


def mock_openai(handler) -> OpenAITeacherClient:
    """An OpenAI client whose requests go to `handler(path, body) -> (status, json)`."""

    def respond(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        status, answer = handler(request.url.path, body)
        return httpx.Response(status, json=answer)

    return OpenAITeacherClient("openai+http://vllm:8000/v1?model=teacher", transport=httpx.MockTransport(respond))


def vllm_entry(candidates: dict[int, tuple[float, int]]) -> dict:
    return {str(i): {"logprob": lp, "rank": rank, "decoded_token": f"t{i}"} for i, (lp, rank) in candidates.items()}


def test_vllm_prompt_logprobs_are_read_by_id_and_rank():
    seen = []

    def handler(path, body):
        seen.append(body)
        if body["max_tokens"] == 0:  # a server that refuses the max_tokens=0 scoring trick
            return 400, {"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError", "param": "max_tokens"}}
        prompt_logprobs = [
            None,
            vllm_entry({11: (-0.5, 1), 12: (-1.5, 2)}),
            # The actual token (13) is outside the top 2: listed too, with its own rank.
            vllm_entry({14: (-0.2, 1), 15: (-2.0, 2), 13: (-3.0, 7)}),
            vllm_entry({16: (-0.1, 1), 13: (-2.5, 2)}),
        ]
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": prompt_logprobs}
        return 200, {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}

    async def work():
        client = mock_openai(handler)
        try:
            return await client.score({"sequences": [{"prompt": [10, 12], "completion": [13, 13]}], "top_logprobs": 2})
        finally:
            await client.close()

    result = asyncio.run(work()).results[0]
    assert [body["max_tokens"] for body in seen] == [0, 1]
    assert seen[-1]["prompt"] == [10, 12, 13, 13] and seen[-1]["echo"] is True and seen[-1]["prompt_logprobs"] == 2
    assert seen[-1]["model"] == "teacher"
    assert result.prompt_tokens == 2
    np.testing.assert_array_equal(result.token_ids, [13, 13])
    np.testing.assert_allclose(result.token_logprobs, [-3.0, -2.5])
    np.testing.assert_array_equal(result.top_ids, [[14, 15], [16, 13]])
    np.testing.assert_allclose(result.top_logprobs, [[-0.2, -2.0], [-0.1, -2.5]])


def test_vllm_token_id_extensions_give_exact_ids():
    def handler(path, body):
        assert body["return_tokens_as_token_ids"] is True and body["return_token_ids"] is True
        logprobs = {
            "tokens": ["token_id:7", "token_id:2"],
            "token_logprobs": [-0.7, -0.2],
            "top_logprobs": [{"token_id:7": -0.7, "token_id:8": -1.0}, {"token_id:2": -0.2, "token_id:9": -2.2}],
            "text_offset": [0, 1],
        }
        choice = {"index": 0, "text": "x", "logprobs": logprobs, "finish_reason": "stop", "token_ids": [7, 2]}
        return 200, {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    async def work():
        client = mock_openai(handler)
        try:
            return await client.generate({"prompts": ["abc"], "top_logprobs": 1, "seed": 3})
        finally:
            await client.close()

    result = asyncio.run(work()).results[0]
    sample = result.samples[0]
    assert result.prompt_tokens == 3 and sample.text == "x" and sample.finish_reason == "stop"
    np.testing.assert_array_equal(sample.token_ids, [7, 2])
    np.testing.assert_array_equal(sample.top_ids, [[7], [2]])
    np.testing.assert_allclose(sample.top_logprobs, [[-0.7], [-0.2]])


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}),
        (400, {"error": {"message": "Unrecognized request argument supplied: prompt_logprobs", "param": None}}),
    ],
    ids=["ignored", "refused"],
)
def test_a_teacher_without_prompt_logprobs_is_black_box_only(answer):
    async def work():
        client = mock_openai(lambda path, body: answer)
        try:
            await client.score({"sequences": [{"prompt": [1], "completion": [2]}]})
        finally:
            await client.close()

    with pytest.raises(TeacherRequestError, match="only black-box methods"):
        asyncio.run(work())


@pytest.mark.parametrize(("status", "error_type", "overloaded"), [(429, TeacherUnavailable, True), (503, TeacherUnavailable, False), (502, TeacherUnavailable, False), (500, TeacherUnavailable, False), (404, TeacherRequestError, None)])
def test_http_statuses_are_classified(status, error_type, overloaded):
    async def work():
        client = mock_openai(lambda path, body: (status, {"error": {"message": "nope", "field": "prompt"}}))
        try:
            await client.generate({"prompts": [[1]]})
        finally:
            await client.close()

    with pytest.raises(error_type) as raised:
        asyncio.run(work())
    assert type(raised.value) is error_type and raised.value.field == "prompt" and f"HTTP {status}" in str(raised.value)
    if overloaded is not None:
        assert raised.value.overloaded is overloaded


# --- the query command ---


def test_query_command_prints_info_scores_and_samples(teacher, tiny_model_dir, capsys):
    from potstill.cli import main

    main(["query", teacher.grpc_url, "info", "--json"])
    assert json.loads(capsys.readouterr().out)["model"] == tiny_model_dir

    main(["query", teacher.http_url, "score", "--prompt", "what is 12+34?", "--completion", " 46", "-k", "3", "--json"])
    [scored] = json.loads(capsys.readouterr().out)["results"]
    assert len(scored["top_ids"][0]) == 3 and len(scored["token_ids"]) == len(scored["token_logprobs"])

    main(["query", f"openai+{teacher.http_url}/v1", "score", "--prompt", "what is 12+34?", "--completion", " 46", "-k", "3", "--json"])
    assert json.loads(capsys.readouterr().out)["results"][0]["top_ids"] == scored["top_ids"]

    main(["query", teacher.grpc_url, "score", "--prompt", "what is 12+34?", "--completion", " 46 because", "-k", "2"])
    table = capsys.readouterr().out
    assert "'4'" in table and "'6'" in table and "top-k" in table and "sum of log-probs" in table

    main(["query", teacher.grpc_url, "generate", "--prompt", "hello", "-n", "2", "--max-tokens", "3", "-k", "2", "--seed", "1"])
    out = capsys.readouterr().out
    assert "sample 0" in out and "sample 1" in out

    with pytest.raises(SystemExit) as failed:
        main(["query", teacher.grpc_url, "score", "--prompt", "hi", "--completion", " there", "-k", "1000"])
    assert failed.value.code == 1 and "top_logprobs" in capsys.readouterr().err
