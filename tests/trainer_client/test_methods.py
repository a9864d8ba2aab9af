"""The method stages end to end against real teacher services on loopback: selection, routing,
judges and guidance on demand, with numbers the served teachers make predictable.

Two tiny random Llamas with a large initialisation scale are the teachers: their greedy outputs
are fixed strings, so rows whose `answer` is teacher A's greedy output are exactly the rows a
verifier accepts A's greedy samples on.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.adversarial import AdversarialTerm
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.judges import Judge
from trainer_client.methods import MethodStats
from trainer_client.pool import TeacherPool
from trainer_client.router import Gate
from trainer_client.samples import Candidate, Example, PromptGroup
from trainer_client.student_loss import collate
from trainer_client.trainer import judge_spec, train

ANSWER_TOKENS = 3


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("method-models")
    started = {
        name: BackgroundTeacher(ServeOptions(model=str(build_tiny_model(root / name, seed=seed, initializer_range=0.3)),
                                             http_port=0, grpc_port=0)).start()
        for name, seed in (("a", 1), ("b", 5))
    }
    yield started
    for teacher in started.values():
        teacher.stop()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("method-student") / "student", seed=2, hidden_size=48))


def greedy(teacher, prompts: list[str]) -> list[str]:
    body = {"prompts": prompts, "n": 1, "max_tokens": ANSWER_TOKENS, "temperature": 0.0}
    results = httpx.post(f"{teacher.http_url}/v1/generate", json=body, timeout=60).json()["results"]
    return [r["samples"][0]["text"] for r in results]


@pytest.fixture(scope="module")
def rows(teachers):
    """16 prompts; the first 8 have teacher A's greedy answer, the others one no teacher gives; tasks alternate."""
    problems = make_rows(16, seed=7)
    answers = greedy(teachers["a"], [p["prompt"] for p in problems])
    return [
        {"prompt": p["prompt"], "completion": p["completion"], "answer": answers[i] if i < 8 else "~none~",
         "task": "add" if i % 2 == 0 else "sub", "source": f"row-{i}"}
        for i, p in enumerate(problems)
    ]


def _train(tmp_path, student, rows, teachers, **settings):
    data = write_jsonl(rows, tmp_path / "train.jsonl")
    config = TrainConfig(**{
        "student": student, "data": str(data), "output": str(tmp_path / "run"), "teachers": teachers, "steps": 2,
        "batch_size": len(rows), "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "save_every": 100, "max_new_tokens": ANSWER_TOKENS,
        "verifier": "exact", **settings,
    })
    result = train(config, progress=False)
    return [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]


def _tagged(teacher, name: str, tags: str = "") -> str:
    return f"{teacher.grpc_url}#name={name}" + (f"&tags={tags}" if tags else "")


def test_verifier_selection_keeps_exactly_the_verified_samples(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a")], method="multi-sample", select="verifier",
                  samples_per_prompt=2, sample_temperature=0.0)
    for line in logs:
        assert line["select/accepted/a"] == 0.5 and line["select/fallback_rate"] == 0.5
        assert line["route/a"] == 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Method statistics" in report and "| select/accepted/a | 0.500 | 0.500 |" in report


def test_fallback_to_the_reference_trains_on_prompts_nothing_survived(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a")], method="multi-sample", select="verifier",
                  samples_per_prompt=1, sample_temperature=0.0, select_fallback="reference")
    assert all(line["select/fallback_rate"] == 0.5 and line["select/accepted/a"] == 0.5 for line in logs)
    drop = _train(tmp_path / "drop", student, rows, [_tagged(teachers["a"], "a")], method="multi-sample", select="verifier",
                  samples_per_prompt=1, sample_temperature=0.0)
    assert logs[0]["weight"] > drop[0]["weight"]  # the 8 references count too


def test_majority_keeps_the_most_common_answer(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a")], method="multi-sample", select="majority",
                  samples_per_prompt=4, sample_temperature=1.0)
    for line in logs:
        assert 0.25 <= line["select/majority_agreement"] <= 1.0
        # Every sample states an answer (exact reads the whole text): the kept share is the mean agreement.
        assert line["select/accepted/a"] == pytest.approx(line["select/majority_agreement"])


