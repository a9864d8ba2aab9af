"""Fixtures of the teacher service tests: clients of the shared `teacher`, a reference model, extra servers.

The reference is the same saved model loaded straight through transformers in this process, so
every number the service returns can be checked against a plain forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import grpc
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.v1 import teacher_pb2_grpc
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher

PROTOBUF = "application/x-protobuf"


def grpc_target(teacher: BackgroundTeacher) -> str:
    """host:port of a teacher's gRPC server, as grpc channels take it."""
    return teacher.grpc_url.removeprefix("grpc://")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def eos_id(tokenizer) -> int:
    return tokenizer.eos_token_id


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    """The teacher's model, loaded directly with transformers (fp32, eval mode)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference_logprobs(reference_model) -> Callable[..., np.ndarray]:
    """log_softmax(logits / T) of a direct forward at the completion positions: float64 [L, V]."""

    @torch.inference_mode()
    def compute(prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> np.ndarray:
        input_ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
        logits = reference_model(input_ids=input_ids).logits[0].double()  # [P + L, V]
        # The logits at position t predict token t + 1.
        window = logits[len(prompt_ids) - 1 : len(prompt_ids) + len(completion_ids) - 1]
        return torch.log_softmax(window / temperature, dim=-1).numpy()

    return compute


@pytest.fixture(scope="session")
def http(teacher) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=teacher.http_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def grpc_channel(teacher) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_target(teacher)) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(grpc_channel) -> teacher_pb2_grpc.TeacherStub:
    return teacher_pb2_grpc.TeacherStub(grpc_channel)


@pytest.fixture(scope="session")
def start_teacher(tiny_model_dir) -> Callable[..., contextlib.AbstractContextManager[BackgroundTeacher]]:
    """Another teacher of the tiny model on free loopback ports, with some `ServeOptions` changed."""

    def start(**overrides) -> contextlib.AbstractContextManager[BackgroundTeacher]:
        options = {"model": tiny_model_dir, "http_port": 0, "grpc_port": 0, "max_new_tokens": 64, "max_samples": 8}
        return BackgroundTeacher(ServeOptions(**{**options, **overrides}))

    return start
