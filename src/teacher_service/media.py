"""Images and videos in prompts: the content parts that carry them, their limits, and safe decoding.

A chat message's `content` may be a list of parts, as OpenAI's and vLLM's chat APIs take them:

- `{"type": "text", "text": "..."}`
- `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
- `{"type": "video_url", "video_url": {"url": "data:image/gif;base64,..."}}`: an animated image
  (GIF, PNG or WebP), whose frames are the video's;
- `{"type": "video_url", "video_url": {"frames": ["data:image/png;base64,...", ...]}}`: a video as
  its frames, each an image of the same size;
- any `url` may be `file:///...` when the teacher was started with `--allowed-local-media-path DIR`
  and the file lies under DIR; otherwise only `data:` URLs are accepted (the teacher fetches nothing);
- any `url` may be `media:i`, entry i of the request's own `media` list: a picture shown with many
  prompts (the samples of one prompt) travels once and is decoded once, and counts once.

Decoding happens off the event loop (`resolve_media`, on a thread) and is bounded before any
pixel is decoded: the format and the size come from the file's header (Pillow reads it lazily),
so a picture declaring more than `max_image_pixels` pixels, or a video more than
`max_video_frames` frames, is refused without being decompressed; a request holding more than
`max_images` images or `max_videos` videos is refused too. Every refusal is an `InvalidRequest`
naming the part (`sequences.0.prompt.0.content.1.image_url.url`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from PIL import Image, ImageSequence
from pydantic import BaseModel, ConfigDict, Field, model_validator

from teacher_service.errors import InvalidRequest

# Formats decoded; anything else (PDF, PSD, EPS through Ghostscript, ...) is refused from its header.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_FILE_BYTES = 64 * 2**20


# --- building parts (clients) ---


def data_url(data: bytes) -> str:
    """A data: URL of encoded image bytes (the teacher reads the format from the bytes themselves)."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


def image_part(data: bytes) -> dict[str, Any]:
    """The content part of an image given as PNG, JPEG, GIF, WebP or BMP bytes."""
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def video_part(frames: list[bytes]) -> dict[str, Any]:
    """The content part of a video given as its frames' encoded bytes, in order."""
    return {"type": "video_url", "video_url": {"frames": [data_url(frame) for frame in frames]}}


def animation_part(data: bytes) -> dict[str, Any]:
    """The content part of a video given as one animated GIF, PNG or WebP."""
    return {"type": "video_url", "video_url": {"url": data_url(data)}}


# --- request schema ---


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Part):
    url: str = Field(min_length=1, description="A data: URL of PNG, JPEG, GIF, WebP or BMP bytes (or an allowed file: URL).")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted for OpenAI clients; ignored.")


class VideoURL(_Part):
    url: str | None = Field(None, min_length=1, description="A data: (or allowed file:) URL of an animated GIF, PNG or WebP.")
    frames: list[str] | None = Field(None, min_length=1, description="The video's frames in order, each a data: (or allowed file:) URL of an image.")

    @model_validator(mode="after")
    def _one_source(self) -> VideoURL:
        if (self.url is None) == (self.frames is None):
            raise ValueError("give exactly one of url and frames")
        return self


class ContentPart(_Part):
    """One part of a message: the field named by `type` is set, and only that one."""

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> ContentPart:
        given = [name for name in ("text", "image_url", "video_url") if getattr(self, name) is not None]
        if given != [self.type]:
            raise ValueError(f"a {self.type!r} part holds the field {self.type} and no other (got {', '.join(given) or 'none'})")
        return self


@dataclass(frozen=True)
class PromptMedia:
    """The decoded pictures of one prompt, in the order of their placeholders, and what a backend made of them."""

    images: tuple[Image.Image, ...] = ()  # RGB
    videos: tuple[tuple[Image.Image, ...], ...] = ()  # each video's RGB frames, all of one size
    inputs: dict[str, Any] | None = None  # the backend's encoding (hf: pixel tensors and grids), set with the token ids