def test_route_by_tags_sends_each_task_to_its_teacher(tmp_path, student, rows, teachers):
    urls = [_tagged(teachers["a"], "adder", "add"), _tagged(teachers["b"], "subtracter", "sub")]
    logs = _train(tmp_path, student, rows, urls, method="multi-sample", samples_per_prompt=1)
    assert all(line["route/adder"] == 0.5 and line["route/subtracter"] == 0.5 for line in logs)


def test_route_verified_picks_the_teacher_whose_samples_verify(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a"), _tagged(teachers["b"], "b")], method="seq-kd",
                  route="verified", samples_per_prompt=1, sample_temperature=0.0)
    for line in logs:
        assert line["route/a"] + line["route/b"] == pytest.approx(1.0)
        assert line["route/a"] >= 0.5  # A verifies on the 8 rows carrying its answer (B's greedy output differs)


@pytest.mark.parametrize("route", ["confidence", "lowest-ce", "gate"])
def test_one_teacher_routes_keep_one_teacher_per_prompt(tmp_path, student, rows, teachers, route):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a"), _tagged(teachers["b"], "b")], method="multi-sample",
                  route=route, samples_per_prompt=2)
    for line in logs:
        assert line["route/a"] + line["route/b"] == pytest.approx(1.0)


def test_lowest_ce_route_for_logit_kd_learns_from_one_teacher(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a"), _tagged(teachers["b"], "b")], method="logit-kd",
                  route="lowest-ce", top_k=5)
    assert all(line["kd"] > 0 for line in logs if "kd" in line)


def test_judge_scores_are_the_normalised_yes_probability(teachers):
    rubric = "{prompt} and {completion}?"
    config = TrainConfig(student="s", data="d", method="multi-sample", teachers=["x"], judges=[teachers["b"].http_url],
                         select="judge", judge_rubrics={"sense": rubric}, judge_yes=" yes", judge_no=" no")
    group = PromptGroup(Row(prompt="12+30="), [1], [Candidate([5], "042", "a"), Candidate([6], "7", "a")])

    async def judged():
        async with await TeacherPool.connect([judge_spec(teachers["b"].http_url, 0)]) as pool:
            await Judge(config, pool).score([group])

    asyncio.run(judged())
    for candidate in group.candidates:
        text = rubric.format(prompt="12+30=", completion=candidate.text)
        body = {"sequences": [{"prompt": text, "completion": " yes"}, {"prompt": text, "completion": " no"}]}
        yes, no = (sum(r["token_logprobs"]) for r in httpx.post(f"{teachers['b'].http_url}/v1/score", json=body).json()["results"])
        assert candidate.scores["sense"] == pytest.approx(math.exp(yes) / (math.exp(yes) + math.exp(no)), rel=1e-4)


def test_judge_selection_weights_samples_by_the_judge(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows, [_tagged(teachers["a"], "a")], method="multi-sample", select="judge",
                  judges=[teachers["b"].grpc_url], samples_per_prompt=2)
    for line in logs:
        assert 0.0 < line["judge/correctness"] < 1.0
        assert line["select/accepted/a"] == 1.0  # every score is > 0: all kept, weighted


def test_guided_asks_teachers_only_for_prompts_the_student_fails(tmp_path, student, rows, teachers):
    logs = _train(tmp_path, student, rows[:8], [_tagged(teachers["a"], "a")], method="guided", student_samples=1,
                  student_temperature=0.0, samples_per_prompt=2, sample_temperature=0.0, steps=40, log_every=1)
    saved = [line["guided/teacher_calls_saved"] for line in logs if "guided/teacher_calls_saved" in line]
    assert saved[0] == 0.0  # the untrained student solves nothing: every prompt asks the teacher
    assert saved[-1] == 1.0  # having learned A's answers, it solves all 8 and no teacher is asked
    traffic = json.loads((tmp_path / "run" / "teacher_traffic.json").read_text())
    assert 0 < traffic[teachers["a"].grpc_url]["requests"] < 40


def test_rows_keep_their_extra_fields_and_labels():
    row = Row.model_validate({"prompt": "1+1=", "task": "add", "tags": ["easy"], "source": {"set": "toy"}})
    assert row.labels() == {"add", "easy"} and row.model_extra == {"source": {"set": "toy"}}


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "multi-sample", "select": "verifier"}, "needs --verifier"),
    ({"method": "guided"}, "needs --verifier"),
    ({"method": "multi-sample", "select": "judge"}, "--judge"),
    ({"method": "logit-kd", "route": "verified", "verifier": "exact"}, "needs teacher samples"),
    ({"method": "multi-sample", "judge_rubrics": {"x": "{prompt}"}}, "must contain"),
])
def test_settings_a_method_cannot_use_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(student="s", data="d", teachers=["grpc://h:1"], **settings)


