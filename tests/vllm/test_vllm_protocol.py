"""The OpenAI-compatible answers validate as vLLM 0.32.0's own response models (its pydantic
protocol classes import without a GPU), for every request of tests/teacher_service/openai_requests."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("vllm")
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionStreamResponse  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionStreamResponse  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import ModelList  # noqa: E402

from potstill.toy.models import build_tiny_model  # noqa: E402
from teacher_service.config import ServeOptions  # noqa: E402
from teacher_service.testing import BackgroundTeacher  # noqa: E402
from tests.teacher_service.openai_requests import REQUESTS, send  # noqa: E402

VLLM_TYPES = {"completion": CompletionResponse, "chat": ChatCompletionResponse,
              "completion-stream": CompletionStreamResponse, "chat-stream": ChatCompletionStreamResponse}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_new_tokens=64, max_samples=8)
    with BackgroundTeacher(options) as teacher, httpx.Client(base_url=teacher.http_url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("kind", "path", "body"), REQUESTS, ids=[f"{i}-{kind}" for i, (kind, _, _) in enumerate(REQUESTS)])
def test_every_answer_validates_as_vllms_response_models(http, kind, path, body):
    answer = send(http, path, body)
    for item in answer if isinstance(answer, list) else [answer]:
        VLLM_TYPES[kind].model_validate(item)


def test_the_model_list_validates_as_vllms(http):
    listed = ModelList.model_validate(http.get("/v1/models").json())
    assert listed.data[0].max_model_len == http.get("/v1/model").json()["max_model_len"]
