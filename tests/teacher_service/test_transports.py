"""One service, every door: HTTP JSON, HTTP protobuf, gRPC and the OpenAI-compatible routes agree.

Also the operational surface: /health, /v1/model and GetModelInfo, the gRPC health and
reflection services, and /metrics in Prometheus text format.
"""

from __future__ import annotations

import grpc
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from potstill.fingerprint import tokenizer_fingerprint
from potstill.v1 import teacher_pb2 as pb
from teacher_service import wire
from teacher_service.protocol import GenerateResponse, ScoreResponse

from .conftest import PROTOBUF

SCORE_REQUEST = {
    "sequences": [
        {"prompt": "the teacher learns", "completion": " from samples"},
        {"prompt": [5, 6, 7, 8, 9], "completion": [10, 11, 12]},
        {"prompt": [{"role": "user", "content": "what is 3+4?"}], "completion": "7"},
    ],
    "top_logprobs": 6,
    "temperature": 1.5,
}
GENERATE_REQUEST = {
    "prompts": ["hello", [40, 41, 42], [{"role": "user", "content": "hi"}]],
    "n": 3,
    "max_tokens": 8,
    "temperature": 0.9,
    "top_p": 0.95,
    "seed": 2024,
    "top_logprobs": 4,
}
DISTRIBUTION_FIELDS = ("token_ids", "token_logprobs", "top_ids", "top_logprobs")


def as_arrays(item) -> dict[str, np.ndarray]:
    """The dense fields of a result, from its JSON form or from its decoded form."""
    get = item.get if isinstance(item, dict) else lambda name: getattr(item, name)
    return {name: np.asarray(get(name)) for name in DISTRIBUTION_FIELDS}


def assert_same_distributions(one, other) -> None:
    left, right = as_arrays(one), as_arrays(other)
    for name in DISTRIBUTION_FIELDS:
        assert left[name].shape == right[name].shape, name
        np.testing.assert_array_equal(left[name], right[name].astype(left[name].dtype), err_msg=name)