def test_adversarial_term_trains_a_discriminator_without_counting_student_samples_as_targets(tmp_path, student, rows, teachers):
    common = dict(method="multi-sample", samples_per_prompt=2, sample_temperature=0.0, steps=3)
    plain = _train(tmp_path / "plain", student, rows, [_tagged(teachers["a"], "a")], **common)
    logs = _train(tmp_path / "adversarial", student, rows, [_tagged(teachers["a"], "a")], adversarial_weight=0.5, **common)
    assert [line["weight"] for line in logs] == [line["weight"] for line in plain]  # own samples weigh 0
    assert all(line["adversarial"] > 0 and 0.0 <= line["adversarial/discriminator_accuracy"] <= 1.0 for line in logs)


def test_the_discriminator_learns_to_separate_and_the_student_term_pulls_own_samples_toward_teachers():
    stats = MethodStats()
    term = AdversarialTerm(stats)
    generator = torch.Generator().manual_seed(0)
    # 4 teacher samples and 4 own samples, 3 positions each; their hidden states sit in two clusters.
    batch = collate([Example([1], [2, 3, 4], 1.0) for _ in range(4)] + [Example([1], [2, 3, 4], 0.0, own=True) for _ in range(4)], 0)
    centre = torch.tensor([2.0] * 4 + [-2.0] * 4)[:, None, None]
    for _ in range(30):
        hidden = (centre + torch.randn(8, 4, 16, generator=generator)).requires_grad_()
        student_term = term(hidden, batch)
    assert stats.drain()["adversarial/discriminator_accuracy"] > 0.9
    student_term.backward()
    assert hidden.grad[4:].abs().sum() > 0 and hidden.grad[:4].abs().sum() == 0  # only own samples are moved


class _Features:
    """The student's prompt representation, as the gate reads it: here, one fixed vector per prompt."""

    def __init__(self, vectors: dict[int, torch.Tensor]):
        self.vectors = vectors

    def prompt_features(self, prompts: list[list[int]]) -> torch.Tensor:
        return torch.stack([self.vectors[p[0]] for p in prompts])


def test_the_gate_learns_to_route_each_kind_of_prompt_to_the_teacher_that_verifies_on_it():
    config = TrainConfig(student="s", data="d", method="multi-sample", teachers=["x"], route="gate", verifier="exact", gate_lr=0.05)
    gate = Gate(config, ["adder", "subtracter"])
    features = _Features({0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0])})

    def group(kind: int) -> PromptGroup:
        # Prompts of kind 0 are answered right by the adder only, kind 1 by the subtracter only.
        right, wrong = Candidate([1], "7", "adder" if kind == 0 else "subtracter"), Candidate([1], "8", "subtracter" if kind == 0 else "adder")
        return PromptGroup(Row(prompt="p", answer="7"), [kind], [right, wrong])

    for _ in range(100):
        chosen = gate.choose([group(0), group(1)] * 4, features)
    assert chosen == ["adder", "subtracter"] * 4


def test_gate_and_discriminator_resume_where_they_were(tmp_path, student, rows, teachers):
    """A run resumed from its step-2 checkpoint ends with the weights of the run that never stopped:
    the gate and the discriminator (and their optimizers) come back from the checkpoint."""
    settings = dict(method="multi-sample", samples_per_prompt=2, sample_temperature=1.0, route="gate", adversarial_weight=0.5,
                    steps=4, save_every=2, schedule="constant")
    pool = [_tagged(teachers["a"], "a"), _tagged(teachers["b"], "b")]
    _train(tmp_path / "straight", student, rows, pool, **settings)
    run = tmp_path / "straight" / "run"
    expected = load_file(run / "final" / "model.safetensors")
    checkpoint = run / "checkpoints" / "step-00000002"
    assert {"gate.safetensors", "gate-optimizer.safetensors", "discriminator.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # the end is saved as final/
    shutil.rmtree(run / "final")
    _train(tmp_path / "straight", student, rows, pool, **settings, resume=True)
    actual = load_file(run / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
