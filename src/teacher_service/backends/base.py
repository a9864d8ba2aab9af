"""The small protocol every backend implements.

A backend sees token ids (and, for a vision model, the decoded pictures of a prompt): the service
resolves text and chat prompts with the backend's tokenizer helpers and checks every limit before
a backend is called. `score` and `generate` are
coroutines and every item carries its own settings (k, temperature, sampling), so a backend owns
its scheduling: the HF backend gathers concurrent requests' items into shared forward passes on
its own worker thread (`teacher_service.batching`), an engine such as vLLM schedules them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from teacher_service.media import PromptMedia
from teacher_service.protocol import GenerateResult, ScoredSequence

# What a sampled token's log-probs describe: the model's own distribution ("raw", as vLLM's
# default `logprobs_mode`) or the one sampled from, after temperature and top-p ("processed").
LogprobsMode = Literal["raw", "processed"]

# Told of each forward pass a backend runs: its kind ("score" or "generate"), its rows and its
# padded tokens (rows x width; a generate pass counts its prompt width).
PassObserver = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BackendConfig:
    model: str  # a local path or a hub id
    device: str = "cpu"
    dtype: str = "float32"  # "float32", "bfloat16", "float16" or "auto"
    max_model_len: int | None = None  # caps the model's own context length
    max_batch_tokens: int = 8192  # prompt + completion tokens per forward pass
    max_logits_elements: int = 2**24  # positions x vocabulary per log-softmax chunk
    batch_window_ms: float = 2.0  # how long the first waiting item waits for others to share its pass
    logprobs_mode: LogprobsMode = "raw"
    max_top_logprobs: int = 20  # the most top-k a request may ask (an engine that caps it is raised to this)
    gpu_memory_utilization: float = 0.9  # vllm: share of GPU memory the engine may take
    tensor_parallel_size: int = 1  # vllm: GPUs one model is split over


@dataclass(frozen=True)
class ModelDescription:
    vocab_size: int
    max_model_len: int
    eos_token_id: int  # -1 where the tokenizer has none
    tokenizer_fingerprint: str
    accepts_media: bool = False  # a vision model: prompts may hold images
    accepts_video: bool = False  # and videos (its processor has a video processor)


@dataclass(frozen=True)
class PromptInput:
    """A resolved prompt: its token ids (placeholders expanded) and its pictures, if any."""

    ids: list[int]
    media: PromptMedia | None = None


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    completion_ids: list[int]
    top_logprobs: int = 0
    temperature: float = 1.0
    media: PromptMedia | None = None  # the prompt's pictures (prompt_ids hold their expanded placeholders)


@dataclass(frozen=True)
class SamplingParams:
    """One prompt's sampling, with vLLM's meanings (see `protocol.SamplingSettings`)."""

    n: int
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None  # sample j of a prompt draws from a generator seeded with (seed, j)
    top_logprobs: int
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class ChatTemplateOptions:
    add_generation_prompt: bool = True  # the template's cue for the assistant's turn
    continue_final_message: bool = False  # the last turn left open, to be continued
    add_special_tokens: bool = False  # the tokenizer's own special tokens on top of the template's


@dataclass(frozen=True)
class GenerateItem:
    prompt_ids: list[int]
    params: SamplingParams
    media: PromptMedia | None = None


class Backend(Protocol):
    name: str
    description: ModelDescription
    model_version: int  # of the weights now served: 1 as loaded, then as each `load_weights` sets it

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text, with the special tokens the tokenizer adds by default."""

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of a text appended to a prompt: no special tokens added."""

    def encode_chat(self, messages: list[dict[str, Any]], template: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
        """Token ids of chat turns rendered with the chat template as `template` says."""

    def encode_chat_media(self, messages: list[dict[str, Any]], media: PromptMedia) -> tuple[list[int], PromptMedia]:
        """Token ids of chat turns holding pictures (`{"type": "image"}` / `{"type": "video"}` parts,
        in the order of `media`), and the media as the backend will take them; `InvalidRequest`
        where the model takes no pictures."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids, special tokens removed unless `skip_special_tokens` is False."""

    async def score(self, items: list[ScoreItem]) -> list[ScoredSequence]:
        """The distribution at every completion position of every item, under its own k and temperature."""

    async def generate(self, items: list[GenerateItem]) -> list[GenerateResult]:
        """`item.params.n` samples for each item's prompt."""

    def check_weights(self, tensors: dict[str, Any]) -> None:
        """Raise `InvalidRequest` naming the first tensor (`weights.<name>`) that does not fit the served model."""

    async def load_weights(self, tensors: dict[str, Any], model_version: int) -> None:
        """Serve `tensors` (checked) as `model_version` from the next pass on; results carry the
        version of the weights that computed them."""

    def observe_passes(self, observer: PassObserver) -> None:
        """Report every forward pass from now on to `observer` (an engine that batches out of sight
        may report none)."""

    def abandon_waiting(self, error: Exception) -> None:
        """Fail every call not yet answered with `error`, including those on the model now (their
        results are dropped), so that a shutdown ends within its grace period."""

    def close(self) -> None:
        """Stop the backend's workers, without waiting for a pass whose calls were abandoned."""