@dataclass(frozen=True)
class MediaLimits:
    """What one request may carry (`potstill serve --max-images ...`)."""

    max_images: int = 8  # images per request, over all its prompts
    max_videos: int = 2  # videos per request
    max_video_frames: int = 32  # frames per video
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height of one image or frame
    local_media_path: str | None = None  # file: URLs are read from under this directory only
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


SHARED_PREFIX = "media:"  # `media:i` names entry i of the request's own `media` list


def shared_index(url: str) -> int | None:
    """i for a `media:i` URL, else None."""
    suffix = url.removeprefix(SHARED_PREFIX)
    return int(suffix) if url.startswith(SHARED_PREFIX) and suffix.isdigit() else None


class RequestMedia:
    """The media of one request, decoded on a thread: each entry of the request's `media` list once,
    however many parts name it (`media:i`), and the counts of images and videos against the limits
    (a shared picture counts once)."""

    def __init__(self, limits: MediaLimits, shared: list[str] = ()):
        self.limits = limits
        self.shared = list(shared)
        self.counts = {"image": 0, "video": 0}
        self._decoded: dict[tuple[str, str], Any] = {}
        self._counted: set[tuple[str, str]] = set()

    def image(self, url: str, field: str) -> Image.Image:
        """The image of the part at `field`."""
        self._count("image", url if shared_index(url) is not None else None, field)
        return self._decode(url, f"{field}.image_url.url", decode_image)

    def video(self, video: VideoURL, field: str) -> list[Image.Image]:
        """The frames of the video part at `field`."""
        sources = [video.url] if video.url is not None else video.frames
        self._count("video", " ".join(sources) if all(shared_index(u) is not None for u in sources) else None, field)
        if video.url is not None:
            return self._decode(video.url, f"{field}.video_url.url", decode_animation)
        return self._frames(video.frames, f"{field}.video_url.frames")

    def _frames(self, urls: list[str], field: str) -> list[Image.Image]:
        if len(urls) > self.limits.max_video_frames:
            raise InvalidRequest(f"{len(urls)} frames exceed the limit of {self.limits.max_video_frames} (max_video_frames)", field=field)
        frames = [self._decode(url, f"{field}.{i}", decode_image) for i, url in enumerate(urls)]
        for i, frame in enumerate(frames):
            if frame.size != frames[0].size:
                raise InvalidRequest(f"frame of {frame.size[0]}x{frame.size[1]} pixels in a video of {frames[0].size[0]}x{frames[0].size[1]}",
                                     field=f"{field}.{i}")
        return frames

    def _count(self, kind: str, shared_key: str | None, field: str) -> None:
        """One more image or video, refused beyond its limit; a shared source (`shared_key`) counts once."""
        if shared_key is not None:
            if (kind, shared_key) in self._counted:
                return
            self._counted.add((kind, shared_key))
        self.counts[kind] += 1
        limit = getattr(self.limits, f"max_{kind}s")
        if self.counts[kind] > limit:
            raise InvalidRequest(f"more than {limit} {kind}s in one request (max_{kind}s)", field=field)

    def _decode(self, url: str, field: str, decode) -> Any:
        """`decode(bytes, limits, field)` of what `url` names; a shared entry decoded once (errors name it: `media.i`)."""
        index = shared_index(url)
        if index is None:
            return decode(read_url(url, self.limits, field), self.limits, field)
        if index >= len(self.shared):
            raise InvalidRequest(f"names entry {index} of a media list of {len(self.shared)}", field=field)
        key = (decode.__name__, url)
        if key not in self._decoded:
            shared_field = f"media.{index}"
            self._decoded[key] = decode(read_url(self.shared[index], self.limits, shared_field), self.limits, shared_field)
        return self._decoded[key]


