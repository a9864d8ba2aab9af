"""Rows with images and video in the trainer: reading them, the student's pixels, the teacher's parts."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from potstill.toy import vision, vlm
from trainer_client.config import TrainConfig
from trainer_client.data import Row, load_rows
from trainer_client.media import decode_picture, share_media, teacher_messages
from trainer_client.samples import Candidate, StudentTokens
from trainer_client.student_loss import collate, weighted_loss_sum
from trainer_client.student_model import load_model, load_processor, load_tokenizer


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vlm")
    return str(vlm.build_tiny_vlm(path, patch_size=vision.PATCH, hidden_size=32, heads=2, vision_width=32, vision_depth=1))


@pytest.fixture(scope="module")
def tokens(student) -> StudentTokens:
    return StudentTokens(load_tokenizer(student), 64, load_processor(student))


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return [Row(**row) for row in vision.make_rows(3, seed=1)]  # count, colour (images), motion (video)


def test_parquet_rows_carry_media_bytes(tmp_path):
    written = vision.make_rows(4, seed=2)
    loaded = load_rows(vision.write_parquet(written, tmp_path / "rows.parquet")).rows
    assert [row.images for row in loaded] == [row.get("images") for row in written]
    assert [row.video for row in loaded] == [row.get("video") for row in written]
    assert loaded[2].has_media and loaded[2].images is None and len(loaded[2].video) == vision.MOTION_FRAMES


def test_media_items_are_paths_or_bytes_and_bad_ones_are_named(tmp_path):
    png = vision.make_rows(1)[0]["images"][0]
    (tmp_path / "a.png").write_bytes(png)
    assert np.array_equal(np.asarray(decode_picture(str(tmp_path / "a.png"), "images[0]")), np.asarray(decode_picture(png, "images[0]")))
    with pytest.raises(ValueError, match=r"images\[1\]: not a readable image \(5 bytes\)"):
        decode_picture(b"hello", "images[1]")
    with pytest.raises(ValueError, match="video"):
        Row(prompt="p", video=[])


def test_the_student_prompt_expands_the_placeholders_and_carries_the_pixels(tokens, rows):
    image_row, _, video_row = rows
    ids, media = tokens.row_prompt(image_row)
    processor = tokens.processor
    assert ids.count(processor.image_token_id) == 4  # 28 px / 7 px patches, merged 2x2
    assert media.tensors["image_grid_thw"].tolist() == [[1, 4, 4]] and media.tensors["pixel_values"].shape[0] == 16
    assert media.token_types == [int(i == processor.image_token_id) for i in ids]
    ids, media = tokens.row_prompt(video_row)
    assert ids.count(processor.video_token_id) == 4 and media.tensors["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert tokens.tokenizer.decode(ids).endswith(video_row.prompt + "<|assistant|>")


def test_a_text_only_student_refuses_media_rows(tiny_model_dir, rows):
    with pytest.raises(ValueError, match="text-only model"):
        StudentTokens(load_tokenizer(tiny_model_dir), 64).row_prompt(rows[0])


def test_a_media_prompt_is_never_cut(tokens, rows):
    group = tokens.group(rows[0])
    short = StudentTokens(tokens.tokenizer, len(group.prompt_ids), tokens.processor)
    with pytest.raises(ValueError, match="raise --max-seq-len"):
        group.fit(short, [1, 2])
    assert group.fit(StudentTokens(tokens.tokenizer, len(group.prompt_ids) + 1, tokens.processor), [1, 2]) == (group.prompt_ids, [1])


def test_the_batched_loss_is_each_rows_own_forward_pass(student, tokens, rows):
    """Rows with an image, without media and with a video in one right-padded batch: the summed CE
    at the completion positions equals the sum of each row's forward pass alone."""
    model = load_model(student).eval()
    mixed = [rows[0], Row(prompt="How many squares?", completion="2"), rows[2]]
    examples = [e for row in mixed for e in tokens.group(row, [Candidate(tokens.target(row.completion), row.completion, "ref")]).examples(tokens)]
    config = TrainConfig(student=student, data="unused.jsonl", method="sft")
    with torch.no_grad():
        together, _ = weighted_loss_sum(model, model, collate(examples, tokens.tokenizer.pad_token_id), config)
        alone = sum(weighted_loss_sum(model, model, collate([e], tokens.tokenizer.pad_token_id), config)[0] for e in examples)
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)


