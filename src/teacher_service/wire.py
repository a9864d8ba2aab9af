"""Conversions between protobuf messages and the plain data / result types of `protocol`.

All protobuf handling lives here, for both sides of the wire: the servers turn requests into
plain data (then validated by `protocol.parse`, like JSON) and results into messages; the
trainer's clients do the reverse. Domain code never sees protobuf.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from potstill.v1 import teacher_pb2 as pb
from teacher_service.errors import InvalidRequest
from teacher_service.media import data_url
from teacher_service.protocol import (
    GenerateResponse,
    GenerateResult,
    ModelInfo,
    Sample,
    ScoredSequence,
    ScoreResponse,
)

_DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_INT32: np.dtype("<i4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_LOGPROBS_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}
_LOGPROBS_DTYPE_NAMES = {code: name for name, code in _LOGPROBS_DTYPES.items()}

# --- tensors ---


def tensor_to_pb(array: np.ndarray) -> pb.Tensor:
    dtype = array.dtype.newbyteorder("<")
    return pb.Tensor(dtype=_DTYPE_CODES[dtype], shape=array.shape, data=array.astype(dtype, copy=False).tobytes())


def tensor_from_pb(tensor: pb.Tensor) -> np.ndarray:
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}")
    dtype = _DTYPES[tensor.dtype]
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise ValueError(f"tensor of shape {list(tensor.shape)} needs {expected} bytes, got {len(tensor.data)}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    # A copy: arrays over the message's bytes would be read-only, and consumers write to theirs.
    # Half precision is a wire encoding only: consumers get float32 whatever travelled.
    return array.astype(np.float32) if dtype == np.float16 else array.copy()


# --- requests: protobuf -> plain data (server side) ---


def _source_url(source: pb.MediaSource) -> str | None:
    """Media bytes become the data: URLs of the JSON form, so both transports share one validation path."""
    kind = source.WhichOneof("source")
    if kind == "data":
        return data_url(source.data)
    return source.url if kind == "url" else None


def _part_data(part: pb.ContentPart) -> dict[str, Any]:
    kind = part.WhichOneof("kind")
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _source_url(part.image)}}
    if kind == "video":
        video = {"frames": [_source_url(f) for f in part.video.frames]} if part.video.frames else {"url": _source_url(part.video.animation)}
        return {"type": "video_url", "video_url": video}
    return {"type": "text", "text": part.text if kind == "text" else None}


def _message_data(message: pb.ChatMessage) -> dict[str, Any]:
    if message.parts and message.content:
        raise InvalidRequest("set content or parts, not both", field="content")
    content = [_part_data(p) for p in message.parts] if message.parts else message.content
    return {"role": message.role, "content": content}


def _prompt_data(prompt: pb.Prompt) -> Any:
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    if kind == "chat":
        return [_message_data(m) for m in prompt.chat.messages]
    return prompt.text if kind == "text" else None


def _completion_data(completion: pb.Completion) -> Any:
    kind = completion.WhichOneof("kind")
    if kind == "token_ids":
        return list(completion.token_ids.ids)
    return completion.text if kind == "text" else None


def _shared_media(request: Any) -> dict[str, Any]:
    return {"media": [_source_url(source) for source in request.media]} if request.media else {}


def _optional_fields(message: Any, names: tuple[str, ...]) -> dict[str, Any]:
    fields = {name: getattr(message, name) for name in names if message.HasField(name)}
    if "logprobs_dtype" in fields:  # an unknown code stays a number, which validation refuses by field
        fields["logprobs_dtype"] = _LOGPROBS_DTYPE_NAMES.get(fields["logprobs_dtype"], fields["logprobs_dtype"])
    return fields


def _options_pb(data: dict[str, Any], skip: str) -> dict[str, Any]:
    """A request's settings as protobuf fields (unset ones left out, dtypes as enum codes)."""
    options = {key: value for key, value in data.items() if key != skip and value is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    if "logprobs_dtype" in options:
        options["logprobs_dtype"] = _LOGPROBS_DTYPES[options["logprobs_dtype"]]
    if "media" in options:
        options["media"] = [_source_pb(url) for url in options["media"]]
    return options


def score_request_data(request: pb.ScoreRequest) -> dict[str, Any]:
    return {
        "sequences": [
            {"prompt": _prompt_data(s.prompt), "completion": _completion_data(s.completion)}
            for s in request.sequences
        ],
        "top_logprobs": request.top_logprobs,
        **_optional_fields(request, ("temperature", "logprobs_dtype")),
        **_shared_media(request),
    }


_GENERATE_OPTIONS = (
    "n", "max_tokens", "temperature", "top_p", "seed", "logprobs_dtype", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "skip_special_tokens",
)


def generate_request_data(request: pb.GenerateRequest) -> dict[str, Any]:
    lists = {name: list(getattr(request, name)) for name in ("stop", "stop_token_ids") if getattr(request, name)}
    return {
        "prompts": [_prompt_data(p) for p in request.prompts],
        "top_logprobs": request.top_logprobs,
        **_optional_fields(request, _GENERATE_OPTIONS),
        **_shared_media(request),
        **lists,
    }


def decode_request(message_type: type, body: bytes) -> Any:
    """Parse protobuf bytes, or raise InvalidRequest naming the body."""
    message = message_type()
    try:
        message.ParseFromString(body)
    except Exception as error:  # protobuf raises DecodeError and, for some corruptions, others
        raise InvalidRequest(f"not a valid {message_type.DESCRIPTOR.full_name}: {error}", field="body") from None
    return message


# --- requests: plain data -> protobuf (client side) ---


def _source_pb(url: str) -> pb.MediaSource:
    """A base64 data: URL travels as its bytes (a quarter fewer than its text), any other URL as it is."""
    header, _, payload = url.partition(",")
    if url.startswith("data:") and header.endswith(";base64"):
        return pb.MediaSource(data=base64.b64decode(payload))
    return pb.MediaSource(url=url)


def _part_pb(part: dict[str, Any]) -> pb.ContentPart:
    if part["type"] == "image_url":
        return pb.ContentPart(image=_source_pb(part["image_url"]["url"]))
    if part["type"] == "video_url":
        video = part["video_url"]
        if "frames" in video:
            return pb.ContentPart(video=pb.Video(frames=[_source_pb(f) for f in video["frames"]]))
        return pb.ContentPart(video=pb.Video(animation=_source_pb(video["url"])))
    return pb.ContentPart(text=part["text"])


def _message_pb(message: dict[str, Any]) -> pb.ChatMessage:
    content = message["content"]
    if isinstance(content, str):
        return pb.ChatMessage(role=message["role"], content=content)
    return pb.ChatMessage(role=message["role"], parts=[_part_pb(p) for p in content])


def _prompt_pb(prompt: Any) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if prompt and isinstance(prompt[0], dict):
        return pb.Prompt(chat=pb.ChatMessages(messages=[_message_pb(m) for m in prompt]))
    return pb.Prompt(token_ids=pb.TokenIds(ids=prompt))


def _completion_pb(completion: Any) -> pb.Completion:
    if isinstance(completion, str):
        return pb.Completion(text=completion)
    return pb.Completion(token_ids=pb.TokenIds(ids=completion))


def score_request_pb(data: dict[str, Any]) -> pb.ScoreRequest:
    """The protobuf form of a score request given as in JSON."""
    sequences = [pb.ScoreSequence(prompt=_prompt_pb(s["prompt"]), completion=_completion_pb(s["completion"])) for s in data["sequences"]]
    return pb.ScoreRequest(sequences=sequences, **_options_pb(data, "sequences"))


def generate_request_pb(data: dict[str, Any]) -> pb.GenerateRequest:
    """The protobuf form of a generate request given as in JSON."""
    return pb.GenerateRequest(prompts=[_prompt_pb(p) for p in data["prompts"]], **_options_pb(data, "prompts"))


# --- responses: results -> protobuf (server side) ---


def _distributions_pb(result: Any) -> dict[str, pb.Tensor]:
    return {
        "token_ids": tensor_to_pb(result.token_ids),
        "token_logprobs": tensor_to_pb(result.token_logprobs),
        "top_ids": tensor_to_pb(result.top_ids),
        "top_logprobs": tensor_to_pb(result.top_logprobs),
    }


def _ranks_pb(result: ScoredSequence) -> dict[str, pb.Tensor]:
    return {} if result.token_ranks is None else {"token_ranks": tensor_to_pb(result.token_ranks)}


def score_response_pb(response: ScoreResponse) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        results=[
            pb.ScoredSequence(prompt_tokens=r.prompt_tokens, model_version=r.model_version, **_ranks_pb(r), **_distributions_pb(r))
            for r in response.results
        ]
    )


