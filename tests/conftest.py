"""Shared fixtures: tiny models built on the spot and real teacher servers on loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher

# Two cores on CI: one for the servers' model, one for the test's own work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny Llama with the project's tokenizer, saved in HF format."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-teacher", seed=0))


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory) -> Path:
    """One toy-model cache for the session: the shortened demo and benchmark build their teacher once."""
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def teacher(tiny_model_dir):
    """One teacher service (HTTP and gRPC on free loopback ports) for the whole session."""
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, max_new_tokens=64, max_samples=8)
    with BackgroundTeacher(options) as running:
        yield running