def test_teachers_get_the_media_as_data_url_parts(tmp_path, rows):
    image_row, _, video_row = rows
    (tmp_path / "frame.png").write_bytes(video_row.video[0])
    [turn] = teacher_messages(image_row)
    image, text = turn["content"]
    assert turn["role"] == "user" and text == {"type": "text", "text": image_row.prompt}
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["image_url"]["url"].partition(",")[2]) == image_row.images[0]
    from_path = Row(prompt="p", video=[str(tmp_path / "frame.png"), video_row.video[1]])
    frames = teacher_messages(from_path)[0]["content"][0]["video_url"]["frames"]
    assert [base64.b64decode(f.partition(",")[2]) for f in frames] == video_row.video
    chat = Row(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                         {"role": "user", "content": "and this?"}], images=image_row.images)
    turns = teacher_messages(chat)
    assert turns[:2] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert [part["type"] for part in turns[2]["content"]] == ["image_url", "text"]


def test_pictures_decode_to_what_was_drawn(rows):
    image = Image.open(io.BytesIO(rows[1].images[0])).convert("RGB")
    colours = {tuple(int(c) for c in pixel) for pixel in np.asarray(image).reshape(-1, 3)}
    assert colours == {(255, 255, 255), vision.COLOURS[rows[1].answer]}


def test_a_request_sends_each_picture_once(rows):
    image_row, _, video_row = rows
    image_turns, video_turns = teacher_messages(image_row), teacher_messages(video_row)
    request = {"sequences": [{"prompt": image_turns, "completion": c} for c in ("1", "2")]
               + [{"prompt": video_turns, "completion": "up"}, {"prompt": [1, 2], "completion": "x"}], "top_logprobs": 3}
    shared = share_media(request, "sequences")
    image_url = image_turns[0]["content"][0]["image_url"]["url"]
    frames = video_turns[0]["content"][0]["video_url"]["frames"]
    assert shared["media"] == [image_url, *frames] and shared["top_logprobs"] == 3
    assert [s["prompt"][0]["content"][0] for s in shared["sequences"][:3]] == [
        {"type": "image_url", "image_url": {"url": "media:0"}}, {"type": "image_url", "image_url": {"url": "media:0"}},
        {"type": "video_url", "video_url": {"frames": ["media:1", "media:2"]}}]
    assert shared["sequences"][3] == request["sequences"][3] and request["sequences"][0]["prompt"] == image_turns  # no change in place
    generate = share_media({"prompts": [image_turns, image_turns, "text"], "n": 2}, "prompts")
    assert generate["media"] == [image_url] and generate["prompts"][2] == "text"
    assert share_media({"prompts": ["text"]}, "prompts") == {"prompts": ["text"]}
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///data/a.png"}}]}]
    assert share_media({"prompts": [local]}, "prompts") == {"prompts": [local]}  # only data: URLs move


def test_requests_are_split_within_the_teachers_media_limits(rows):
    from teacher_service.protocol import ModelInfo
    from trainer_client.pool import _within_limits

    info = ModelInfo(model="m", backend="hf", vocab_size=1, max_model_len=8, max_top_logprobs=1, max_samples=1, max_new_tokens=1,
                     tokenizer_fingerprint="", eos_token_id=0, max_batch=0, accepts_media=True, max_images=2, max_videos=1)
    count_a, colour, motion = (teacher_messages(row) for row in rows)
    count_b = teacher_messages(Row(**vision.make_rows(4, seed=9)[3]))  # another count image
    prompts = [count_a, count_a, colour, count_b, motion, motion, "text"]
    runs = _within_limits(prompts, "prompts", info)
    assert runs == [[count_a, count_a, colour], [count_b, motion, motion, "text"]]  # the same picture twice counts once
    assert _within_limits(prompts, "prompts", info.model_copy(update={"max_images": 0, "max_videos": 0, "max_batch": 3})) == [
        prompts[:3], prompts[3:6], prompts[6:]]
