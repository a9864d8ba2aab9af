"""Images and video frames in training rows: reading them, and the student's pixel inputs.

A row may carry `images` (a list) and a `video` (a list of frames), each item a file path or the
encoded bytes (PNG, JPEG...: Parquet binary columns hold bytes). The media belong to the row's
last user turn and come before its text, images first, then the video: a text prompt becomes one
user turn `[image parts..., video part, text part]` (`media_messages`), rendered by the student's
chat template, so a vision-language student needs one (its processor's).

The student's processor turns that text and the decoded pictures into token ids, with each
placeholder repeated once per visual token, and pixel tensors (`pixel_values`, `image_grid_thw`,
`pixel_values_videos`, `video_grid_thw` for Qwen2-VL). The ids are the prompt; the tensors
(`MediaInputs`) travel with every example of the row and are concatenated, in example order,
when examples are batched: the model assigns them to its placeholders in that order.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer_client.data import Row

# A picture larger than this many pixels is refused before it is decoded (a decompression bomb).
MAX_PIXELS = 4096 * 4096
# Processor outputs that are per token, not pixels: rebuilt for each batch from the prompts.
_NOT_PIXELS = ("input_ids", "attention_mask", "mm_token_type_ids")


def decode_picture(item: str | bytes, where: str) -> Image.Image:
    """A path or encoded bytes as an RGB image; `ValueError` naming `where` when it is not a readable picture."""
    try:
        source = io.BytesIO(item) if isinstance(item, bytes) else Path(item)
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels, more than {MAX_PIXELS}")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        shown = f"{len(item)} bytes" if isinstance(item, bytes) else repr(item)
        raise ValueError(f"{where}: not a readable image ({shown}): {error}") from None


def row_pictures(row: Row) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """The row's images and video frames, decoded (the video is None when the row has none)."""
    images = [decode_picture(item, f"images[{i}]") for i, item in enumerate(row.images or [])]
    frames = [decode_picture(item, f"video[{i}]") for i, item in enumerate(row.video or [])] or None
    return images, frames


def media_parts(row: Row) -> list[dict]:
    """Placeholder content parts for the row's media, in order: one per image, then the video."""
    return [{"type": "image"} for _ in row.images or []] + ([{"type": "video"}] if row.video else [])


def media_messages(row: Row, parts: list[dict] | None = None) -> list[dict]:
    """The row's prompt as chat turns whose last user turn opens with the media's content parts
    (`parts`; by default the placeholders of `media_parts`, as chat templates take them)."""
    turns = row.chat_turns() or [{"role": "user", "content": row.prompt}]
    last_user = max(i for i, turn in enumerate(turns) if turn["role"] == "user")
    parts = media_parts(row) if parts is None else parts
    turns[last_user] = {**turns[last_user], "content": parts + [{"type": "text", "text": turns[last_user]["content"]}]}
    return turns


def _data_url(item: str | bytes) -> str:
    """A picture as a base64 data: URL (a path is read), as teachers take it (`teacher_service.media`)."""
    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg" if data.startswith(b"\xff\xd8") else "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def teacher_messages(row: Row) -> list[dict]:
    """The row's prompt as a teacher receives it: chat turns whose last user turn opens with the
    media as OpenAI-style parts (`image_url`, and `video_url` with its frames), each a data: URL."""
    parts = [{"type": "image_url", "image_url": {"url": _data_url(item)}} for item in row.images or []]
    if row.video:
        parts.append({"type": "video_url", "video_url": {"frames": [_data_url(item) for item in row.video]}})
    return media_messages(row, parts)


# --- requests: each picture once ---

SHARED_PREFIX = "media:"  # a part's URL naming entry i of its request's `media` list (teacher_service.media)


def _parts(prompt) -> list[dict]:
    """The content parts of a chat prompt's turns (none for text or token ids)."""
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict):
        return []
    return [part for turn in prompt if isinstance(turn.get("content"), list) for part in turn["content"]]


