"""Request and response types of the teacher service, for every transport.

Requests are pydantic models: the constraints live in the schema, unknown fields are refused
(`extra="forbid"`) and types are strict (a string is not a number). Limits that depend on the
served model (its vocabulary, the configured maximum k) are read from the validation context,
so HTTP JSON, HTTP protobuf and gRPC share one validation path: `parse(RequestType, data, limits)`.

Responses are dataclasses over numpy arrays: a trainer asking for protobuf never pays for Python
lists, and `to_json()` builds the readable form only when a person asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, TypeVar, Union

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from teacher_service.errors import from_validation_error
from teacher_service.media import ContentPart


# A text longer than this many characters per context token cannot fit the context in practice.
CHARS_PER_TOKEN_BOUND = 32
# Far below this, logits / temperature overflow float32 and the log-probs turn to NaN. About 1.5e-5
# (vLLM's epsilon is 1e-5); a power of two, so the float32 field of protobuf requests holds it exactly.
MIN_TEMPERATURE = 2.0**-16


@dataclass(frozen=True)
class Limits:
    """What one teacher accepts; `vocab_size` and `max_model_len` come from the loaded model."""

    vocab_size: int
    max_model_len: int
    max_top_logprobs: int = 20
    max_samples: int = 16
    max_new_tokens: int = 512
    max_batch: int = 256
    max_prompt_chars: int | None = None  # none: CHARS_PER_TOKEN_BOUND x max_model_len

    @property
    def prompt_chars(self) -> int:
        """The most characters a text may have: checked before tokenising, so a huge text never
        reaches the tokenizer (it would hold the CPU and the memory for minutes)."""
        return self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.max_model_len


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _limits(info: ValidationInfo) -> Limits:
    return info.context["limits"]


def _within_vocabulary(ids: list[int], info: ValidationInfo) -> list[int]:
    vocab_size = _limits(info).vocab_size
    if max(ids) >= vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the vocabulary (size {vocab_size})")
    return ids


def _short_enough(text: str, info: ValidationInfo) -> str:
    limit = _limits(info).prompt_chars
    if len(text) > limit:
        raise ValueError(f"{len(text)} characters exceed this teacher's limit of {limit} (max_prompt_chars)")
    return text


def _text_of(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content if part.type == "text")


def _chat_short_enough(messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
    _short_enough("".join(_text_of(message.content) for message in messages), info)
    return messages


def _zero_or_at_least_minimum(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return temperature


def _not_streamed(stream: bool) -> bool:
    if stream:
        raise ValueError("streaming is not supported; send false or leave it out")
    return stream


TokenIdList = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_within_vocabulary)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_short_enough)]
# Sampling: 0 decodes greedily; between 0 and MIN_TEMPERATURE the arithmetic would not hold.
SamplingTemperature = Annotated[float, Field(ge=0, le=100), AfterValidator(_zero_or_at_least_minimum)]
# Strictly a boolean (1 or "false" are refused), and only false: answers are never streamed.
NoStream = Annotated[bool, AfterValidator(_not_streamed)]


def _content_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "parts" if isinstance(value, list) else None


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    # Text, or content parts: text, images and videos (`teacher_service.media`).
    content: Annotated[
        Union[Annotated[str, Tag("text")], Annotated[list[ContentPart], Field(min_length=1), Tag("parts")]],
        Discriminator(_content_kind, custom_error_type="invalid_form", custom_error_message="must be text or a list of content parts"),
    ]


ChatPrompt = Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_chat_short_enough)]


def _input_kind(value: Any) -> str | None:
    """Which form a prompt takes, so a bad one is reported against that form only."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return "chat" if isinstance(first, dict | ChatMessage) else "token_ids"
    return None


def _one_of(*forms: tuple[str, Any]) -> Any:
    names = " or ".join(tag for tag, _ in forms)
    return Annotated[
        Union[tuple(Annotated[kind, Tag(tag)] for tag, kind in forms)],
        Discriminator(_input_kind, custom_error_type="invalid_form", custom_error_message=f"must be {names}"),
    ]


