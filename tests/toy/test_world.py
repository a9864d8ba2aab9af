"""The toy world: arithmetic rows, verifiers, cached teacher/student builds and greedy evaluation.

Training here is deliberately tiny (a few dozen steps of a 32-wide model): the tests check the
mechanics, not the accuracy the full specs reach.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.toy import world
from potstill.toy.arithmetic import is_held_out, make_rows, verify, write_jsonl
from potstill.toy.models import build_tiny_model
from potstill.toy.tokenizer import build_tokenizer
from trainer_client.data import Row
from trainer_client.evaluation import accuracy
from trainer_client.samples import StudentTokens
from trainer_client.verifiers import VERIFIERS, get_verifier, verify_integer

TINY = {"steps": 20, "hidden_size": 32, "layers": 1, "heads": 2, "batch_size": 16, "train_rows": 200}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return world.build_teacher("arith", tmp_path_factory.mktemp("cache"), **TINY)


# --- rows --------------------------------------------------------------------------------------


def test_rows_are_deterministic_given_the_seed():
    assert make_rows(50, seed=3) == make_rows(50, seed=3)
    assert make_rows(50, seed=3) != make_rows(50, seed=4)


def test_train_and_eval_splits_never_share_a_problem():
    train = {row["prompt"] for row in make_rows(3000, seed=0)}
    held_out = {row["prompt"] for seed in (0, 1) for row in make_rows(300, seed, split="eval")}
    assert not train & held_out
    assert all(is_held_out(prompt) for prompt in held_out)
    assert not any(is_held_out(prompt) for prompt in train)


@pytest.mark.parametrize("ops", [("+",), ("-",), ("+", "-")])
def test_rows_follow_the_format(ops):
    for row in make_rows(200, seed=0, ops=ops, digits=2):
        a, op, b = row["prompt"][:2], row["prompt"][2], row["prompt"][3:5]
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert op in ops and row["prompt"].endswith("=")
        assert row["completion"] == row["answer"] == str(result).zfill(3 if op == "+" else 2)


def test_prompt_then_completion_tokenizes_like_the_joined_text(tokenizer):
    """The teacher service may score the joined text; training concatenates the two parts."""
    for row in make_rows(200, seed=0, digits=3):
        joined = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert joined == prompt + completion


@pytest.mark.parametrize(
    "arguments",
    [{"ops": ("*",)}, {"ops": ()}, {"digits": 0}, {"split": "test"}, {"wrong_rate": 1.5}],
)
def test_make_rows_rejects_bad_arguments(arguments):
    with pytest.raises(ValueError):
        make_rows(5, seed=0, **arguments)


def test_noisy_spec_data_is_wrong_at_the_stated_rate():
    rate = world.TEACHER_SPECS["noisy"].wrong_rate
    rows = make_rows(5000, seed=0, wrong_rate=rate)
    wrong = [row for row in rows if not verify(row["completion"], row["answer"])]
    assert len(wrong) / len(rows) == pytest.approx(rate, abs=0.03)
    for row in wrong:  # exactly one digit changed
        assert sum(x != y for x, y in zip(row["completion"], row["answer"])) == 1


def test_write_jsonl_writes_one_row_per_line(tmp_path):
    rows = make_rows(5, seed=0)
    path = write_jsonl(rows, tmp_path / "data" / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


# --- verifiers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("82", "82", True),
        (" 82\n", "82", True),
        ("082", "082", True),
        ("82", "082", True),
        ("82 because 37+45", "82", True),
        ("82", "83", False),
        ("8 2", "82", False),
        ("", "82", False),
        ("eighty-two", "82", False),
        ("-5", "-5", True),
        ("5", "-5", False),
    ],
)
def test_integer_verifier(completion, answer, expected):
    assert verify(completion, answer) is expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [("82", "82", True), (" 82 ", "82", True), ("082", "82", False), ("82.", "82", False)],
)
def test_exact_verifier(completion, answer, expected):
    assert get_verifier("exact")(completion, answer) is expected


def test_arithmetic_uses_the_registered_integer_verifier():
    assert verify is verify_integer is VERIFIERS["integer"]


def test_unknown_verifier_names_the_known_ones():
    with pytest.raises(ValueError, match="exact.*integer"):
        get_verifier("fuzzy")


# --- building and caching ----------------------------------------------------------------------


def test_short_training_lowers_the_loss(tmp_path, tokenizer):
    path = build_tiny_model(tmp_path, seed=0, hidden_size=32, layers=1, heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    rows = make_rows(200, seed=0)
    losses = world.train_supervised(model, tokenizer, rows, steps=40, batch_size=16, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_teacher_folder_loads_with_transformers(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    assert model.config.hidden_size == TINY["hidden_size"]
    assert len(tokenizer) == model.config.vocab_size
    recipe = json.loads((tiny_teacher / world.MARKER).read_text())
    assert recipe["teacher"] == "arith" and recipe["steps"] == TINY["steps"]


def test_cached_teacher_is_reused(tiny_teacher, monkeypatch):
    marker_time = (tiny_teacher / world.MARKER).stat().st_mtime_ns

    def retrain(*args, **kwargs):
        pytest.fail("the cached teacher was trained again")

    monkeypatch.setattr(world, "train_supervised", retrain)
    assert world.build_teacher("arith", tiny_teacher.parent, **TINY) == tiny_teacher
    assert (tiny_teacher / world.MARKER).stat().st_mtime_ns == marker_time


def test_incomplete_or_different_build_is_redone(tmp_path):
    path = world.build_teacher("add-only", tmp_path, **{**TINY, "steps": 2})
    (path / world.MARKER).unlink()  # as if the build had been interrupted
    world.build_teacher("add-only", tmp_path, **{**TINY, "steps": 2})
    assert json.loads((path / world.MARKER).read_text())["steps"] == 2
    world.build_teacher("add-only", tmp_path, **{**TINY, "steps": 3})
    assert json.loads((path / world.MARKER).read_text())["steps"] == 3


def test_two_builds_at_once_train_once_and_both_get_the_finished_teacher(tmp_path):
    """Two demos sharing a cache: the second waits on the lock, then reuses the first's build."""
    steps_seen: list[int] = []
    results: list[Path] = []

    def build() -> None:
        results.append(world.build_teacher("arith", tmp_path, on_step=lambda step, loss: steps_seen.append(step), **TINY))

    builders = [threading.Thread(target=build) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert results == [tmp_path / "arith"] * 2
    assert steps_seen == list(range(1, TINY["steps"] + 1))  # one build, not two interleaved
    assert world.is_built("arith", tmp_path, **TINY)
    AutoModelForCausalLM.from_pretrained(tmp_path / "arith")


def test_unknown_teacher_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="arith"):
        world.build_teacher("oracle", tmp_path)


