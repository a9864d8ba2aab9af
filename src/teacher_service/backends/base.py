"""The small protocol every backend implements.

A backend sees token ids only: the service resolves text and chat prompts with the backend's
tokenizer helpers and checks every limit before a backend is called. Backend calls are
blocking and made from one worker thread at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from teacher_service.protocol import GenerateResult, ScoredSequence


@dataclass(frozen=True)
class BackendConfig:
    model: str  # a local path or a hub id
    device: str = "cpu"
    dtype: str = "float32"  # "float32", "bfloat16", "float16" or "auto"
    max_model_len: int | None = None  # caps the model's own context length
    max_batch_tokens: int = 8192  # prompt + completion tokens per forward pass
    max_logits_elements: int = 2**24  # positions x vocabulary per log-softmax chunk


@dataclass(frozen=True)
class ModelDescription:
    vocab_size: int
    max_model_len: int
    eos_token_id: int  # -1 where the tokenizer has none
    tokenizer_fingerprint: str


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass(frozen=True)
class SamplingParams:
    n: int
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None
    top_logprobs: int


class Backend(Protocol):
    name: str
    description: ModelDescription

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text, with the special tokens the tokenizer adds by default."""

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of a text appended to a prompt: no special tokens added."""

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat turns rendered with the chat template and a generation prompt."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids, special tokens removed unless `skip_special_tokens` is False."""

    def score(self, items: list[ScoreItem], top_logprobs: int, temperature: float) -> list[ScoredSequence]:
        """The distribution at every completion position of every item."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerateResult]:
        """`params.n` samples for each prompt."""
