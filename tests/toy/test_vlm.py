"""The tiny Qwen2-VL: saved with save_pretrained, loaded with the Auto classes, images and videos in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from potstill.toy.vlm import IMAGE_PAD, VIDEO_PAD, ToyQwen2VLProcessor, build_tiny_vlm


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("vlm"), hidden_size=32, heads=2, vision_width=32, vision_depth=1)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _square(colour: str, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    return image


def _prompt(processor, kind: str) -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "what colour?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_the_auto_classes_load_the_toy_processor_and_model(vlm):
    model, processor = vlm
    assert isinstance(processor, ToyQwen2VLProcessor)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert model.config.video_token_id == processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)


def test_an_image_expands_to_one_token_per_merged_patch_and_changes_the_logits(vlm):
    model, processor = vlm
    text = _prompt(processor, "image")
    red, blue = (processor(text=[text], images=[_square(c)], return_tensors="pt") for c in ("red", "blue"))
    assert red["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 px / 14 px patches
    assert (red["input_ids"] == model.config.image_token_id).sum() == 4  # 4×4 patches merged 2×2
    with torch.no_grad():
        assert not torch.allclose(model(**red).logits[0, -1], model(**blue).logits[0, -1])


def test_a_video_of_one_repeated_frame_is_patched_as_that_image(vlm):
    _, processor = vlm
    image = _square("green")
    as_image = processor(text=[_prompt(processor, "image")], images=[image], return_tensors="pt")
    as_video = processor(text=[_prompt(processor, "video")], videos=[[image, image]], return_tensors="pt")
    assert as_video["video_grid_thw"].tolist() == as_image["image_grid_thw"].tolist()
    np.testing.assert_allclose(as_video["pixel_values_videos"], as_image["pixel_values"], atol=1e-5)


def test_videos_are_batched_with_an_odd_frame_count_padded(vlm):
    model, processor = vlm
    text = _prompt(processor, "video")
    frames = [_square(c) for c in ("red", "green", "blue")]
    batch = processor(text=[text, text], videos=[frames, frames[:2]], padding=True, return_tensors="pt")
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]  # 3 frames padded to 4
    assert (batch["input_ids"] == model.config.video_token_id).sum(dim=1).tolist() == [8, 4]
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
