"""The toy vision world: pictures and frame sequences whose answer only the pixels hold.

Three tasks, each asked with the same words every time, so a model that does not look answers at
chance (1 in 4):
- count: 1-4 squares of one colour, each filling its own cell of a 4×4 grid; "How many squares?" -> "3".
- colour: one square in a random cell; "What colour is the square?" -> "red" | "green" | "blue" | "yellow".
- motion: a video of 2 frames where a bar across the image moves 3 px (upright for left/right,
  lying for up/down); "Which way does the bar move?" -> "left" | "right" | "up" | "down". Start
  positions of opposite directions overlap, so one frame tells the axis at most, never the way.
Images are 28×28 RGB PNGs (bytes): with 7-px patches merged 2×2, an image is 4 tokens, and so is
a 2-frame video (Qwen2-VL joins 2 frames into one temporal patch).

Rows are dicts as the trainer reads them: `prompt`, `completion`, `answer`, `task`, and `images`
(a list of PNG bytes) or `video` (a list of PNG frames). A model sees a row as one user turn of
its chat template: the media parts first, then the question (as the trainer renders rows with
media, `trainer_client.media`), and the teacher is trained on the trainer's own encoding.

`build_vision_teacher` trains a tiny Qwen2-VL on it (cached like the text world's teachers: a
marker written last, a build lock); `build_vision_student` saves a smaller one untrained.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from potstill.toy import vlm
from potstill.toy.world import _build_lock, _is_cached, _start_fresh, _write_marker, fit
from trainer_client import evaluation
from trainer_client.data import Row
from trainer_client.samples import Example, StudentTokens
from trainer_client.student_loss import collate
from trainer_client.verifiers import verify_exact

SIZE, CELL = 28, 7  # image side and grid cell (= patch, = square) side, in pixels
CELLS = (SIZE // CELL) ** 2
MOTION_BAR, MOTION_STEP, MOTION_FRAMES = 4, 3, 2  # bar thickness, pixels moved per frame, frames
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = {
    "count": "How many squares?",
    "colour": "What colour is the square?",
    "motion": "Which way does the bar move?",
}
TASKS = tuple(QUESTIONS)
CHANCE = 0.25  # every task has four answers, drawn uniformly
ANSWER_TOKENS = 6  # the longest answer ("right") is 5 tokens of the toy tokenizer, then EOS


def verify(completion: str, answer: str) -> bool:
    """The trainer's `exact` verifier: the stripped completion is the answer."""
    return verify_exact(completion, answer)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    return image, ImageDraw.Draw(image)


def _squares_in_cells(cells: list[int], colour: str) -> Image.Image:
    """Squares of `colour` filling the given cells of the 4×4 grid."""
    image, draw = _canvas()
    for cell in cells:
        x, y = cell % (SIZE // CELL) * CELL, cell // (SIZE // CELL) * CELL
        draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=COLOURS[colour])
    return image


def _count_row(rng: random.Random) -> dict:
    count = rng.randint(1, 4)
    cells = rng.sample(range(CELLS), count)
    return {"images": [_png(_squares_in_cells(cells, rng.choice(list(COLOURS))))], "answer": str(count)}


def _colour_row(rng: random.Random) -> dict:
    colour = rng.choice(list(COLOURS))
    return {"images": [_png(_squares_in_cells([rng.randrange(CELLS)], colour))], "answer": colour}


def _motion_row(rng: random.Random) -> dict:
    """A bar across the image moving `MOTION_STEP` px a frame: upright for left/right, lying for up/down."""
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    delta = dx or dy  # -1 or +1 along the axis of motion
    travel = MOTION_STEP * (MOTION_FRAMES - 1)
    start = rng.randint(max(0, -delta * travel), SIZE - MOTION_BAR - max(0, delta * travel))  # the path stays inside
    colour = COLOURS[rng.choice(list(COLOURS))]
    frames = []
    for t in range(MOTION_FRAMES):
        image, draw = _canvas()
        at = start + delta * MOTION_STEP * t
        box = [at, 0, at + MOTION_BAR - 1, SIZE - 1] if dx else [0, at, SIZE - 1, at + MOTION_BAR - 1]
        draw.rectangle(box, fill=colour)
        frames.append(_png(image))
    return {"video": frames, "answer": direction}


DRAW = {"count": _count_row, "colour": _colour_row, "motion": _motion_row}


