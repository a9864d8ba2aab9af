"""Vision-language models: detecting them, loading their processor, turning media into model inputs.

A processor turns a prompt text holding one placeholder per image or video (`<|image_pad|>`,
`<|video_pad|>` in Qwen2-VL) plus the decoded pictures into model inputs: the token ids, with
each placeholder repeated once per visual token, and the pixel tensors (`pixel_values`,
`image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, ...). Teacher and student use the same
`load_processor`, so both see the same inputs for the same media.

`AutoProcessor` is used when it loads. Qwen2-VL's processor cannot be built where torchvision is
missing (its video processor needs it, and transformers refuses a processor without one); there
`FramesProcessor` stands in: the model's own image processor (its PIL backend) for images, and
the same patch layout for videos built here from the frames with numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature

IMAGE = 1  # mm_token_type_ids of an image placeholder token (0: text)
VIDEO = 2


def is_vision_model(path: str | Path) -> bool:
    """Whether the model at `path` takes pixels (its config has a vision tower)."""
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str | Path) -> Any:
    """The model's processor: `AutoProcessor` where it loads, else `FramesProcessor`."""
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, TypeError, ValueError):  # transformers without torchvision
        processor = None
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        return processor
    return FramesProcessor(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path, backend="pil"))


class FramesProcessor:
    """A Qwen2-VL style processor: `processor(text=[...], images=[...], videos=[...])` as transformers' own.

    A video is a list of PIL frames, padded by repeating its last frame to a multiple of the
    image processor's `temporal_patch_size`; frames t and t+1 make one temporal patch, with the
    spatial patch order of an image, so a video of one repeated frame has exactly that frame's
    image patches (`tests/teacher_service/test_vision.py`).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_token: str = "<|image_pad|>", video_token: str = "<|video_pad|>"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text: list[str], images: list | None = None, videos: list | None = None,
                 return_tensors: str = "pt", **kwargs: Any) -> BatchFeature:
        features: dict[str, Any] = {}
        if images:
            features.update(self.image_processor(images=images, return_tensors="pt"))
        if videos:
            features.update(self._videos(videos))
        text = [self._expanded(t, features) for t in text]
        encoded = self.tokenizer(text, return_tensors=return_tensors, padding=True, **kwargs)
        ids = encoded["input_ids"]
        encoded["mm_token_type_ids"] = torch.where(ids == self.image_token_id, IMAGE, 0) + torch.where(ids == self.video_token_id, VIDEO, 0)
        return BatchFeature({**encoded, **features})

    def _merge(self) -> int:
        return self.image_processor.merge_size**2

    def _expanded(self, text: str, features: dict[str, Any]) -> str:
        """`text` with each placeholder repeated once per visual token of its image or video, in order."""
        for token, grids in ((self.image_token, features.get("image_grid_thw")), (self.video_token, features.get("video_grid_thw"))):
            pieces = text.split(token)
            counts = [int(grid.prod()) // self._merge() for grid in (grids if grids is not None else [])]
            if len(pieces) - 1 != len(counts):
                raise ValueError(f"{len(pieces) - 1} {token} placeholders for {len(counts)} inputs")
            text = pieces[0] + "".join("\0" * count + piece for count, piece in zip(counts, pieces[1:]))
            text = text.replace("\0", token)
        return text

    def _videos(self, videos: list[list]) -> dict[str, torch.Tensor]:
        patches, grids = zip(*(self._video_patches(frames) for frames in videos))
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}

    def _video_patches(self, frames: list) -> tuple[torch.Tensor, list[int]]:
        """One video's patches [T/2 x h x w, C x 2 x p x p] and its grid (T/2, h, w)."""
        step = self.image_processor.temporal_patch_size
        frames = list(frames) + [frames[-1]] * (-len(frames) % step)
        single = self.image_processor(images=frames, return_tensors="pt")
        grid_h, grid_w = (int(v) for v in single["image_grid_thw"][0, 1:])
        patch = self.image_processor.patch_size
        # Each frame's patches repeat the frame along time: keep one copy, [F, h*w, C, p, p].
        per_frame = single["pixel_values"].reshape(len(frames), grid_h * grid_w, -1, step, patch, patch)[:, :, :, 0]
        # Frames t..t+step-1 make one temporal patch: [F/step, h*w, C, step, p, p].
        grouped = per_frame.reshape(len(frames) // step, step, grid_h * grid_w, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
        return grouped.reshape(len(frames) // step * grid_h * grid_w, -1), [len(frames) // step, grid_h, grid_w]