def _stop_reason_pb(sample: Sample) -> dict[str, Any]:
    if sample.stop_reason is None:
        return {}
    return {"stop_string": sample.stop_reason} if isinstance(sample.stop_reason, str) else {"stop_token_id": sample.stop_reason}


def generate_response_pb(response: GenerateResponse) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        results=[
            pb.GenerateResult(
                prompt_tokens=r.prompt_tokens,
                model_version=r.model_version,
                samples=[
                    pb.Sample(text=s.text, finish_reason=s.finish_reason, **_stop_reason_pb(s), **_distributions_pb(s))
                    for s in r.samples
                ],
            )
            for r in response.results
        ]
    )


def model_info_pb(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**info.model_dump())


# --- responses: protobuf -> results (client side) ---


def _distributions(message: Any) -> dict[str, np.ndarray]:
    return {
        "token_ids": tensor_from_pb(message.token_ids),
        "token_logprobs": tensor_from_pb(message.token_logprobs),
        "top_ids": tensor_from_pb(message.top_ids),
        "top_logprobs": tensor_from_pb(message.top_logprobs),
    }


def score_response(message: pb.ScoreResponse) -> ScoreResponse:
    return ScoreResponse(
        results=[
            ScoredSequence(
                prompt_tokens=r.prompt_tokens, model_version=r.model_version, **_distributions(r),
                token_ranks=tensor_from_pb(r.token_ranks) if r.HasField("token_ranks") else None,
            )
            for r in message.results
        ]
    )


def _stop_reason(sample: pb.Sample) -> int | str | None:
    if sample.HasField("stop_string"):
        return sample.stop_string
    return sample.stop_token_id if sample.HasField("stop_token_id") else None


def generate_response(message: pb.GenerateResponse) -> GenerateResponse:
    return GenerateResponse(
        results=[
            GenerateResult(
                prompt_tokens=r.prompt_tokens,
                model_version=r.model_version,
                samples=[
                    Sample(text=s.text, finish_reason=s.finish_reason, stop_reason=_stop_reason(s), **_distributions(s))
                    for s in r.samples
                ],
            )
            for r in message.results
        ]
    )


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields})
