"""Vision-language models: detecting them and loading their processor.

A processor turns a prompt text holding one placeholder per image or video (`<|image_pad|>`,
`<|video_pad|>` in Qwen2-VL) plus the decoded pictures into model inputs: the token ids, with
each placeholder repeated once per visual token, and the pixel tensors (`pixel_values`,
`image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `mm_token_type_ids`). Teacher and
student use the same `load_processor`, so both see the same inputs for the same media.

`AutoProcessor` is used where it loads (the toy Qwen2-VL's processor is registered with it by
`potstill.toy.vlm`). A Qwen2-VL checkpoint's own processor cannot be built where torchvision is
missing (its video processor needs it); there the toy processor stands in, with the checkpoint's
tokenizer and image processor (PIL backend) and videos patched in numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

# Model types whose processor `ToyQwen2VLProcessor` reproduces (same tokens, same patch layout).
QWEN2_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def is_vision_model(path: str | Path) -> bool:
    """Whether the model at `path` takes pixels (its config has a vision tower)."""
    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None


def load_processor(path: str | Path) -> Any:
    """The model's processor: `AutoProcessor`'s, or for Qwen2-VL without torchvision the toy one."""
    # Imported here: transformers' processor modules take seconds to import, which a text model's start should not pay.
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from potstill.toy.vlm import ToyQwen2VLProcessor  # importing it registers it with AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, OSError, TypeError, ValueError):  # transformers' video processors without torchvision
        if AutoConfig.from_pretrained(path).model_type not in QWEN2_VL_TYPES:
            raise
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ToyQwen2VLProcessor(AutoImageProcessor.from_pretrained(path, backend="pil"), tokenizer, chat_template=tokenizer.chat_template)
