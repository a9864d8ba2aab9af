"""The toy vision world: rows whose answer the pixels hold, the verifier, cached teacher and student builds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from potstill.toy import vision

TINY = {"steps": 3, "batch_size": 4, "train_rows": 12, "hidden_size": 32, "heads": 2, "vision_width": 32, "vision_depth": 1}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _painted(data: bytes) -> np.ndarray:
    """[H, W] bool: the pixels that are not the white background."""
    return (_pixels(data) != 255).any(axis=2)


def test_rows_are_reproducible_and_the_eval_split_is_drawn_apart():
    assert vision.make_rows(9, seed=1) == vision.make_rows(9, seed=1)
    assert vision.make_rows(9, seed=1) != vision.make_rows(9, seed=2)
    assert vision.make_rows(9, seed=1) != vision.make_rows(9, seed=1, split="eval")
    with pytest.raises(ValueError, match="unknown vision task"):
        vision.make_rows(3, tasks=("reading",))


def test_every_task_asks_the_same_words_so_only_the_pixels_tell_the_answer():
    rows = vision.make_rows(300, seed=0)
    for task in vision.TASKS:
        asked = [row for row in rows if row["task"] == task]
        assert {row["prompt"] for row in asked} == {vision.QUESTIONS[task]}
        answers = [row["answer"] for row in asked]
        assert len(set(answers)) == 4 and max(map(answers.count, set(answers))) / len(answers) < 0.4  # near-uniform: chance 1 in 4


def test_a_count_image_holds_that_many_squares_of_one_colour():
    for row in vision.make_rows(40, seed=3, tasks=("count",)):
        painted = _painted(row["images"][0])
        cells = painted.reshape(4, vision.CELL, 4, vision.CELL).all(axis=(1, 3))  # each 7x7 cell wholly painted
        assert cells.sum() == int(row["answer"]) == painted.sum() // vision.CELL**2
        assert len({tuple(p) for p in _pixels(row["images"][0])[painted]}) == 1


def test_a_colour_image_holds_one_square_of_the_answer_colour():
    for row in vision.make_rows(20, seed=4, tasks=("colour",)):
        pixels = _pixels(row["images"][0])
        assert {tuple(p) for p in pixels[_painted(row["images"][0])]} == {vision.COLOURS[row["answer"]]}


def test_the_bar_moves_the_way_the_answer_says_and_one_frame_never_tells_which():
    starts: dict[str, set[int]] = {}
    for row in vision.make_rows(200, seed=5, tasks=("motion",)):
        first, second = (_painted(frame) for frame in row["video"])
        dx, dy = vision.DIRECTIONS[row["answer"]]
        axis = 0 if dx else 1  # columns move for left/right, rows for up/down
        position = [np.flatnonzero(frame.any(axis=axis)).min() for frame in (first, second)]
        assert position[1] - position[0] == (dx or dy) * vision.MOTION_STEP
        starts.setdefault(row["answer"], set()).add(int(position[0]))
    assert starts["left"] & starts["right"] and starts["up"] & starts["down"]


def test_the_verifier_wants_the_exact_answer():
    assert vision.verify(" 3 ", "3") and vision.verify("red", "red")
    assert not vision.verify("3 squares", "3") and not vision.verify("re", "red")


def test_parquet_rows_keep_the_media(tmp_path):
    import pyarrow.parquet as pq

    rows = vision.make_rows(3)
    table = pq.read_table(vision.write_parquet(rows, tmp_path / "rows.parquet")).to_pylist()
    assert [row["images"] for row in table] == [row.get("images") for row in rows]
    assert table[2]["video"] == rows[2]["video"] and table[2]["answer"] == rows[2]["answer"]


def test_teacher_and_student_builds_are_cached_and_the_student_is_smaller(tmp_path):
    teacher = vision.build_vision_teacher(tmp_path, **TINY)
    marker = (teacher / "potstill-toy.json").read_text()
    assert vision.build_vision_teacher(tmp_path, **TINY) == teacher and (teacher / "potstill-toy.json").read_text() == marker
    assert vision.build_vision_teacher(tmp_path, **{**TINY, "steps": 4}) == teacher and (teacher / "potstill-toy.json").read_text() != marker
    student = vision.build_vision_student(tmp_path)
    model, processor = vision.load(student)
    size = sum(p.numel() for p in model.parameters())
    full_teacher = vision.vlm.build_tiny_vlm(tmp_path / "full", patch_size=vision.PATCH, **vision.TEACHER.model_config())
    assert size < sum(p.numel() for p in vision.load(full_teacher)[0].parameters())
    assert 0.0 <= vision.accuracy(model, processor, vision.make_rows(6, split="eval")) <= 1.0