@dataclass
class ResolvedChat:
    """Chat turns in the form chat templates take (`{"type": "image"}` where a picture goes) and the media, in order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    def media(self) -> PromptMedia | None:
        return PromptMedia(tuple(self.images), tuple(map(tuple, self.videos))) if self.images or self.videos else None


def has_media(messages: list[Any], kinds: tuple[str, ...] = ("image_url", "video_url")) -> bool:
    """Whether chat turns (pydantic `ChatMessage`s) hold parts of `kinds`."""
    return any(part.type in kinds for m in messages for part in m.parts)


def resolve_chat(messages: list[Any], field: str, media: RequestMedia) -> ResolvedChat:
    """Decode the media of chat turns (pydantic `ChatMessage`s) at `field`; blocking, run it on a thread."""
    resolved = ResolvedChat(messages=[])
    for m, message in enumerate(messages):
        if all(part.type == "text" for part in message.parts):
            resolved.messages.append({**message.template_fields(), "content": message.text})
            continue
        parts = [_resolve_part(part, f"{field}.{m}.content.{p}", media, resolved) for p, part in enumerate(message.content)]
        resolved.messages.append({**message.template_fields(), "content": parts})
    return resolved


def _resolve_part(part: Any, field: str, media: RequestMedia, resolved: ResolvedChat) -> dict[str, Any]:
    if part.type == "text":
        return {"type": "text", "text": part.text}
    if part.type == "image_url":
        resolved.images.append(media.image(part.image_url.url, field))
        return {"type": "image"}
    resolved.videos.append(media.video(part.video_url, field))
    return {"type": "video"}


def read_url(url: str, limits: MediaLimits, field: str) -> bytes:
    """The bytes a `data:` URL holds, or those of an allowed `file:` URL."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest("a data: URL must be base64: data:image/png;base64,...", field=field)
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise InvalidRequest(f"invalid base64: {error}", field=field) from None
    if url.startswith("file:"):
        return _read_local(url, limits, field)
    raise InvalidRequest("only data: URLs are accepted (and media:i, file: URLs under --allowed-local-media-path); "
                         "the teacher fetches nothing", field=field)


def _read_local(url: str, limits: MediaLimits, field: str) -> bytes:
    if limits.local_media_path is None:
        raise InvalidRequest("file: URLs are refused: this teacher was started without --allowed-local-media-path", field=field)
    root = Path(os.path.realpath(limits.local_media_path))
    path = Path(os.path.realpath(unquote(urlparse(url).path)))
    if not path.is_relative_to(root):
        raise InvalidRequest(f"{path} is outside the allowed media directory {root}", field=field)
    try:
        with path.open("rb") as file:
            data = file.read(limits.max_file_bytes + 1)
    except OSError as error:
        raise InvalidRequest(f"cannot read {path}: {error.strerror}", field=field) from None
    if len(data) > limits.max_file_bytes:
        raise InvalidRequest(f"{path} is larger than {limits.max_file_bytes} bytes", field=field)
    return data


def _opened(data: bytes, limits: MediaLimits, field: str) -> Image.Image:
    """The image's header read (no pixel decoded yet), its format and declared size checked."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise InvalidRequest(f"declared size refused: {error}", field=field) from None
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise InvalidRequest(f"not a PNG, JPEG, GIF, WebP or BMP image: {error}", field=field) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"{width}x{height} pixels exceed the limit of {limits.max_image_pixels} (max_image_pixels)", field=field)
    return image


def _decoded(image: Image.Image, field: str) -> Image.Image:
    """The current frame as RGB pixels; a corrupt or truncated file is the caller's fault, whatever the decoder raises."""
    try:
        return image.convert("RGB")
    except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, struct.error, EOFError, ...
        raise InvalidRequest(f"the image data is corrupt or truncated: {error}", field=field) from None


def decode_image(data: bytes, limits: MediaLimits, field: str) -> Image.Image:
    """One RGB image (the first frame of an animation)."""
    with _opened(data, limits, field) as image:
        return _decoded(image, field)


def decode_animation(data: bytes, limits: MediaLimits, field: str) -> list[Image.Image]:
    """Every frame of an animated image as RGB images (a still image is a one-frame video)."""
    with _opened(data, limits, field) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > limits.max_video_frames:
            raise InvalidRequest(f"{frames} frames exceed the limit of {limits.max_video_frames} (max_video_frames)", field=field)
        return [_decoded(frame, field) for frame in ImageSequence.Iterator(image)]
