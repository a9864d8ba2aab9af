"""The vLLM engine behind the real servers (GPU machines with the `vllm` extra only).

The same tiny model is served by the vllm and the hf backend; over HTTP, vLLM's scores must
match the transformers forward pass within bf16/fp32 kernel differences, and a temperature other
than 1 is refused naming the field. Not run where this project's CI runs (no GPU, no vLLM wheel).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("vllm")

from teacher_service.config import ServeOptions  # noqa: E402
from teacher_service.testing import BackgroundTeacher  # noqa: E402

pytestmark = pytest.mark.gpu
SCORE = {"sequences": [{"prompt": [5, 6, 7], "completion": [8, 9, 10]}], "top_logprobs": 4}


def _scores(backend: str, model: str, body: dict) -> httpx.Response:
    options = ServeOptions(model=model, backend=backend, device="cuda",
                           http_port=0, grpc_port=0, gpu_memory_utilization=0.3)
    with BackgroundTeacher(options) as teacher:
        return httpx.post(f"{teacher.http_url}/v1/score", json=body, timeout=300)


def test_vllm_scores_match_the_hf_backend(tiny_model_dir):
    ours, theirs = _scores("vllm", tiny_model_dir, SCORE).json()["results"][0], _scores("hf", tiny_model_dir, SCORE).json()["results"][0]
    assert ours["top_ids"] == theirs["top_ids"]
    np.testing.assert_allclose(ours["top_logprobs"], theirs["top_logprobs"], atol=2e-3)
    np.testing.assert_allclose(ours["token_logprobs"], theirs["token_logprobs"], atol=2e-3)


def test_vllm_refuses_scoring_at_another_temperature(tiny_model_dir):
    answer = _scores("vllm", tiny_model_dir, {**SCORE, "temperature": 0.5})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "temperature"