INPUT_FORMS = ("text", "token_ids", "chat", "parts")
# A prompt: raw text, token ids, or chat turns rendered with the model's chat template.
Prompt = _one_of(("text", NonEmptyText), ("token_ids", TokenIdList), ("chat", ChatPrompt))
# A completion to score: raw text or token ids.
Completion = _one_of(("text", NonEmptyText), ("token_ids", TokenIdList))


def _at_most(limit_name: str):
    """A field validator refusing values above the named `Limits` attribute."""

    def check(value: int | None, info: ValidationInfo) -> int | None:
        limit = getattr(_limits(info), limit_name)
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit} ({limit_name} of this teacher)")
        return value

    return check


def _check_batch(items: list, info: ValidationInfo) -> list:
    limit = _limits(info).max_batch
    if len(items) > limit:
        raise ValueError(f"at most {limit} items per request")
    return items


class ScoreSequence(StrictModel):
    prompt: Prompt = Field(description="Context the teacher conditions on (may differ from the student's).")
    completion: Completion = Field(description="Tokens whose distributions are returned.")



LogprobsDType = Literal["float32", "float16"]
LOGPROBS_DTYPE_HELP = "Precision of the returned log-probs: float16 halves their bytes on the protobuf wire (~3 significant digits)."


SHARED_MEDIA_HELP = ("Images and animations the request's prompts share, each a data: (or allowed file:) URL; "
                     "a content part names entry i as the URL media:i, so a picture travels and decodes once per request.")


class ScoreRequest(StrictModel):
    sequences: list[ScoreSequence] = Field(min_length=1, description="Sequences scored independently.")
    media: list[Annotated[str, Field(min_length=1)]] = Field([], description=SHARED_MEDIA_HELP)
    top_logprobs: int = Field(0, ge=0, description="k: most likely tokens returned per position.")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=100, description="Softmax temperature on the logits.")
    logprobs_dtype: LogprobsDType = Field("float32", description=LOGPROBS_DTYPE_HELP)

    _k_limit = field_validator("top_logprobs")(_at_most("max_top_logprobs"))
    _batch_limit = field_validator("sequences")(_check_batch)


