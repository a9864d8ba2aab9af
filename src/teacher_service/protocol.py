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
    model_validator,
)

from teacher_service.errors import InvalidRequest, from_validation_error
from teacher_service.media import ContentPart


# A text longer than this many characters per context token cannot fit the context in practice.
CHARS_PER_TOKEN_BOUND = 32
# Far below this, logits / temperature overflow float32 and the log-probs turn to NaN. About 1.5e-5
# (vLLM's epsilon is 1e-5); a power of two, so the float32 field of protobuf requests holds it exactly.
MIN_TEMPERATURE = 2.0**-16
# Each stop string is looked for in every sample's text after every step: their number and length are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


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


# Marks a union member's tag in validation errors' locations, where it names no field the caller sent.
FORM_TAG = "form:"


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


def _chat_short_enough(messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
    _short_enough("".join(message.text for message in messages), info)
    return messages


def _zero_or_at_least_minimum(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return temperature


TokenIdList = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_within_vocabulary)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_short_enough)]
# Sampling: 0 decodes greedily; between 0 and MIN_TEMPERATURE the arithmetic would not hold.
SamplingTemperature = Annotated[float, Field(ge=0, le=100), AfterValidator(_zero_or_at_least_minimum)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


def _content_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "parts" if isinstance(value, list) else None


# Text, or content parts: text, images and videos (`teacher_service.media`).
ChatContent = Annotated[
    Union[
        Annotated[str, Tag(FORM_TAG + "text")],
        Annotated[list[ContentPart], Field(min_length=1), Tag(FORM_TAG + "parts")],
    ],
    Discriminator(lambda value: FORM_TAG + form if (form := _content_kind(value)) else None,
                  custom_error_type="invalid_form", custom_error_message="must be text or a list of content parts"),
]


class ChatMessage(StrictModel):
    """One chat turn. Content may be text or OpenAI content parts; the roles and fields are those
    chat templates read (a `tool` turn answers the assistant's `tool_calls` by `tool_call_id`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: ChatContent | None  # null: an assistant turn made of tool calls
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The turn's text: text parts joined by newlines, as vLLM joins them for a template."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content if part.type == "text")
        return self.content or ""

    @property
    def parts(self) -> list[ContentPart]:
        return self.content if isinstance(self.content, list) else []

    def template_fields(self) -> dict[str, Any]:
        """What a chat template reads of the turn besides its content (unset fields left out)."""
        return self.model_dump(exclude_none=True, exclude={"content"})


ChatPrompt = Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_chat_short_enough)]


def _input_kind(value: Any) -> str | None:
    """Which form a prompt takes, so a bad one is reported against that form only."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return "chat" if isinstance(first, dict | ChatMessage) else "token_ids"
    return None


def _completion_prompt_kind(value: Any) -> str | None:
    """Which form an OpenAI completion prompt takes: one text or token list, or a batch of either."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        return "texts" if isinstance(value[0], str) else "token_id_lists"
    return _input_kind(value)


def _one_of(*forms: tuple[str, Any], kind=_input_kind) -> Any:
    """A union of named forms, told apart by `kind(value)` (a form's name)."""
    names = " or ".join(name for name, _ in forms)
    return Annotated[
        Union[tuple(Annotated[form, Tag(FORM_TAG + name)] for name, form in forms)],
        Discriminator(lambda value: FORM_TAG + form if (form := kind(value)) else None,
                      custom_error_type="invalid_form", custom_error_message=f"must be {names}"),
    ]
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


def _stop_ids_in_vocabulary(ids: list[int], info: ValidationInfo) -> list[int]:
    return _within_vocabulary(ids, info) if ids else ids


class SamplingSettings(StrictModel):
    """What shapes a sample besides temperature and top-p, with vLLM's meanings (`SamplingParams`).

    Penalties act on the logits before temperature: presence and frequency on the tokens sampled
    so far (`logit - frequency x count - presence x [count > 0]`), repetition on those of the prompt
    and the sample (a positive logit divided by it, a negative one multiplied). Then top-k, min-p
    and top-p restrict what is drawn from.
    """

    temperature: SamplingTemperature = Field(1.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0, le=1, description="Draw from the smallest set of most likely tokens holding this mass.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Makes the samples reproducible.")
    top_k: int = Field(0, ge=-1, description="Draw among the k most likely tokens only; 0 or -1: all tokens.")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens less likely than min_p times the most likely one.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from the logit of every token sampled so far.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Times its count so far, subtracted from a token's logit.")
    # Bounded below: dividing a logit by a vanishing penalty overflows (vLLM takes any positive value).
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="Divides (or multiplies, when negative) the logits of tokens seen in the prompt or the sample; 1: off.")
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS, description="A sample ends before the first of these texts (one text or a list); the text is left out.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="A sample ends with any of these tokens (kept in the sample).")
    ignore_eos: bool = Field(False, description="Keep sampling past the end-of-sequence token.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the sample's text.")

    _stop_ids_vocabulary = field_validator("stop_token_ids")(_stop_ids_in_vocabulary)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    def sampling_fields(self) -> dict[str, Any]:
        """These settings as keyword arguments of the backend's `SamplingParams`."""
        return {name: getattr(self, name) for name in SamplingSettings.model_fields}


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


class GenerateRequest(SamplingSettings):
    prompts: list[Prompt] = Field(min_length=1)
    media: list[Annotated[str, Field(min_length=1)]] = Field([], description=SHARED_MEDIA_HELP)
    n: int = Field(1, ge=1, description="Samples per prompt.")
    max_tokens: int = Field(16, ge=1, description="Most tokens generated per sample.")
    top_logprobs: int = Field(0, ge=0)
    logprobs_dtype: LogprobsDType = Field("float32", description=LOGPROBS_DTYPE_HELP)

    _n_limit = field_validator("n")(_at_most("max_samples"))
    _tokens_limit = field_validator("max_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("top_logprobs")(_at_most("max_top_logprobs"))
    _batch_limit = field_validator("prompts")(_check_batch)


# --- OpenAI-compatible requests ---

# Fields vLLM's OpenAI server takes that this teacher does not serve, with the values that ask for
# nothing (those pass): any other value is refused by name, since ignoring it would change the answer.
UNSERVED_OPENAI_FIELDS: dict[str, Any] = {
    "logit_bias": lambda value: not value,
    "tools": lambda value: not value,
    "tool_choice": lambda value: value == "none",
    "response_format": lambda value: isinstance(value, dict) and value.get("type") == "text",
    "structured_outputs": lambda value: not value,
    "guided_json": lambda value: False,
    "guided_regex": lambda value: False,
    "guided_choice": lambda value: False,
    "guided_grammar": lambda value: False,
    "use_beam_search": lambda value: value is False,
    "best_of": lambda value: value == 1,
    "min_tokens": lambda value: value == 0,
    "allowed_token_ids": lambda value: not value,
    "bad_words": lambda value: not value,
    "logits_processors": lambda value: not value,
    "suffix": lambda value: not value,
    "prompt_embeds": lambda value: False,
}


class StreamOptions(StrictModel):
    include_usage: bool = Field(False, description="A last chunk carries the usage.")
    continuous_usage_stats: bool = Field(False, description="Every chunk carries the usage so far.")


class OpenAIRequest(SamplingSettings):
    """What OpenAI clients and vLLM's server accept, under vLLM's rules: `null` stands for a field's
    default (in requests built by hand as by SDKs), and an unknown field is ignored (vLLM logs it; here the answer also names it in the
    `X-Potstill-Ignored-Fields` header). A field vLLM serves and this teacher does not
    (`UNSERVED_OPENAI_FIELDS`) is refused by name, unless its value asks for nothing."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    prompt_logprobs: int | None = Field(None, ge=0, description="vLLM extension: top-k log-probs at each prompt position.")
    user: str | None = None

    _n_limit = field_validator("n")(_at_most("max_samples"))
    _prompt_k_limit = field_validator("prompt_logprobs")(_at_most("max_top_logprobs"))

    @model_validator(mode="before")
    @classmethod
    def _null_is_default_and_unserved_refused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, asks_nothing in UNSERVED_OPENAI_FIELDS.items():
            if data.get(name) is not None and not asks_nothing(data[name]):
                raise InvalidRequest("not served by this teacher", field=name)
        return {name: value for name, value in data.items() if value is not None}

    @model_validator(mode="after")
    def _streaming_consistent(self) -> OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("only with stream: true", field="stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise InvalidRequest("not available when streaming", field="prompt_logprobs")
        return self

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def _batch_of_prompts(prompt: Any, info: ValidationInfo) -> Any:
    if _completion_prompt_kind(prompt) in ("texts", "token_id_lists"):
        _check_batch(prompt, info)
    return prompt


CompletionPrompt = Annotated[
    _one_of(
        ("text", NonEmptyText),
        ("token_ids", TokenIdList),
        ("texts", Annotated[list[NonEmptyText], Field(min_length=1)]),
        ("token_id_lists", Annotated[list[TokenIdList], Field(min_length=1)]),
        kind=_completion_prompt_kind,
    ),
    AfterValidator(_batch_of_prompts),
]


class CompletionRequest(OpenAIRequest):
    prompt: CompletionPrompt = Field(description="A text or token ids, or a list of either (a batch: n choices each).")
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, description="Top-k log-probs per token (OpenAI: at most 5; here up to max_top_logprobs).")
    echo: bool = False
    add_special_tokens: bool = Field(True, description="vLLM extension: the tokenizer's special tokens (BOS) before a text prompt.")
    return_token_ids: bool = Field(False, description="vLLM extension: choices[].token_ids and prompt_token_ids in the answer.")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extension: logprobs tokens written 'token_id:N'.")

    _tokens_limit = field_validator("max_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("logprobs")(_at_most("max_top_logprobs"))

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or each of a batch."""
        return self.prompt if _completion_prompt_kind(self.prompt) in ("texts", "token_id_lists") else [self.prompt]


class ChatCompletionRequest(OpenAIRequest):
    messages: ChatPrompt
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    echo: bool = Field(False, description="vLLM extension: the reply starts with the last message's content when it has the assistant's role.")
    add_generation_prompt: bool = Field(True, description="vLLM extension: the template's cue for the assistant's turn.")
    continue_final_message: bool = Field(False, description="vLLM extension: the last message is left open and continued.")
    add_special_tokens: bool = Field(False, description="vLLM extension: the tokenizer's special tokens on top of the template's.")

    _tokens_limit = field_validator("max_tokens", "max_completion_tokens")(_at_most("max_new_tokens"))
    _k_limit = field_validator("top_logprobs")(_at_most("max_top_logprobs"))

    @model_validator(mode="after")
    def _one_turn_cue(self) -> ChatCompletionRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequest("cannot be combined with add_generation_prompt (set that false)", field="continue_final_message")
        return self


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
    token_ranks: np.ndarray | None = None  # int32 [L]: each token's rank in the vocabulary (1: most likely)

    def to_json(self) -> dict:
        ranks = {} if self.token_ranks is None else {"token_ranks": self.token_ranks.tolist()}
        return {**super().to_json(), **ranks, "prompt_tokens": self.prompt_tokens, "model_version": self.model_version}


@dataclass(frozen=True)
class Sample(TokenDistributions):
    text: str = ""
    finish_reason: Literal["stop", "length"] = "length"
    stop_reason: int | str | None = None  # the stop_token_ids entry or the stop string that ended it; None for EOS

    def to_json(self) -> dict:
        return {"text": self.text, **super().to_json(), "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}


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