def test_student_is_smaller_than_every_teacher_and_shares_the_tokenizer(tmp_path, tiny_teacher):
    path = world.build_student(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(path)
    assert all(student.config.hidden_size < spec.hidden_size for spec in world.TEACHER_SPECS.values())
    teacher_vocab = AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    assert AutoTokenizer.from_pretrained(path).get_vocab() == teacher_vocab
    assert world.build_student(tmp_path) == path and (path / world.MARKER).is_file()


# --- evaluation --------------------------------------------------------------------------------


def _accuracy(model, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    return accuracy(model, StudentTokens(tokenizer, 512), [Row(**row) for row in rows], verify, max_new_tokens=8, batch_size=batch_size)


def test_untrained_model_gets_nothing_right(tmp_path):
    model, tokenizer = world.load(world.build_student(tmp_path))
    assert _accuracy(model, tokenizer, make_rows(200, seed=0, split="eval")) == 0.0


def test_accuracy_matches_a_hand_count(tmp_path, tokenizer):
    """A model that memorised six rows of two prompt lengths (so batches are left-padded)."""
    rows = make_rows(3, seed=0, digits=1) + make_rows(3, seed=0, digits=2)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, seed=0, hidden_size=64, layers=2))
    world.train_supervised(model, tokenizer, rows, steps=150, batch_size=6, lr=3e-3)
    assert _accuracy(model, tokenizer, rows, batch_size=4) == 1.0
    two_wrong = [{**row, "answer": "999"} if i in (1, 4) else row for i, row in enumerate(rows)]
    assert _accuracy(model, tokenizer, two_wrong, batch_size=4) == pytest.approx(4 / 6)