def post_protobuf(http, path: str, message) -> bytes:
    response = http.post(
        path, content=message.SerializeToString(), headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(PROTOBUF)
    return response.content


# --- the native endpoints through every transport ---


def test_score_is_the_same_over_every_transport(http, stub):
    as_json = http.post("/v1/score", json=SCORE_REQUEST).json()["results"]
    message = wire.score_request_pb(SCORE_REQUEST)
    over_http = wire.score_response(pb.ScoreResponse.FromString(post_protobuf(http, "/v1/score", message)))
    over_grpc = wire.score_response(stub.Score(message))
    assert isinstance(over_http, ScoreResponse) and isinstance(over_grpc, ScoreResponse)
    assert len(as_json) == len(over_http.results) == len(over_grpc.results) == 3
    for json_result, http_result, grpc_result in zip(as_json, over_http.results, over_grpc.results):
        assert json_result["prompt_tokens"] == http_result.prompt_tokens == grpc_result.prompt_tokens
        assert http_result.top_ids.dtype == np.int32 and http_result.top_logprobs.dtype == np.float32
        assert http_result.top_ids.shape == (len(json_result["token_ids"]), 6)
        assert_same_distributions(json_result, http_result)
        assert_same_distributions(json_result, grpc_result)


def test_generate_is_the_same_over_every_transport(http, stub):
    as_json = http.post("/v1/generate", json=GENERATE_REQUEST).json()["results"]
    message = wire.generate_request_pb(GENERATE_REQUEST)
    over_http = wire.generate_response(pb.GenerateResponse.FromString(post_protobuf(http, "/v1/generate", message)))
    over_grpc = wire.generate_response(stub.Generate(message))
    assert isinstance(over_http, GenerateResponse) and isinstance(over_grpc, GenerateResponse)
    for json_result, *decoded in zip(as_json, over_http.results, over_grpc.results):
        assert len(json_result["samples"]) == 3
        for result in decoded:
            assert result.prompt_tokens == json_result["prompt_tokens"]
            for json_sample, sample in zip(json_result["samples"], result.samples, strict=True):
                assert (sample.text, sample.finish_reason) == (json_sample["text"], json_sample["finish_reason"])
                assert_same_distributions(json_sample, sample)


# --- health, model info, health and reflection services, metrics ---


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_info_over_http_and_grpc(http, stub, tiny_model_dir):
    info = http.get("/v1/model").json()
    contract = {"model", "backend", "vocab_size", "max_model_len", "max_top_logprobs", "max_samples", "tokenizer_fingerprint"}
    assert contract <= info.keys()
    assert info["model"] == tiny_model_dir and info["backend"] == "hf"
    assert (info["vocab_size"], info["max_model_len"], info["max_samples"], info["max_new_tokens"]) == (384, 256, 8, 64)
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert wire.model_info(stub.GetModelInfo(pb.ModelInfoRequest())).model_dump() == info
    response = http.get("/v1/model", headers={"Accept": PROTOBUF})
    assert wire.model_info(pb.ModelInfo.FromString(response.content)).model_dump() == info


def test_grpc_health_service_is_serving(grpc_channel):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "potstill.v1.Teacher"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_reflection_lists_the_teacher(grpc_channel):
    database = ProtoReflectionDescriptorDatabase(grpc_channel)
    assert "potstill.v1.Teacher" in database.get_services()
    described = database.FindFileContainingSymbol("potstill.v1.Teacher")
    assert {"GetModelInfo", "Score", "Generate"} <= {m.name for m in described.service[0].method}


def read_metrics(http) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed as Prometheus text format: {(name, sorted labels): value}."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests(http, stub):
    def requests(metrics, endpoint, transport, outcome):
        labels = (("endpoint", endpoint), ("outcome", outcome), ("transport", transport))
        return metrics.get(("potstill_requests_total", labels), 0.0)

    before = read_metrics(http)
    body = {"sequences": [{"prompt": [1, 2], "completion": [3, 4, 5]}], "top_logprobs": 1}
    http.post("/v1/score", json=body)
    http.post("/v1/score", json={"sequences": []})
    stub.Score(wire.score_request_pb(body))
    after = read_metrics(http)
    assert requests(after, "/v1/score", "http", "200") == requests(before, "/v1/score", "http", "200") + 1
    assert requests(after, "/v1/score", "http", "400") == requests(before, "/v1/score", "http", "400") + 1
    assert requests(after, "Score", "grpc", "OK") == requests(before, "Score", "grpc", "OK") + 1
    scored = ("potstill_tokens_scored_total", ())
    assert after[scored] == before.get(scored, 0.0) + 6
    assert after[("potstill_queue_depth", ())] == 0


def test_metrics_report_each_forward_pass_rows_and_padded_tokens(http):
    def passes(metrics, kind):
        labels = (("kind", kind),)
        return tuple(
            metrics.get((f"potstill_forward_pass_{what}_{field}", labels), 0.0)
            for what in ("sequences", "tokens") for field in ("count", "sum")
        )

    before = read_metrics(http)
    sequences = [{"prompt": [1, 2], "completion": [3, 4, 5]}, {"prompt": [1], "completion": [3]}]
    assert http.post("/v1/score", json={"sequences": sequences}).status_code == 200
    generate = {"prompts": [[1, 2, 3]], "n": 2, "max_tokens": 2, "temperature": 1.0, "seed": 0}
    assert http.post("/v1/generate", json=generate).status_code == 200
    after = read_metrics(http)
    score_delta = [a - b for a, b in zip(passes(after, "score"), passes(before, "score"))]
    generate_delta = [a - b for a, b in zip(passes(after, "generate"), passes(before, "generate"))]
    assert score_delta == [1, 2, 1, 2 * 5]  # one pass: two rows padded to the longer one's 5 tokens
    assert generate_delta == [1, 2, 1, 2 * 3]  # one decoding loop: a row per sample of the 3-token prompt


@pytest.mark.parametrize("kind", ["score", "generate"])
def test_half_precision_logprobs_travel_in_two_bytes_and_decode_to_float32(http, stub, kind):
    request = {**(SCORE_REQUEST if kind == "score" else GENERATE_REQUEST), "logprobs_dtype": "float16"}
    full = (wire.score_request_pb if kind == "score" else wire.generate_request_pb)({**request, "logprobs_dtype": "float32"})
    half = (wire.score_request_pb if kind == "score" else wire.generate_request_pb)(request)
    call, decode = (stub.Score, wire.score_response) if kind == "score" else (stub.Generate, wire.generate_response)
    answers = {"float32": call(full), "float16": call(half)}

    def distributions(message):
        results = message.results
        return [d for r in results for d in ([r] if kind == "score" else list(r.samples))]

    for exact, rounded in zip(distributions(answers["float32"]), distributions(answers["float16"])):
        assert rounded.top_logprobs.dtype == pb.DTYPE_FLOAT16 and rounded.token_logprobs.dtype == pb.DTYPE_FLOAT16
        assert len(rounded.top_logprobs.data) * 2 == len(exact.top_logprobs.data)
        assert rounded.top_ids.data == exact.top_ids.data  # ids stay int32 and equal
    for exact, rounded in zip(distributions(decode(answers["float32"])), distributions(decode(answers["float16"]))):
        assert rounded.top_logprobs.dtype == np.float32  # consumers get float32 whatever travelled
        np.testing.assert_allclose(rounded.top_logprobs, exact.top_logprobs, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rounded.token_logprobs, exact.token_logprobs, rtol=1e-3, atol=1e-3)
    as_json = http.post(f"/v1/{kind}", json=request).json()["results"]
    expected = decode(answers["float16"]).to_json()["results"]
    assert as_json == expected  # JSON carries the same half-precision values


def test_an_unknown_logprobs_dtype_is_refused_by_field(http, stub):
    answer = http.post("/v1/score", json={**SCORE_REQUEST, "logprobs_dtype": "int8"})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "logprobs_dtype"
    message = wire.score_request_pb(SCORE_REQUEST)
    message.logprobs_dtype = pb.DTYPE_INT32
    with pytest.raises(grpc.RpcError) as raised:
        stub.Score(message)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs_dtype" in raised.value.details()


# --- OpenAI-compatible routes, through the official client ---


@pytest.fixture(scope="module")
def client(teacher) -> openai.OpenAI:
    return openai.OpenAI(base_url=teacher.http_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def texts(tokenizer):
    """The text a token is shown as (special tokens as their own text)."""
    return lambda token_id: {tokenizer.decode([int(token_id)])}


def chosen_first(token: int, token_logprob: float, top_ids: list[int], top_logprobs: list[float]) -> list[tuple[int, float]]:
    """vLLM's listing of a position: the chosen (or prompt) token, then the top k without it."""
    return [(token, token_logprob)] + [(i, lp) for i, lp in zip(top_ids, top_logprobs) if i != token]


def assert_keyed(offered: dict[str, float], entries: list[tuple[int, float]], name) -> None:
    """A legacy top_logprobs entry: {name: log-prob} in the listing's order; ids that decode alike
    share one key, which the first listed of them keeps."""
    expected: dict[str, float] = {}
    for token_id, logprob in entries:
        expected.setdefault(name(token_id), logprob)
    assert list(offered) == list(expected)
    np.testing.assert_allclose(list(offered.values()), list(expected.values()), rtol=0, atol=1e-6)


def score_prompt(http, ids: list[int], k: int) -> dict:
    """/v1/score of a prompt's own tokens, each given those before it."""
    body = {"sequences": [{"prompt": ids[:1], "completion": ids[1:]}], "top_logprobs": k}
    return http.post("/v1/score", json=body).json()["results"][0]


def test_openai_echo_scores_the_prompt_like_score(client, http, tokenizer, texts):
    prompt = "the student learns from the teacher"
    ids = tokenizer(prompt)["input_ids"]
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    choice = completion.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(ids), 0)
    scored = score_prompt(http, ids, 5)
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(logprobs.token_logprobs[1:], scored["token_logprobs"], rtol=0, atol=1e-6)
    rows = zip(ids[1:], scored["token_logprobs"], scored["top_ids"], scored["top_logprobs"], strict=True)
    for offered, row in zip(logprobs.top_logprobs[1:], rows, strict=True):
        assert_keyed(offered, chosen_first(*row), tokenizer.decode)
    assert logprobs.text_offset == np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]]).tolist()


