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

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer_client.data import Row

# A picture larger than this many pixels is refused before it is decoded (a decompression bomb).
MAX_PIXELS = 4096 * 4096
# Processor outputs that are per-token bookkeeping, rebuilt from the ids when batched, not pixels.
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


def media_messages(row: Row) -> list[dict]:
    """The row's prompt as chat turns whose last user turn opens with the media parts."""
    turns = row.chat_turns() or [{"role": "user", "content": row.prompt}]
    last_user = max(i for i, turn in enumerate(turns) if turn["role"] == "user")
    turns[last_user] = {**turns[last_user], "content": media_parts(row) + [{"type": "text", "text": turns[last_user]["content"]}]}
    return turns


@dataclass
class MediaInputs:
    """One prompt's pixel tensors, as its processor names them (`pixel_values` [patches, D], `image_grid_thw` [images, 3]...)."""

    tensors: dict[str, torch.Tensor]

    @staticmethod
    def concatenated(parts: list[MediaInputs | None]) -> dict[str, torch.Tensor]:
        """The model keyword arguments for a batch of prompts: each tensor concatenated in prompt order."""
        present = [part.tensors for part in parts if part is not None]
        names = dict.fromkeys(name for tensors in present for name in tensors)
        return {name: torch.cat([tensors[name] for tensors in present if name in tensors]) for name in names}


def encode_with_media(processor, row: Row) -> tuple[list[int], MediaInputs]:
    """The row's prompt ids (placeholders expanded) and its pixel tensors, from the student's processor."""
    if not getattr(processor, "chat_template", None):
        raise ValueError("rows with images or video need a student with a chat template (its processor's); this one has none")
    text = processor.apply_chat_template(media_messages(row), add_generation_prompt=True, tokenize=False)
    images, frames = row_pictures(row)
    encoded = processor(text=[text], images=images or None, videos=[frames] if frames else None, return_tensors="pt")
    tensors = {name: value for name, value in encoded.items() if name not in _NOT_PIXELS}
    return encoded["input_ids"][0].tolist(), MediaInputs(tensors)
