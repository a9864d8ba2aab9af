"""One schema for serving a teacher: every setting of `potstill serve`, its default, range and help.

`potstill serve` reads it from flags, `POTSTILL_*` environment variables (the flag in upper snake
case: `--http-port` is `POTSTILL_HTTP_PORT`) and a YAML file (`--config serve.yaml`, keys as the
flags without dashes or as field names); flags win over the environment, which wins over the file.
Test harnesses and benchmarks build it directly: `ServeOptions(model=path, http_port=0)`.
"""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from potstill.flags import env_name
from potstill.logs import LogFormat
from potstill.usage import UsageError
from teacher_service.auth import parse_keys, require_usable_keys
from potstill.devices import DEVICE_HELP, DEVICE_PATTERN
from teacher_service.backends import BACKENDS
from teacher_service.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from teacher_service.http_server import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_BODY_BYTES
from teacher_service.media import MediaLimits
from teacher_service.protocol import CHARS_PER_TOKEN_BOUND, Limits

ENV_PREFIX = "POTSTILL_"


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Path or hub id of a causal language model.")
    backend: str = Field("hf", description=f"What computes the answers: one of {', '.join(BACKENDS)}.")
    host: str = Field("127.0.0.1", description="Address both servers listen on (0.0.0.0 in a container).")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description=f"Where the model runs: {DEVICE_HELP}.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Weights' dtype.")
    api_key_file: str | None = Field(
        None, description="File of API keys clients must send as a Bearer token, one per line (any one of them is accepted).",
    )
    api_keys: tuple[str, ...] = Field(
        (), exclude=True, repr=False,
        description="Accepted API keys, comma-separated in POTSTILL_API_KEYS (no flag: a command line is visible to every user).",
    )
    admin_key_file: str | None = Field(
        None, description="File of admin keys, one per line, that weight pushes (POST /admin/v1/weights, gRPC "
        "TeacherAdmin) must send as a Bearer token; API keys never grant them. None (and no POTSTILL_ADMIN_KEYS): pushes are refused.",
    )
    admin_keys: tuple[str, ...] = Field(
        (), exclude=True, repr=False, description="Accepted admin keys, comma-separated in POTSTILL_ADMIN_KEYS (no flag).",
    )
    max_weights_bytes: int = Field(64 * 2**30, ge=1, description="Largest safetensors file a weight push may stream.")
    tls_cert: str | None = Field(None, description="PEM certificate (chain) to serve HTTPS and gRPC over TLS; needs tls_key.")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert.")
    max_model_len: int | None = Field(None, ge=1, description="Cap on prompt + completion tokens (none: the model's own).")
    max_top_logprobs: int = Field(Limits.max_top_logprobs, ge=0, description="Largest k a request may ask for.")
    max_samples: int = Field(Limits.max_samples, ge=1, description="Largest n per prompt.")
    max_new_tokens: int = Field(Limits.max_new_tokens, ge=1, description="Most tokens one sample may generate.")
    max_batch: int = Field(Limits.max_batch, ge=1, description="Most sequences or prompts per request (clients split larger batches).")
    max_queued_requests: int = Field(64, ge=1, description="Requests admitted at once; more are refused with 429 / RESOURCE_EXHAUSTED.")
    max_batch_tokens: int = Field(8192, ge=1, description="Tokens per forward pass that concurrent requests share (prompt + completion, times n for generate).")
    batch_window_ms: float = Field(2.0, ge=0, le=1000, description="How long a request waits for others to share its forward pass when the model is idle.")
    logprobs_mode: Literal["raw", "processed"] = Field(
        "raw", description="Generate's log-probs: the model's own distribution (raw) or the one sampled from, after temperature (processed).",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend: share of GPU memory its engine may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs the model is split over.")
    max_prompt_chars: int | None = Field(
        None, ge=1, description=f"Most characters of a text prompt or completion, checked before tokenising "
        f"(none: {CHARS_PER_TOKEN_BOUND} x the context length).",
    )
    max_images: int = Field(MediaLimits.max_images, ge=0, description="Most images one request may carry (vision models), over all its prompts.")
    max_videos: int = Field(MediaLimits.max_videos, ge=0, description="Most videos one request may carry (vision models).")
    max_video_frames: int = Field(MediaLimits.max_video_frames, ge=1, description="Most frames of one video.")
    max_image_pixels: int = Field(
        MediaLimits.max_image_pixels, ge=1, le=Image.MAX_IMAGE_PIXELS, description="Most pixels (width x height) of one image "
        "or frame, checked from the file's header before anything is decoded (at most Pillow's own bomb limit).",
    )
    allowed_local_media_path: str | None = Field(
        None, description="Directory whose files prompts may name as file: URLs (images, animated videos); none: only data: URLs.",
    )
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1, description="Largest HTTP request body.")
    body_timeout_seconds: float = Field(
        DEFAULT_BODY_TIMEOUT_SECONDS, gt=0, description="Longest an HTTP request body may take to arrive (then 408)."
    )
    max_connections: int = Field(1024, ge=1, description="Open HTTP connections at once; more are answered 503.")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1, description="Largest gRPC message, either way.")
    grace_seconds: float = Field(30.0, ge=0, description="How long in-flight requests may take to finish on SIGTERM.")
    drain_delay_seconds: float = Field(
        0.0, ge=0, description="After SIGTERM, how long readiness reports false while requests are still accepted, "
        "so load balancers stop sending before the servers stop listening.",
    )
    log_format: LogFormat = Field("text", description="text for people, json for log collectors (one object per line).")
    metrics_need_api_key: bool = Field(False, description="Ask for the API key on /metrics too (by default Prometheus scrapes it freely).")
    docs_without_api_key: bool = Field(
        False, description="With an API key set, still serve /docs, /openapi.json and gRPC reflection to anyone "
        "(by default /openapi.json and reflection need the key and /docs is off).",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, keys: object, info: ValidationInfo) -> object:
        if not isinstance(keys, str):
            return keys
        parsed = parse_keys(keys)
        if not parsed:  # POTSTILL_API_KEYS (or _ADMIN_KEYS) set but blank: a mistake, never "no authentication"
            raise ValueError(f"{env_name(info.field_name, ENV_PREFIX)} is empty: refusing to serve without authentication")
        return parsed

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _usable_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        require_usable_keys(keys)
        return keys

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        # Checked when options are made, not at import, so backends registered later count too.
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        return name

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeOptions:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self

    @model_validator(mode="after")
    def _admin_keys_apart(self) -> ServeOptions:
        if set(self.admin_keys) & set(self.api_keys):
            raise ValueError("an admin key is also an API key: every API key holder could push weights; use different keys")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def with_api_keys(self) -> ServeOptions:
        """These options with the keys of `api_key_file` and `admin_key_file` added (where set)."""
        keys = {"api_keys": self.api_keys + _file_keys(self.api_key_file, "--api-key-file"),
                "admin_keys": self.admin_keys + _file_keys(self.admin_key_file, "--admin-key-file")}
        return ServeOptions(**{**self.model_dump(), **keys})


def _file_keys(path: str | None, flag: str) -> tuple[str, ...]:
    if path is None:
        return ()
    with open(path) as key_file:
        keys = parse_keys(key_file.read())
    if not keys:
        raise UsageError(f"{flag} {path} holds no key: refusing to serve without authentication")
    return keys