class GenerateRequest(StrictModel):
    prompts: list[Prompt] = Field(min_length=1)
    media: list[Annotated[str, Field(min_length=1)]] = Field([], description=SHARED_MEDIA_HELP)
    n: int = Field(1, ge=1, description="Samples per prompt.")
    max_tokens: int = Field(16, ge=1, description="Most tokens generated per sample.")
    temperature: SamplingTemperature = Field(1.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Makes the samples reproducible.")
    top_logprobs: int = Field(0, ge=0)
    logprobs_dtype: LogprobsDType = Field("float32", description=LOGPROBS_DTYPE_HELP)

    _n_limit = field_validator("n")(_at_most("max_samples"))
    _tokens_limit = field_validator("max_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("top_logprobs")(_at_most("max_top_logprobs"))
    _batch_limit = field_validator("prompts")(_check_batch)


# --- OpenAI-compatible requests (the fields the official client sends; others are refused) ---


class CompletionRequest(StrictModel):
    model: str | None = None
    prompt: _one_of(("text", NonEmptyText), ("token_ids", TokenIdList))
    max_tokens: int = Field(16, ge=0)
    temperature: SamplingTemperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0, description="Top-k log-probs per token (OpenAI: at most 5; here up to max_top_logprobs).")
    echo: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: NoStream = False
    prompt_logprobs: int | None = Field(None, ge=0, description="vLLM extension: top-k log-probs at each prompt position.")
    return_token_ids: bool = Field(False, description="vLLM extension: choices[].token_ids and prompt_token_ids in the answer.")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extension: logprobs tokens written 'token_id:N'.")
    user: str | None = None

    _n_limit = field_validator("n")(_at_most("max_samples"))
    _tokens_limit = field_validator("max_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("logprobs", "prompt_logprobs")(_at_most("max_top_logprobs"))


class ChatCompletionRequest(StrictModel):
    model: str | None = None
    messages: ChatPrompt
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: SamplingTemperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: NoStream = False
    user: str | None = None

    _n_limit = field_validator("n")(_at_most("max_samples"))
    _tokens_limit = field_validator("max_tokens", "max_completion_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("top_logprobs")(_at_most("max_top_logprobs"))


# --- administration ---


class WeightsVersion(StrictModel):
    """The version a weight push is served as (streamed bytes carry it as a query parameter)."""

    model_version: int | None = Field(None, ge=1, lt=2**63, description="Version to serve the weights as (none: the current + 1).")


class LoadWeightsRequest(WeightsVersion):
    """A weight push by path (a JSON body)."""

    path: str = Field(min_length=1, description="On the teacher's machine: a safetensors file, or a directory with "
                      "model.safetensors or the shards of model.safetensors.index.json (a Hugging Face save).")


RequestT = TypeVar("RequestT", bound=StrictModel)


def parse(request_type: type[RequestT], data: Any, limits: Limits) -> RequestT:
    """Validate plain data (decoded JSON or converted protobuf) into a request, or raise InvalidRequest."""
    try:
        return request_type.model_validate(data, context={"limits": limits})
    except ValidationError as error:
        raise from_validation_error(error) from None


# --- Responses ---


class ModelInfo(BaseModel):
    model: str
    backend: str
    vocab_size: int
    max_model_len: int
    max_top_logprobs: int
    max_samples: int
    max_new_tokens: int
    tokenizer_fingerprint: str
    eos_token_id: int
    max_batch: int
    model_version: int = 0  # 0: unknown (a server that does not version its weights)
    accepts_media: bool = False  # prompts may hold images
    accepts_video: bool = False  # and videos
    # Media limits (0 where unknown): per request, shared pictures counted once; per video; per image or frame.
    max_images: int = 0
    max_videos: int = 0
    max_video_frames: int = 0
    max_image_pixels: int = 0


@dataclass(frozen=True)
class TokenDistributions:
    """The teacher's distribution along L tokens, restricted to its top k at each position."""

    token_ids: np.ndarray  # int32 [L]
    token_logprobs: np.ndarray  # float32 [L]
    top_ids: np.ndarray  # int32 [L, k], most likely first
    top_logprobs: np.ndarray  # float32 [L, k], descending

    def with_logprobs_dtype(self, dtype: str) -> TokenDistributions:
        """The same distributions with their log-probs stored as `dtype` (ids untouched)."""
        return replace(self, token_logprobs=self.token_logprobs.astype(dtype, copy=False),
                       top_logprobs=self.top_logprobs.astype(dtype, copy=False))

    def to_json(self) -> dict:
        return {
            "token_ids": self.token_ids.tolist(),
            "token_logprobs": self.token_logprobs.tolist(),
            "top_ids": self.top_ids.tolist(),
            "top_logprobs": self.top_logprobs.tolist(),
        }


@dataclass(frozen=True)
class ScoredSequence(TokenDistributions):
    prompt_tokens: int = 0
    model_version: int = 0  # of the weights that computed it; 0 where the server does not say

    def to_json(self) -> dict:
        return {**super().to_json(), "prompt_tokens": self.prompt_tokens, "model_version": self.model_version}


@dataclass(frozen=True)
class Sample(TokenDistributions):
    text: str = ""
    finish_reason: Literal["stop", "length"] = "length"

    def to_json(self) -> dict:
        return {"text": self.text, **super().to_json(), "finish_reason": self.finish_reason}


@dataclass(frozen=True)
class GenerateResult:
    samples: list[Sample]
    prompt_tokens: int
    model_version: int = 0  # of the weights that sampled them; 0 where the server does not say

    def to_json(self) -> dict:
        return {"samples": [s.to_json() for s in self.samples], "prompt_tokens": self.prompt_tokens,
                "model_version": self.model_version}


@dataclass(frozen=True)
class WeightsLoaded:
    model_version: int  # now served
    tensors: int
    seconds: float  # after the upload: reading, checking, waiting for requests in flight, swapping

    def to_json(self) -> dict:
        return {"model_version": self.model_version, "tensors": self.tensors, "seconds": self.seconds}


@dataclass(frozen=True)
class ScoreResponse:
    results: list[ScoredSequence] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"results": [r.to_json() for r in self.results]}


@dataclass(frozen=True)
class GenerateResponse:
    results: list[GenerateResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"results": [r.to_json() for r in self.results]}
