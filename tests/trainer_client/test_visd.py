"""grpo and visd: the objective's pure functions, the rule judge, the curriculum, and runs with a
real served EMA teacher on loopback.

The student is a tiny Llama with a large initialisation scale: its greedy answers are fixed
strings, and at temperature 1 its samples sometimes differ from them. Rows whose `answer` is the
student's own greedy answer give groups where some rollouts pass and some fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from potstill.cli import build_parser
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from potstill.toy.world import load
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.judges import rule_scores
from trainer_client.trainer import train
from trainer_client.verifiers import extract_integer, verify_integer
from trainer_client.visd import PassRates, decoupled_advantages, group_advantages

ANSWER_TOKENS = 2


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("visd-student") / "student", seed=3, hidden_size=32, initializer_range=1.0))


@pytest.fixture(scope="module")
def data(student, tmp_path_factory) -> str:
    """8 prompts whose answer is the student's greedy answer."""
    model, tokenizer = load(student)
    rows = make_rows(8, seed=11)
    for row in rows:
        prompt = tokenizer(row["prompt"], return_tensors="pt")
        output = model.generate(**prompt, max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        row["answer"] = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    return str(write_jsonl(rows, tmp_path_factory.mktemp("visd-data") / "train.jsonl"))


def _train(student: str, data: str, output, **settings) -> list[dict]:
    config = TrainConfig(**{
        "student": student, "data": data, "output": str(output), "steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0,
        "schedule": "constant", "log_every": 1, "save_every": 100, "max_new_tokens": ANSWER_TOKENS, "verifier": "exact",
        "student_samples": 4, "student_temperature": 1.0, **settings,
    })
    result = train(config, progress=False)
    return [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]


def test_group_advantages_are_the_reward_minus_the_group_mean():
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert group_advantages(torch.ones(4)).abs().sum() == 0  # all pass: no signal


def test_decoupled_advantages_keep_the_sign_and_take_the_magnitude_from_the_normalised_gap():
    advantages = torch.tensor([0.5, -0.5])
    gaps = torch.tensor([[1.0, -1.0, 7.0], [1.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # ḡ = 1; exp(±1) clipped to [0.5, 1.5]; a penalised rollout weighs the teacher's unlikely tokens more.
    expected = torch.tensor([[0.75, 0.25, 0.0], [-0.25, -0.75, 0.0]])
    torch.testing.assert_close(decoupled_advantages(advantages, gaps, mask, 0.5), expected)
    torch.testing.assert_close(decoupled_advantages(advantages, 10 * gaps, mask, 0.5), expected)  # scale-free
    torch.testing.assert_close(decoupled_advantages(advantages, gaps, mask, 0.0), torch.tensor([[0.5, 0.5, 0], [-0.5, -0.5, 0]]))
    torch.testing.assert_close(decoupled_advantages(advantages, torch.zeros(2, 3), mask, 0.5), decoupled_advantages(advantages, gaps, mask, 0.0))
    generator = torch.Generator().manual_seed(0)
    rollout = torch.randn(16, generator=generator)
    tokens = decoupled_advantages(rollout, torch.randn(16, 5, generator=generator), torch.ones(16, 5, dtype=torch.bool), 0.3)
    assert (tokens.sign() == rollout.sign()[:, None]).all()
    ratio = tokens / rollout[:, None]
    assert ratio.min() >= 0.7 - 1e-6 and ratio.max() <= 1.3 + 1e-6


def test_rule_judge_scores_each_dimension():
    assert rule_scores("083", "082", verify_integer, extract_integer) == {"correctness": 0.0, "consistency": 1.0, "grounding": pytest.approx(2 / 3)}
    assert rule_scores("82", "082", verify_integer, extract_integer)["correctness"] == 1.0
    assert rule_scores("x8", "082", verify_integer, extract_integer) == {"correctness": 0.0, "consistency": 0.0, "grounding": pytest.approx(1 / 3)}


def test_the_curriculum_takes_the_easiest_unmastered_prompts_first(tmp_path):
    rates = PassRates()
    rows = [Row(prompt=p) for p in ("a", "b", "c", "d")]
    rates.record(rows[0], 4, 4)  # mastered
    rates.record(rows[1], 1, 4)
    rates.record(rows[2], 3, 4)
    assert [row.prompt for row in rates.easiest(rows, 3)] == ["c", "d", "b"]  # 0.75, unseen 0.5, 0.25; mastered last
    rates.save(tmp_path)
    restored = PassRates()
    restored.load(tmp_path)
    assert restored.counts == rates.counts


def test_grpo_raises_the_reward_of_the_students_own_samples(student, data, tmp_path):
    logs = _train(student, data, tmp_path / "run", method="grpo", steps=10)
    assert logs[0]["rl/groups_with_signal"] > 0.5 and logs[0]["pg"] < 0  # mixed groups; the loss is -J
    assert logs[-1]["rl/reward"] > logs[0]["rl/reward"] + 0.1
    assert logs[0]["weight"] == 2 * 8 * logs[0]["rl/groups_with_signal"] * 4  # 2-token rollouts of groups with signal only
    assert all("kd" not in line for line in logs)


def test_visd_scores_rollouts_with_the_served_ema_teacher_under_judge_feedback(student, data, tmp_path):
    logs = _train(student, data, tmp_path / "visd", method="visd", teachers=["ema"], steps=3, visd_clip=0.5)
    for line in logs:
        assert line["judge/correctness"] == line["rl/reward"]  # the rule judge's correctness is the verifier's
        assert line["judge/consistency"] == 1.0  # the exact verifier reads every completion as an answer
        assert 0.0 <= line["judge/grounding"] <= 1.0 and line["visd/gap_abs"] > 0
        assert 0.5 <= line["visd/magnitude"] <= 1.5 and line["visd/magnitude"] != 1.0
    traffic = json.loads((tmp_path / "visd" / "teacher_traffic.json").read_text())
    assert [(entry["requests"], entry["failures"]) for entry in traffic.values()] == [(3, 0)]  # one scoring request per step


def test_visd_without_magnitudes_is_grpo_on_the_same_rollouts(student, data, tmp_path):
    _train(student, data, tmp_path / "grpo", method="grpo", steps=3)
    _train(student, data, tmp_path / "visd", method="visd", teachers=["ema"], steps=3, visd_clip=0.0)
    grpo, visd = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("grpo", "visd"))
    for name in grpo:
        torch.testing.assert_close(visd[name], grpo[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_curriculum_run_resumes_with_its_pass_rates(student, data, tmp_path):
    settings = dict(method="grpo", curriculum="pass-rate", curriculum_pool=2, batch_size=4, steps=4, save_every=2)
    logs = _train(student, data, tmp_path / "run", **settings)
    run = tmp_path / "run"
    counts = json.loads((run / "checkpoints" / "step-00000002" / "pass_rates.json").read_text())
    assert sum(tries for _, tries in counts.values()) == 2 * 4 * 4  # 2 steps x 4 prompts x 4 rollouts
    expected = load_file(run / "final" / "model.safetensors")
    shutil.rmtree(run / "final")
    resumed = _train(student, data, run, **settings, resume=True)
    assert [line["rl/reward"] for line in resumed] == [line["rl/reward"] for line in logs]
    actual = load_file(run / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "grpo"}, "needs --verifier"),
    ({"method": "grpo", "verifier": "exact", "teachers": ["grpc://h:1"]}, "takes no --teacher"),
    ({"method": "visd", "verifier": "exact"}, "needs at least one --teacher"),
    ({"method": "visd", "verifier": "exact", "teachers": ["ema", "grpc://h:1"]}, "one live teacher"),
    ({"method": "visd", "verifier": "exact", "teachers": ["ema"], "visd_judge": "model"}, "--judge URL"),
    ({"method": "visd", "verifier": "exact", "teachers": ["ema"], "visd_teacher_prompt": "{feedback} {hint}"}, "visd_teacher_prompt names {hint}"),
    ({"method": "sft", "curriculum": "pass-rate"}, "orders the prompts of grpo and visd"),
    ({"method": "grpo", "verifier": "exact", "sharding": "fsdp"}, "samples from the student"),
])
def test_settings_grpo_and_visd_cannot_use_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(student="s", data="d", **settings)


def test_train_help_documents_the_grpo_and_visd_settings():
    command = build_parser(["train"])._subparsers._group_actions[0].choices["train"]
    text = " ".join(command.format_help().split())
    for flag in ("--visd-judge {rules,model}", "--visd-teacher-prompt", "--visd-clip", "--curriculum {none,pass-rate}",
                 "--curriculum-pool", "--student-samples"):
        assert flag in text
    assert "grpo: policy gradient on the student's samples" in text and "visd: grpo whose per-token magnitudes" in text


def test_visd_feedback_can_come_from_a_served_judge_on_the_configured_rubrics(student, data, tmp_path):
    options = ServeOptions(model=student, http_port=0, grpc_port=0)
    with BackgroundTeacher(options) as judge:
        logs = _train(student, data, tmp_path / "run", method="visd", teachers=["ema"], steps=2, visd_judge="model",
                      judges=[judge.grpc_url], judge_rubrics={"sense": "{prompt}{completion} sense?"})
    for line in logs:
        assert 0.0 < line["judge/sense"] < 1.0 and "judge/correctness" not in line  # the rubric's dimension, not the rules'
        assert 0.5 <= line["visd/magnitude"] <= 1.5
