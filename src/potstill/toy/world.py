"""The toy world: teachers trained on the CPU for the arithmetic task, and a smaller student.

Every model is a tiny Llama saved in Hugging Face format with its tokenizer, so the teacher
service and the trainer load it with `AutoModelForCausalLM.from_pretrained`. Builds are cached:
`cache_dir/<name>` is reused when its marker file, written last, records the same spec and seed.
A build holds a file lock (`cache_dir/<name>/.build.lock`), so two demos or test runs sharing a cache
wait for each other instead of one rebuilding the other's half-written model.
A teacher learns by plain supervised training on `prompt + completion + EOS` with the loss on the
completion tokens only; the student is left untrained, for distillation to teach.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from potstill.toy.arithmetic import make_judge_rows, make_rows
from potstill.toy.models import build_tiny_model

MARKER = "potstill-toy.json"  # written last: its presence means the folder is complete
IGNORE_INDEX = -100  # labels the loss skips (prompt and padding)


@dataclass(frozen=True)
class TeacherSpec:
    """What a toy teacher is trained on, its size and its training budget."""

    description: str
    ops: tuple[str, ...] = ("+", "-")
    digits: int = 2
    wrong_rate: float = 0.0  # the share of training completions with a wrong answer
    judge: bool = False  # trained to answer JUDGE_RUBRIC with " yes" / " no" instead of solving
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 1500
    batch_size: int = 128  # batches of 32 learned several times slower per example
    lr: float = 1e-3  # 2e-3 sometimes stalls a 128-wide model
    train_rows: int = 50_000  # draws from ~11,000 train problems: nearly all of them

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.train_rows) < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size, train_rows and lr must be positive")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads {self.heads}")


TEACHER_SPECS: dict[str, TeacherSpec] = {
    "arith": TeacherSpec("the main teacher: 2-digit addition and subtraction"),
    "add-only": TeacherSpec("a specialist trained on addition only", ops=("+",)),
    "sub-only": TeacherSpec("a specialist trained on subtraction only", ops=("-",)),
    "noisy": TeacherSpec(
        "trained on add+sub data whose answers are wrong 30% of the time", wrong_rate=0.3
    ),
    "noisy-50": TeacherSpec(
        "trained on add+sub data whose answers are wrong 50% of the time", wrong_rate=0.5
    ),
    "judge": TeacherSpec(
        "a judge: says whether a proposed answer to an add+sub problem is right (JUDGE_RUBRIC)", judge=True
    ),
}

# Smaller than every teacher (332k parameters against 574k), so distillation has a gap to close.
# 64-wide students learned the task too, but only for some seeds within 1000 steps (61-99%).
STUDENT_CONFIG = {"hidden_size": 96, "layers": 2, "heads": 4}

# A training budget the student meets: `train_supervised` on ground-truth rows with these settings
# reached 96-98% held-out accuracy after 1000 steps (76-88% after 500) for seeds 0-2; batches of
# 32 or 64 stayed under 20% after 1000 steps.
STUDENT_SFT = {"steps": 1000, "batch_size": 128, "lr": 1.5e-3}


def build_teacher(
    name: str, cache_dir: str | Path, seed: int = 0, on_step: Callable[[int, float], None] | None = None, **overrides
) -> Path:
    """Train the teacher `TEACHER_SPECS[name]` (fields replaced by `overrides`); returns its folder.

    Reuses `cache_dir/name` when a previous build with the same spec and seed completed there;
    `on_step(step, loss)` follows a build that does train (its total is `teacher_spec(...).steps`).
    """
    spec = teacher_spec(name, **overrides)
    path = Path(cache_dir) / name
    recipe = {"teacher": name, "seed": seed, **asdict(spec)}
    with _build_lock(path):
        if _is_cached(path, recipe):
            return path
        _start_fresh(path)
        build_tiny_model(path, seed, hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads)
        model, tokenizer = load(path)
        if spec.judge:
            rows = make_judge_rows(spec.train_rows, seed, spec.ops, spec.digits, "train")
        else:
            rows = make_rows(spec.train_rows, seed, spec.ops, spec.digits, "train", spec.wrong_rate)
        losses = train_supervised(model, tokenizer, rows, spec.steps, spec.batch_size, spec.lr, seed, on_step)
        model.save_pretrained(path)
        _write_marker(path, {**recipe, "final_loss": sum(losses[-50:]) / len(losses[-50:])})
    return path


def teacher_spec(name: str, **overrides) -> TeacherSpec:
    if name not in TEACHER_SPECS:
        raise ValueError(f"unknown teacher {name!r}; choose one of: {', '.join(TEACHER_SPECS)}")
    return replace(TEACHER_SPECS[name], **overrides)


def is_built(name: str, cache_dir: str | Path, seed: int = 0, **overrides) -> bool:
    """Whether `build_teacher` with these arguments would reuse a finished build."""
    recipe = {"teacher": name, "seed": seed, **asdict(teacher_spec(name, **overrides))}
    return _is_cached(Path(cache_dir) / name, recipe)


def build_student(cache_dir: str | Path, seed: int = 0) -> Path:
    """Save the randomly initialised student (`STUDENT_CONFIG`) under `cache_dir/student`."""
    path = Path(cache_dir) / "student"
    recipe = {"student": STUDENT_CONFIG, "seed": seed}
    with _build_lock(path):
        if not _is_cached(path, recipe):
            _start_fresh(path)
            build_tiny_model(path, seed, **STUDENT_CONFIG)
            _write_marker(path, recipe)
    return path


LOCK = ".build.lock"  # inside the build folder, kept when a build starts afresh


def _build_lock(path: Path) -> FileLock:
    """An exclusive lock on building `path` (shared by every process using this cache)."""
    path.mkdir(parents=True, exist_ok=True)
    return FileLock(path / LOCK)


def load(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, CPU) and tokenizer saved under `path`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _is_cached(path: Path, recipe: dict) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    return all(recorded.get(key) == _as_json(value) for key, value in recipe.items())


def _as_json(value):
    """The value as it reads back from JSON (tuples become lists), for comparing recipes."""
    return json.loads(json.dumps(value))


def _start_fresh(path: Path) -> None:
    """Remove an incomplete or outdated build (all but the lock held while building) before writing a new one."""
    for entry in path.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != LOCK:
            entry.unlink()


def _write_marker(path: Path, recipe: dict) -> None:
    (path / MARKER).write_text(json.dumps(recipe, indent=2) + "\n")


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask`, `labels` [n, max_len] for `prompt + completion + EOS`.

    Prompt and completion are tokenized separately and concatenated (as the teacher service does
    when scoring), right-padded; labels keep only the completion and EOS.
    """
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([row["completion"] for row in rows], add_special_tokens=False)["input_ids"]
    targets = [completion + [tokenizer.eos_token_id] for completion in completions]
    width = max(len(prompt) + len(target) for prompt, target in zip(prompts, targets))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        end = len(prompt) + len(target)
        input_ids[i, :end] = torch.tensor(prompt + target)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(target)
    return input_ids, attention_mask, labels


def _warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def train_supervised(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Next-token training on the rows' completions (AdamW, warmup + cosine); returns the losses.

    Each step draws a random batch of rows (seeded); `on_step(step, loss)` runs after every
    update. The model ends in the mode (train or eval) it started in.
    """
    tensors = [t.to(model.device) for t in encode_rows(tokenizer, rows)]  # input_ids, mask, labels
    generator = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        batch = torch.randint(len(rows), (batch_size,), generator=generator).to(model.device)
        input_ids, attention_mask, labels = (t[batch] for t in tensors)  # [batch_size, width] each
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    was_training = model.training
    losses = fit(model, steps, lr, min(100, steps // 10 + 1), step_loss, on_step)  # short runs (tests) still get a warmup
    model.train(was_training)
    return losses


def fit(
    model: torch.nn.Module, steps: int, lr: float, warmup: int, step_loss: Callable[[], torch.Tensor],
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """`steps` AdamW updates (betas 0.9 / 0.98, weight decay 0.01) of `step_loss()` under `warmup`
    steps then a cosine, the model in train mode; returns the losses. `on_step(step, loss)` runs
    after every update. The toy worlds' teachers and students are all trained by it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps, warmup))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = step_loss()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
