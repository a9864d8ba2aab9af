"""A tiny untrained Qwen2-VL with its tokenizer and image processor, saved like a hub model (tests only)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from potstill.toy.tokenizer import build_tokenizer

MEDIA_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The toy chat template, with Qwen2-VL's rendering of image and video parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% else %}<|user|>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_vlm(path: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MEDIA_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                   tokenizer.convert_tokens_to_ids(MEDIA_TOKENS)))
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, spatial_merge_size=2, temporal_patch_size=2),
        **ids,
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    return path


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), square_at: int | None = None) -> bytes:
    """PNG bytes of a plain picture, with a white 8-pixel square at x = `square_at` when given."""
    image = Image.new("RGB", size, color)
    if square_at is not None:
        image.paste((255, 255, 255), (square_at, 4, square_at + 8, 12))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