def make_rows(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, split: str = "train") -> list[dict]:
    """`n` rows, tasks in turn, drawn from a generator seeded by (seed, split): reproducible, and
    the eval split is drawn apart from the training one."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown vision task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"vision:{seed}:{split}")
    rows = []
    for index in range(n):
        task = tasks[index % len(tasks)]
        drawn = DRAW[task](rng)
        rows.append({"prompt": QUESTIONS[task], "completion": drawn["answer"], "task": task, **drawn})
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """The rows as a Parquet file (media as binary columns), as `potstill train --data` reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([*((name, pa.string()) for name in ("prompt", "completion", "answer", "task")),
                        *((name, pa.list_(pa.binary())) for name in ("images", "video"))])
    pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in schema.names}, schema=schema), path)
    return path


# --- what a model sees ---


def student_tokens(processor, max_seq_len: int = 128) -> StudentTokens:
    """How the trainer encodes rows for this model: the teacher learns from exactly that encoding."""
    return StudentTokens(processor.tokenizer, max_seq_len, processor)


def accuracy(model, processor, rows: list[dict]) -> float:
    """The share of rows whose greedy answer verifies (the trainer's own evaluation)."""
    return evaluation.accuracy(model, student_tokens(processor), [Row(**row) for row in rows], verify, max_new_tokens=ANSWER_TOKENS)


def load(path: str | Path):
    """(model in float32 on the CPU, processor) saved under `path`."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)


# --- building the teacher and the student ---


@dataclass(frozen=True)
class VisionSpec:
    """A toy vision model's size and, for a teacher, its training budget."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vision_width: int = 64
    vision_depth: int = 2
    steps: int = 1200  # each task sits at chance for its first ~200-300 steps, then is learnt within ~100
    batch_size: int = 32
    lr: float = 1e-3  # 2e-3 and 3e-3 left the colour task at chance after 200-300 steps
    train_rows: int = 4000

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.train_rows) < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size, train_rows and lr must be positive")

    def model_config(self) -> dict:
        return {"hidden_size": self.hidden_size, "layers": self.layers, "heads": self.heads,
                "vision_width": self.vision_width, "vision_depth": self.vision_depth}


TEACHER = VisionSpec()
STUDENT = VisionSpec(hidden_size=48, layers=2, heads=4, vision_width=32, vision_depth=1)
PATCH = 7


def build_vision_teacher(
    cache_dir: str | Path, seed: int = 0, on_step: Callable[[int, float], None] | None = None, **overrides
) -> Path:
    """Train the toy vision teacher (`TEACHER`, fields replaced by `overrides`) under `cache_dir/vision-teacher`."""
    spec = replace(TEACHER, **overrides)
    path = Path(cache_dir) / "vision-teacher"
    recipe = {"vision_teacher": asdict(spec), "seed": seed}
    with _build_lock(path):
        if _is_cached(path, recipe):
            return path
        _start_fresh(path)
        vlm.build_tiny_vlm(path, seed, patch_size=PATCH, **spec.model_config())
        model, processor = load(path)
        rows = make_rows(spec.train_rows, seed)
        losses = train_vision(model, processor, rows, spec, seed, on_step)
        model.save_pretrained(path)
        _write_marker(path, {**recipe, "final_loss": sum(losses[-20:]) / len(losses[-20:])})
    return path


def build_vision_student(cache_dir: str | Path, seed: int = 0) -> Path:
    """Save the untrained toy vision student (`STUDENT`'s size) under `cache_dir/vision-student`."""
    path = Path(cache_dir) / "vision-student"
    recipe = {"vision_student": STUDENT.model_config(), "seed": seed}
    with _build_lock(path):
        if not _is_cached(path, recipe):
            _start_fresh(path)
            vlm.build_tiny_vlm(path, seed, patch_size=PATCH, **STUDENT.model_config())
            _write_marker(path, recipe)
    return path


def _example(tokens: StudentTokens, row: dict) -> Example:
    prompt_ids, media = tokens.row_prompt(Row(**row))
    return Example(prompt_ids, tokens.target(row["completion"]), media=media)


def train_vision(
    model, processor, rows: list[dict], spec: VisionSpec, seed: int = 0, on_step: Callable[[int, float], None] | None = None
) -> list[float]:
    """Supervised training on the rows' completions (AdamW, warmup + cosine), random batches seeded by `seed`.

    Rows are encoded once, as the trainer encodes them (`student_tokens`): prompt ids with the
    placeholders expanded, pixels, and the completion closed by EOS.
    """
    tokens = student_tokens(processor)
    examples = [_example(tokens, row) for row in rows]
    generator = random.Random(seed)

    def step_loss() -> torch.Tensor:
        batch = collate(generator.sample(examples, min(spec.batch_size, len(examples))), processor.tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.media).logits[:, :-1]
        return F.cross_entropy(logits[batch.target_mask], batch.labels[batch.target_mask])

    losses = fit(model, spec.steps, spec.lr, min(50, spec.steps // 10 + 1), step_loss, on_step)
    model.eval()
    return losses
