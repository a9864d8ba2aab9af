"""Synthetic verifiable tasks: multi-digit addition and subtraction.

A row is `{"prompt": "37+45=", "completion": "082", "answer": "082"}`. The prompt is plain text (no
chat template), so a teacher scores `prompt + completion` directly, and the completion is the
answer and nothing else: models learn to emit EOS right after it.

Rules that keep the task clean:
- Every operand has exactly `digits` digits (0-9 when `digits` is 1): digit positions line up
  from one prompt to the next, which tiny models learn much faster than ragged operands.
- Answers are zero-padded to a fixed width (digits + 1 for addition, digits for subtraction), so
  each answer digit sits at a fixed distance from the operand digits that decide it. A 96-wide
  student after 1000 steps of batch 128 reached 57-100% over four seeds with ragged answers and
  96-99% over three with padded ones. The integer verifier reads "082" as 82: "82" is right too.
- Subtraction puts the larger operand first, so answers are never negative. A leading "-" would
  merge with the "=" into one BPE token, and `prompt + completion` would no longer tokenize as the
  prompt's tokens followed by the completion's.
- Train and eval are a hash split of the prompt itself, so they never overlap, whatever the seeds.
- Everything is deterministic given the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from trainer_client.verifiers import verify_integer as verify  # the task's verifier, one copy

OPS = ("+", "-")
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1  # of all problems: 2-digit add+sub holds out ~1,200 of ~12,200


def is_held_out(prompt: str) -> bool:
    """True when the problem belongs to the eval split (a fixed hash of the prompt decides)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64


def _problem(rng: random.Random, op: str, digits: int) -> tuple[str, str]:
    """A random prompt for `op` and its answer (zero-padded to the op's width)."""
    low = 10 ** (digits - 1) if digits > 1 else 0
    a, b = rng.randrange(low, 10**digits), rng.randrange(low, 10**digits)
    if op == "-":
        a, b = max(a, b), min(a, b)  # never a negative answer (see the module docstring)
    if op == "+":
        return f"{a}+{b}=", str(a + b).zfill(digits + 1)
    return f"{a}-{b}=", str(a - b).zfill(digits)


def corrupt(answer: str, rng: random.Random) -> str:
    """The answer with one digit, chosen at random, replaced by a different digit."""
    position = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[position]])
    return answer[:position] + digit + answer[position + 1 :]


def _check_arguments(ops: tuple[str, ...], digits: int, split: str, wrong_rate: float) -> None:
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    if not 1 <= digits <= 9:
        raise ValueError(f"digits must be between 1 and 9, got {digits}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= wrong_rate <= 1.0:
        raise ValueError(f"wrong_rate must be in [0, 1], got {wrong_rate}")


def make_rows(
    n: int,
    seed: int,
    ops: tuple[str, ...] = OPS,
    digits: int = 2,
    split: str = "train",
    wrong_rate: float = 0.0,
) -> list[dict]:
    """`n` rows of `split`, each problem drawn independently (so a large `n` repeats problems).

    With `wrong_rate` > 0 each row's completion is, with that probability, the answer with one
    digit changed (`corrupt`), while `answer` stays the true result: noisy training data for a
    teacher whose samples are wrong at about that rate, and the rate is checkable with `verify`.
    """
    _check_arguments(tuple(ops), digits, split, wrong_rate)
    rng = random.Random(f"{seed}/{split}")  # the same seed gives unrelated streams per split
    rows = []
    while len(rows) < n:
        prompt, answer = _problem(rng, rng.choice(ops), digits)
        if is_held_out(prompt) != (split == "eval"):
            continue
        completion = corrupt(answer, rng) if rng.random() < wrong_rate else answer
        rows.append({"prompt": prompt, "completion": completion, "answer": answer})
    return rows


# How the toy judge is asked whether `completion` answers `prompt`; the same text is the default
# rubric of `--judge` (TrainConfig.judge_rubrics), so the toy judge is used exactly as trained.
JUDGE_RUBRIC = "{prompt}{completion} right?"
JUDGE_YES, JUDGE_NO = " yes", " no"


def make_judge_rows(n: int, seed: int, ops: tuple[str, ...] = OPS, digits: int = 2, split: str = "train") -> list[dict]:
    """`n` judge rows: JUDGE_RUBRIC on a problem and a proposed answer, right or (with one digit
    changed) wrong with equal odds; the completion is JUDGE_YES or JUDGE_NO accordingly."""
    rng = random.Random(f"judge/{seed}")
    rows = []
    for row in make_rows(n, seed, ops, digits, split):
        right = rng.random() < 0.5
        proposed = row["answer"] if right else corrupt(row["answer"], rng)
        rows.append({"prompt": JUDGE_RUBRIC.format(prompt=row["prompt"], completion=proposed),
                     "completion": JUDGE_YES if right else JUDGE_NO, "answer": row["answer"]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line (the project's data format); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