def test_openai_completions_equal_generate(client, http, tokenizer, texts):
    prompt = "hello world"
    completion = client.completions.create(model="tiny", prompt=prompt, n=3, max_tokens=6, logprobs=2, seed=11)
    native = http.post(
        "/v1/generate", json={"prompts": [prompt], "n": 3, "max_tokens": 6, "seed": 11, "top_logprobs": 2}
    ).json()["results"][0]["samples"]
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == sum(len(s["token_ids"]) for s in native)
    for choice, sample in zip(completion.choices, native, strict=True):
        assert (choice.text, choice.finish_reason) == (sample["text"], sample["finish_reason"])
        assert all(token in texts(i) for token, i in zip(choice.logprobs.tokens, sample["token_ids"], strict=True))
        np.testing.assert_allclose(choice.logprobs.token_logprobs, sample["token_logprobs"], rtol=0, atol=1e-6)
        rows = zip(sample["token_ids"], sample["token_logprobs"], sample["top_ids"], sample["top_logprobs"], strict=True)
        for offered, row in zip(choice.logprobs.top_logprobs, rows, strict=True):
            assert_keyed(offered, chosen_first(*row), tokenizer.decode)
    again = client.completions.create(model="tiny", prompt=prompt, n=3, max_tokens=6, logprobs=2, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]