def pictures(prompt) -> tuple[set[str], set[str]]:
    """The distinct images and videos a prompt shows, by their URLs (a video: its frames' URLs joined)."""
    images = {part["image_url"]["url"] for part in _parts(prompt) if part.get("type") == "image_url"}
    videos = {" ".join(part["video_url"].get("frames") or [part["video_url"].get("url")])
              for part in _parts(prompt) if part.get("type") == "video_url"}
    return images, videos


def share_media(request: dict, items_key: str) -> dict:
    """The request with each distinct data: URL of its prompts' pictures sent once: listed in the
    request's `media` and named `media:i` by every part that shows it (the samples of one prompt,
    the candidates scored after it), as teachers take it. `items_key`: "sequences" (score: each
    item's `prompt`) or "prompts" (generate)."""
    shared: dict[str, int] = {}

    def name(url: str) -> str:
        return f"{SHARED_PREFIX}{shared.setdefault(url, len(shared))}" if url.startswith("data:") else url

    def named(prompt):
        if not _parts(prompt):
            return prompt
        return [{**turn, "content": [_named_part(part, name) for part in turn["content"]]} if isinstance(turn.get("content"), list)
                else turn for turn in prompt]

    if items_key == "sequences":
        items = [{**item, "prompt": named(item["prompt"])} for item in request["sequences"]]
    else:
        items = [named(prompt) for prompt in request["prompts"]]
    return {**request, items_key: items, "media": list(shared)} if shared else request


def _named_part(part: dict, name) -> dict:
    if part.get("type") == "image_url":
        return {**part, "image_url": {**part["image_url"], "url": name(part["image_url"]["url"])}}
    if part.get("type") == "video_url":
        video = part["video_url"]
        source = {"frames": [name(url) for url in video["frames"]]} if video.get("frames") else {"url": name(video["url"])}
        return {**part, "video_url": {**video, **source}}
    return part


@dataclass
class MediaInputs:
    """One prompt's pixel tensors, as its processor names them (`pixel_values` [patches, D],
    `image_grid_thw` [images, 3]...), and the kind of each prompt token (`mm_token_type_ids`:
    0 text, 1 image, 2 video, where the processor gives them; Qwen2-VL's rotary positions need them)."""

    tensors: dict[str, torch.Tensor]
    token_types: list[int] | None = None  # [len(prompt)]


def batch_media(parts: list[MediaInputs | None], offsets: list[int], width: int) -> dict[str, torch.Tensor]:
    """The model keyword arguments for a batch of sequences padded to `width`, whose prompts start
    at `offsets` (0 right-padded): each pixel tensor concatenated in row order, and the token kinds
    [B, width] (0 outside the prompts). Empty when no sequence has media."""
    present = [part for part in parts if part is not None]
    if not present:
        return {}
    names = dict.fromkeys(name for part in present for name in part.tensors)
    inputs = {name: torch.cat([part.tensors[name] for part in present if name in part.tensors]) for name in names}
    if any(part.token_types is not None for part in present):
        types = torch.zeros((len(parts), width), dtype=torch.long)
        for row, (part, offset) in enumerate(zip(parts, offsets)):
            if part is not None and part.token_types is not None:
                types[row, offset : offset + len(part.token_types)] = torch.tensor(part.token_types)
        inputs["mm_token_type_ids"] = types
    return inputs


def encode_with_media(processor, row: Row) -> tuple[list[int], MediaInputs]:
    """The row's prompt ids (placeholders expanded) and its pixel tensors, from the student's processor."""
    if not getattr(processor, "chat_template", None):
        raise ValueError("rows with images or video need a student with a chat template (its processor's); this one has none")
    text = processor.apply_chat_template(media_messages(row), add_generation_prompt=True, tokenize=False)
    images, frames = row_pictures(row)
    encoded = processor(text=[text], images=images or None, videos=[frames] if frames else None, return_tensors="pt")
    tensors = {name: value for name, value in encoded.items() if name not in _NOT_PIXELS}
    types = encoded["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in encoded else None
    return encoded["input_ids"][0].tolist(), MediaInputs(tensors, types)
