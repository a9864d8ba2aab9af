"""Tiny vision-language models in Hugging Face format: a Qwen2-VL built from a config (no download).

`build_tiny_vlm(path)` saves an untrained `Qwen2VLForConditionalGeneration` and its processor;
`AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`
load them once this module is imported (the import registers `ToyQwen2VLProcessor`).

Why a processor of our own: transformers' Qwen2-VL video processor needs torchvision, which this
project's CPU torch build cannot import, and `Qwen2VLProcessor` refuses to exist without one.
`ToyQwen2VLProcessor` is `Qwen2VLProcessor` with the video side done in numpy by
`FrameVideoProcessor`: frames resized and normalised as the image processor does, then cut into
the same `[grid_t · grid_h · grid_w, C · temporal_patch · patch · patch]` patches, so the model's
own video path (`pixel_values_videos`, `video_grid_thw`, `<|video_pad|>` tokens) runs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from potstill.toy.tokenizer import build_tokenizer

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# The toy chat template, with OpenAI-style content parts: an image or video part becomes its
# placeholder between the vision markers (the processor expands the pad to one token per patch group).
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% else %}<|user|>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}" + VISION_START + IMAGE_PAD + VISION_END +
    "{% elif part['type'] in ('video', 'video_url') %}" + VISION_START + VIDEO_PAD + VISION_END +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class FrameVideoProcessor:
    """Qwen2-VL's video preprocessing in numpy: a video is a list of frames (PIL images or HWC uint8).

    Each frame is resized to the image processor's grid (`smart_resize`), rescaled to [0, 1] and
    normalised with its mean and std; a video with an odd frame count repeats its last frame (as
    Qwen2-VL pads to `temporal_patch_size`). Output: `pixel_values_videos`
    [Σ grid_t·grid_h·grid_w, C·temporal_patch·patch²] and `video_grid_thw` [videos, 3].
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil):
        self.image_processor = image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size

    def __call__(self, videos, return_tensors=None, **_) -> dict:
        patches, grids = zip(*(self._video(frames) for frames in videos))
        pixels, grid = np.concatenate(patches), np.array(grids, dtype=np.int64)
        if return_tensors == "pt":
            return {"pixel_values_videos": torch.from_numpy(pixels), "video_grid_thw": torch.from_numpy(grid)}
        return {"pixel_values_videos": pixels, "video_grid_thw": grid}

    def _video(self, frames) -> tuple[np.ndarray, list[int]]:
        frames = [self._frame(frame) for frame in frames]  # [C, H, W] each
        frames += frames[-1:] * (-len(frames) % self.temporal_patch_size)
        video = np.stack(frames)  # [T, C, H, W]
        t, c, h, w = video.shape
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        grid_t, grid_h, grid_w = t // tp, h // p, w // p
        video = video.reshape(grid_t, tp, c, grid_h // m, m, p, grid_w // m, m, p)
        video = video.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, tp, p, p]
        return video.reshape(grid_t * grid_h * grid_w, c * tp * p * p), [grid_t, grid_h, grid_w]

    def _frame(self, frame) -> np.ndarray:
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        size = self.image_processor.size
        height, width = smart_resize(
            image.height, image.width, factor=self.patch_size * self.merge_size,
            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
        )
        image = image.convert("RGB").resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        mean, std = np.array(self.image_processor.image_mean), np.array(self.image_processor.image_std)
        return ((pixels - mean) / std).astype(np.float32).transpose(2, 0, 1)


class ToyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without torchvision: its video processor is a `FrameVideoProcessor`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = FrameVideoProcessor(image_processor)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


# A string key: no config class claims it, so real Qwen2-VL checkpoints keep their own processor.
AutoProcessor.register("potstill-toy-qwen2-vl", ToyQwen2VLProcessor, exist_ok=True)


def build_processor(image_pixels: tuple[int, int] = (28 * 28, 56 * 56), patch_size: int = 14) -> ToyQwen2VLProcessor:
    """The toy tokenizer with the vision tokens, and an image processor keeping images of
    `image_pixels` (min, max) pixels at about their size (multiples of 2·patch_size a side)."""
    tokenizer = build_tokenizer(extra_special_tokens=VISION_TOKENS)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": image_pixels[0], "longest_edge": image_pixels[1]}, patch_size=patch_size
    )
    return ToyQwen2VLProcessor(image_processor, tokenizer, chat_template=VLM_CHAT_TEMPLATE)


def tiny_vlm_config(
    processor: ToyQwen2VLProcessor, hidden_size: int = 64, layers: int = 2, heads: int = 4,
    vision_width: int = 64, vision_depth: int = 2, max_position_embeddings: int = 512,
) -> Qwen2VLConfig:
    """A small Qwen2-VL for `processor`: a `vision_depth`-block ViT of width `vision_width` on the
    processor's patches, merged 2×2 into the `hidden_size`-wide decoder."""
    tokenizer = processor.tokenizer
    head_dim = hidden_size // heads
    height = width = head_dim * 3 // 16  # rotary frequency pairs per axis, as Qwen2-VL's [16, 24, 24] of 64
    mrope = [head_dim // 2 - height - width, height, width]  # time, height, width
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": hidden_size * 4,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": max_position_embeddings, "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": vision_depth, "embed_dim": vision_width, "hidden_size": hidden_size,
            "num_heads": max(1, vision_width // 32), "patch_size": processor.image_processor.patch_size,
            "spatial_merge_size": processor.image_processor.merge_size,
            "temporal_patch_size": processor.image_processor.temporal_patch_size,
        },
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )


def build_tiny_vlm(path: str | Path, seed: int = 0, patch_size: int = 14, **config_overrides) -> Path:
    """Save a randomly initialised tiny Qwen2-VL and its processor under `path`; returns the path.

    `config_overrides` go to `tiny_vlm_config` (hidden_size, layers, heads, vision_width, vision_depth).
    """
    path = Path(path)
    processor = build_processor(patch_size=patch_size)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_vlm_config(processor, **config_overrides))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