def test_openai_chat_completions_equal_generate(client, http, texts):
    messages = [{"role": "system", "content": "answer with digits"}, {"role": "user", "content": "what is 1+1?"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, n=2, max_tokens=5, logprobs=True, top_logprobs=3, seed=5
    )
    native = http.post(
        "/v1/generate", json={"prompts": [messages], "n": 2, "max_tokens": 5, "seed": 5, "top_logprobs": 3}
    ).json()["results"][0]["samples"]
    assert chat.object == "chat.completion" and len(chat.choices) == 2
    assert chat.usage.completion_tokens == sum(len(s["token_ids"]) for s in native)
    for choice, sample in zip(chat.choices, native, strict=True):
        assert choice.message.role == "assistant" and choice.message.content == sample["text"]
        assert choice.finish_reason == sample["finish_reason"]
        content = choice.logprobs.content
        assert all(entry.token in texts(i) for entry, i in zip(content, sample["token_ids"], strict=True))
        assert all(bytes(entry.bytes) == entry.token.encode() for entry in content)
        np.testing.assert_allclose([e.logprob for e in content], sample["token_logprobs"], rtol=0, atol=1e-6)
        rows = zip(sample["token_ids"], sample["token_logprobs"], sample["top_ids"], sample["top_logprobs"], strict=True)
        for entry, row in zip(content, rows, strict=True):
            listed = chosen_first(*row)[:3]  # vLLM's chat listing: the chosen token first, k entries in all
            assert all(t.token in texts(i) for t, (i, _) in zip(entry.top_logprobs, listed, strict=True))
            np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], [lp for _, lp in listed], rtol=0, atol=1e-6)


def test_vllm_prompt_logprobs(client, http, tokenizer):
    prompt = "what is the sum"
    ids = tokenizer(prompt)["input_ids"]
    completion = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = completion.choices[0].model_extra["prompt_logprobs"]
    scored = score_prompt(http, ids, 2)
    assert len(entries) == len(ids) and entries[0] is None
    rows = zip(ids[1:], scored["token_logprobs"], scored["top_ids"], scored["top_logprobs"], strict=True)
    for entry, rank, row in zip(entries[1:], scored["token_ranks"], rows, strict=True):
        listed = chosen_first(*row)
        assert list(entry) == [str(i) for i, _ in listed]
        np.testing.assert_allclose([e["logprob"] for e in entry.values()], [lp for _, lp in listed], rtol=0, atol=1e-6)
        # The prompt's token first, with its true rank in the vocabulary; then ranks 1..k.
        token = row[0]
        assert entry[str(token)]["rank"] == rank and entry[str(token)]["decoded_token"] == tokenizer.decode([token])
        assert [e["rank"] for i, e in entry.items() if i != str(token)] == [r for r, i in enumerate(row[2], 1) if i != token]
    assert any(rank > 2 for rank in scored["token_ranks"])  # a token outside the top k keeps its rank


