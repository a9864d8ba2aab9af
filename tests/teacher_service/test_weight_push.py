"""Weight pushes on a real teacher: by path and by stream, over HTTP and gRPC, under load.

Two tiny models of one architecture with different seeds stand for the weights before and after
a push; every scored number is checked against a direct forward pass of the model its result's
`model_version` names, so a result computed with other weights than it claims cannot pass.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from potstill.toy.models import build_tiny_model
from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from potstill.cli import build_parser
from potstill.flags import settings_values
from teacher_service import wire
from teacher_service.config import ENV_PREFIX, ServeOptions
from teacher_service.errors import FIELD_METADATA

from .conftest import PROTOBUF, grpc_target

ADMIN, API = "admin-secret", "api-secret"
SEQUENCE = {"prompt": [5, 17, 42, 9], "completion": [33, 71, 8, 120, 64]}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> str:
    """The teacher's architecture with other weights (seed 1)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1))


@pytest.fixture(scope="module")
def references(tiny_model_dir, other_model_dir) -> dict[str, torch.nn.Module]:
    return {path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in (tiny_model_dir, other_model_dir)}


@pytest.fixture
def admin_teacher(start_teacher):
    with start_teacher(admin_keys=(ADMIN,), api_keys=(API,)) as server:
        yield server


def token_logprobs(model: torch.nn.Module, sequence: dict) -> np.ndarray:
    prompt, completion = sequence["prompt"], sequence["completion"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1)
    return logprobs[torch.arange(len(completion)), torch.tensor(completion)].numpy()


def untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as a save stores them: the output layer tied to the embedding stored once."""
    return {name: tensor.contiguous() for name, tensor in weights.items() if name != "lm_head.weight"}


def safetensors_bytes(model_dir: str) -> bytes:
    return save(untied(AutoModelForCausalLM.from_pretrained(model_dir).state_dict()))


def push_path(teacher, path: str, key: str = ADMIN, **extra) -> httpx.Response:
    return httpx.post(f"{teacher.http_url}/admin/v1/weights", json={"path": path, **extra},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def push_bytes(teacher, data: bytes, version: int | None = None) -> httpx.Response:
    return httpx.post(f"{teacher.http_url}/admin/v1/weights", content=data, params={"model_version": version} if version is not None else None,
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"}, timeout=60)


def grpc_push(teacher, messages: list[pb.LoadWeightsRequest], key: str = ADMIN) -> pb.LoadWeightsResponse:
    with grpc.insecure_channel(grpc_target(teacher)) as channel:
        admin = teacher_pb2_grpc.TeacherAdminStub(channel)
        return admin.LoadWeights(iter(messages), metadata=(("authorization", f"Bearer {key}"),), timeout=60)


def score_json(teacher, sequence: dict = SEQUENCE) -> dict:
    response = httpx.post(f"{teacher.http_url}/v1/score", json={"sequences": [sequence], "top_logprobs": 2},
                          headers={"Authorization": f"Bearer {API}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def model_version(teacher) -> int:
    return httpx.get(f"{teacher.http_url}/v1/model", headers={"Authorization": f"Bearer {API}"}).json()["model_version"]


def test_a_push_by_path_serves_new_weights_as_the_next_version(admin_teacher, tiny_model_dir, other_model_dir, references):
    before = score_json(admin_teacher)
    assert before["model_version"] == 1 and model_version(admin_teacher) == 1
    np.testing.assert_allclose(before["token_logprobs"], token_logprobs(references[tiny_model_dir], SEQUENCE), atol=1e-4)

    answer = push_path(admin_teacher, other_model_dir)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == 2 and answer.json()["tensors"] > 0
    assert model_version(admin_teacher) == 2
    after = score_json(admin_teacher)
    assert after["model_version"] == 2
    np.testing.assert_allclose(after["token_logprobs"], token_logprobs(references[other_model_dir], SEQUENCE), atol=1e-4)
    # The metrics count the push and show the version served.
    exposition = httpx.get(f"{admin_teacher.http_url}/metrics").text
    assert 'potstill_weight_pushes_total{outcome="loaded"} 1.0' in exposition
    assert "potstill_model_version 2.0" in exposition


def test_every_transport_and_result_kind_carries_the_version(admin_teacher, other_model_dir):
    assert push_path(admin_teacher, other_model_dir, model_version=41).json()["model_version"] == 41
    auth = {"Authorization": f"Bearer {API}"}
    request = {"sequences": [SEQUENCE]}
    protobuf = httpx.post(f"{admin_teacher.http_url}/v1/score", content=wire.score_request_pb(request).SerializeToString(),
                          headers={**auth, "Content-Type": PROTOBUF, "Accept": PROTOBUF})
    assert pb.ScoreResponse.FromString(protobuf.content).results[0].model_version == 41
    generated = httpx.post(f"{admin_teacher.http_url}/v1/generate", json={"prompts": [[5, 6]], "n": 2, "max_tokens": 3}, headers=auth)
    assert generated.json()["results"][0]["model_version"] == 41
    with grpc.insecure_channel(grpc_target(admin_teacher)) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        metadata = (("authorization", f"Bearer {API}"),)
        assert stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata).model_version == 41
        assert stub.Score(wire.score_request_pb(request), metadata=metadata).results[0].model_version == 41
        sampled = stub.Generate(wire.generate_request_pb({"prompts": [[5, 6]], "max_tokens": 3}), metadata=metadata)
        assert sampled.results[0].model_version == 41


def test_streamed_pushes_over_http_and_grpc(admin_teacher, tiny_model_dir, other_model_dir, references):
    data = safetensors_bytes(other_model_dir)
    answer = push_bytes(admin_teacher, data, version=7)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == 7
    np.testing.assert_allclose(score_json(admin_teacher)["token_logprobs"], token_logprobs(references[other_model_dir], SEQUENCE), atol=1e-4)

    original = safetensors_bytes(tiny_model_dir)
    chunks = [original[start : start + 100_000] for start in range(0, len(original), 100_000)]
    loaded = grpc_push(admin_teacher, [pb.LoadWeightsRequest(safetensors_chunk=chunk) for chunk in chunks])
    assert loaded.model_version == 8 and len(chunks) > 1
    result = score_json(admin_teacher)
    assert result["model_version"] == 8
    np.testing.assert_allclose(result["token_logprobs"], token_logprobs(references[tiny_model_dir], SEQUENCE), atol=1e-4)

    assert grpc_push(admin_teacher, [pb.LoadWeightsRequest(path=other_model_dir)]).model_version == 9


def test_pushes_that_do_not_fit_are_refused_by_field_and_change_nothing(admin_teacher, tmp_path, tiny_model_dir, references):
    narrower = str(build_tiny_model(tmp_path / "narrow", hidden_size=32))
    refused = push_path(admin_teacher, narrower)
    assert refused.status_code == 400
    assert refused.json()["error"]["field"].startswith("weights.model.")
    assert "does not match the served model's" in refused.json()["error"]["message"]

    weights = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    bigger_vocabulary = {**weights, "model.embed_tokens.weight": torch.zeros(weights["model.embed_tokens.weight"].shape[0] + 8, 64)}
    refused = push_bytes(admin_teacher, save(untied(bigger_vocabulary)))
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "weights.model.embed_tokens.weight"
    assert "vocabulary" in refused.json()["error"]["message"]

    cases = {
        "weights.extra.weight": save({"extra.weight": torch.zeros(2)}),
        "weights": save({"model.norm.weight": weights["model.norm.weight"]}),  # most parameters missing
        "weights.model.norm.weight": save(untied({**weights, "model.norm.weight": torch.full((64,), float("nan"))})),
        "body": b"not a safetensors file",
    }
    for field, data in cases.items():
        refused = push_bytes(admin_teacher, data)
        assert (refused.status_code, refused.json()["error"]["field"]) == (400, field), refused.text
    assert push_path(admin_teacher, str(tmp_path / "absent")).json()["error"]["field"] == "path"
    assert push_bytes(admin_teacher, b"", version=0).json()["error"]["field"] == "model_version"

    with pytest.raises(grpc.RpcError) as refusal:
        grpc_push(admin_teacher, [pb.LoadWeightsRequest(path=narrower)])
    assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refusal.value.trailing_metadata())[FIELD_METADATA].startswith("weights.model.")
    with pytest.raises(grpc.RpcError) as refusal:
        grpc_push(admin_teacher, [pb.LoadWeightsRequest()])
    assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert model_version(admin_teacher) == 1
    np.testing.assert_allclose(score_json(admin_teacher)["token_logprobs"], token_logprobs(references[tiny_model_dir], SEQUENCE), atol=1e-4)


def test_only_the_admin_key_may_push(admin_teacher, start_teacher, other_model_dir):
    for key in ("wrong", API):  # an API key is not an admin key
        assert push_path(admin_teacher, other_model_dir, key=key).status_code == 401
        with pytest.raises(grpc.RpcError) as refusal:
            grpc_push(admin_teacher, [pb.LoadWeightsRequest(path=other_model_dir)], key=key)
        assert refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with start_teacher() as no_admin:
        refused = push_path(no_admin, other_model_dir)
        assert refused.status_code == 403 and "--admin-key-file" in refused.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as refusal:
            grpc_push(no_admin, [pb.LoadWeightsRequest(path=other_model_dir)])
        assert refusal.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert model_version(admin_teacher) == 1


def test_a_push_under_load_fails_no_request_and_every_result_names_its_weights(
    admin_teacher, tiny_model_dir, other_model_dir, references
):
    """Callers score without pause over HTTP and gRPC while the weights flip between the two
    models; each result must match the model its version was pushed with."""
    sequences = [{"prompt": [5 + i, 17, 42], "completion": [33 + i, 71, 8, 120]} for i in range(6)]
    served = {1: tiny_model_dir}
    stop = threading.Event()

    def caller(index: int) -> list[tuple[int, dict, list[float]]]:
        sequence, seen = sequences[index], []
        with grpc.insecure_channel(grpc_target(admin_teacher)) as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            while not stop.is_set() or not seen:
                if index % 2:
                    result = score_json(admin_teacher, sequence)
                    seen.append((result["model_version"], sequence, result["token_logprobs"]))
                else:
                    answer = stub.Score(wire.score_request_pb({"sequences": [sequence]}), metadata=(("authorization", f"Bearer {API}"),))
                    result = wire.score_response(answer).results[0]
                    seen.append((result.model_version, sequence, result.token_logprobs.tolist()))
        return seen

    with ThreadPoolExecutor(len(sequences)) as pool:
        callers = [pool.submit(caller, index) for index in range(len(sequences))]
        for version in range(2, 8):
            model_dir = other_model_dir if version % 2 == 0 else tiny_model_dir
            answer = push_path(admin_teacher, model_dir)
            assert answer.json()["model_version"] == version
            served[version] = model_dir
        stop.set()
        results = [entry for future in callers for entry in future.result()]  # a failed request raises here

    assert len({version for version, _, _ in results}) >= 2  # the load did span pushes
    for version, sequence, logprobs in results:
        np.testing.assert_allclose(logprobs, token_logprobs(references[served[version]], sequence), atol=1e-4)


def test_admin_keys_come_from_their_own_file_or_variable_and_never_double_as_api_keys(tiny_model_dir, tmp_path):
    key_file = tmp_path / "admin.keys"
    key_file.write_text("# pushers\nfile-admin\n")
    args = build_parser(["serve"]).parse_args(["serve", "--model", tiny_model_dir, "--admin-key-file", str(key_file)])
    values = settings_values(args, ServeOptions, None, ENV_PREFIX, environ={"POTSTILL_ADMIN_KEYS": "env-admin"})
    assert ServeOptions(**values).with_api_keys().admin_keys == ("env-admin", "file-admin")
    with pytest.raises(ValueError, match="also an API key"):
        ServeOptions(model=tiny_model_dir, api_keys=("same",), admin_keys=("same",))
    with pytest.raises(ValueError, match="empty"):
        ServeOptions(model=tiny_model_dir, admin_keys=" ")
