"""Backends compute what the service returns; each is picked by name from `BACKENDS`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from potstill.usage import UsageError
from teacher_service.backends.base import Backend, BackendConfig


def _load_hf(config: BackendConfig) -> Backend:
    from teacher_service.backends.hf import HFBackend

    return HFBackend.load(config)


def _load_vllm(config: BackendConfig) -> Backend:
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--backend vllm needs vLLM: pip install 'potstill[serve,vllm]' on a machine with a CUDA GPU")
    from teacher_service.backends.vllm import VLLMBackend

    return VLLMBackend.load(config)


# Loaders import their backend lazily, so a node without a backend's packages can still run the others.
BACKENDS: dict[str, Callable[[BackendConfig], Backend]] = {"hf": _load_hf, "vllm": _load_vllm}


def load_backend(name: str, config: BackendConfig) -> Backend:
    try:
        loader = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    return loader(config)