def test_vllm_token_id_options(client, http, tokenizer):
    prompt = "hello world"
    ids = tokenizer(prompt)["input_ids"]
    extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    completion = client.completions.create(
        model="tiny", prompt=prompt, n=2, max_tokens=5, echo=True, logprobs=4, seed=9, extra_body=extra
    )
    native = http.post(
        "/v1/generate", json={"prompts": [prompt], "n": 2, "max_tokens": 5, "seed": 9, "top_logprobs": 4}
    ).json()["results"][0]["samples"]
    scored = score_prompt(http, ids, 4)
    for choice, sample in zip(completion.choices, native, strict=True):
        assert choice.model_extra["prompt_token_ids"] == ids
        assert choice.model_extra["token_ids"] == sample["token_ids"]
        logprobs = choice.logprobs
        assert logprobs.tokens == [f"token_id:{i}" for i in ids + sample["token_ids"]]
        # Keyed by id, the listing keeps every entry: nothing collapses.
        prompt_rows = zip(ids[1:], scored["token_logprobs"], scored["top_ids"], scored["top_logprobs"])
        sample_rows = zip(sample["token_ids"], sample["token_logprobs"], sample["top_ids"], sample["top_logprobs"])
        for offered, row in zip(logprobs.top_logprobs[1:], [*prompt_rows, *sample_rows], strict=True):
            assert_keyed(offered, chosen_first(*row), lambda i: f"token_id:{i}")


# --- known defects of the OpenAI layer (src/teacher_service/openai_compat.py); strict: fixing one fails its test ---


def test_prompt_logprobs_and_logprobs_keep_their_own_k(client):
    completion = client.completions.create(
        model="tiny", prompt="what is the sum", max_tokens=0, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}
    )
    choice = completion.choices[0]
    # prompt_logprobs: the prompt token and the top 3; logprobs: the first 2 of that listing (k + 1), as vLLM cuts it.
    prompt_entries = choice.model_extra["prompt_logprobs"][1:]
    assert all(len(entry) in (3, 4) for entry in prompt_entries) and any(len(entry) == 4 for entry in prompt_entries)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])


def test_openai_special_tokens_keep_their_text(client, tokenizer):
    prompt = "<|user|>what is 2+2?<|assistant|>"
    ids = tokenizer(prompt)["input_ids"]
    assert {3, 4} <= set(ids)  # <|user|> and <|assistant|> are single special tokens
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert completion.choices[0].logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert completion.choices[0].text == prompt


def test_openai_top_logprobs_keep_the_most_likely_of_alike_tokens(client, http, tokenizer, texts):
    prompt = "the teacher 12+34=46 because"
    ids = tokenizer(prompt)["input_ids"]
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=20)
    scored = score_prompt(http, ids, 20)
    collisions = 0
    rows = zip(ids[1:], scored["token_logprobs"], scored["top_ids"], scored["top_logprobs"])
    for offered, row in zip(completion.choices[0].logprobs.top_logprobs[1:], rows):
        listed = chosen_first(*row)
        for text, logprob in offered.items():
            alike = [lp for token_id, lp in listed if text in texts(token_id)]
            collisions += len(alike) > 1
            assert logprob == pytest.approx(alike[0], abs=1e-6), text  # the first listed of them
    assert collisions > 0  # a third of this byte-level vocabulary decodes alone to U+FFFD


def test_openai_errors_name_the_field_as_param(client, http):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, logprobs=10_000)
    assert raised.value.param == "logprobs"
    error = http.post("/v1/score", json={"sequences": [], "top_logprobs": 2}).json()["error"]
    assert error["param"] == error["field"] == "sequences" and error["code"] == 400
