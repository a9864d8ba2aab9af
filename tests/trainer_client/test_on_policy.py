"""On-policy distillation and self-distillation: the per-token objectives against exact
expectations over a small vocabulary, and the methods end to end against real teacher services
on loopback (what the teacher scored is checked against a direct /v1/score request)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch

from potstill.cli import build_parser
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.losses import (
    distillation_advantage,
    forward_kl,
    mix_token_logprobs,
    policy_gradient_loss,
    reverse_kl,
    sampled_reverse_kl,
)
from trainer_client.on_policy import OnPolicy, SelfDistill, privileged_prompt
from trainer_client.pool import TeacherPool
from trainer_client.samples import STUDENT, Candidate, PromptGroup, StudentTokens
from trainer_client.student import StudentView
from trainer_client.student_model import load_tokenizer
from trainer_client.trainer import train

VOCAB = 7


def _distributions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (with gradient), and the log-probs of a student q and a teacher p over VOCAB tokens."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(VOCAB, generator=generator, dtype=torch.float64) * 2, -1)
    return logits, torch.log_softmax(logits, -1), teacher


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_each_estimator_averages_to_the_reverse_kl_over_the_students_tokens(estimator):
    _, s, t = _distributions()
    estimates = sampled_reverse_kl(s, t, estimator)  # at every token y of the vocabulary
    expected = (s.exp() * estimates).sum()
    assert expected.item() == pytest.approx(reverse_kl(t, s).item(), rel=1e-10)
    if estimator == "k3":
        assert (estimates >= 0).all()


def test_the_policy_gradient_with_minus_k1_is_the_reverse_kl_gradient():
    logits, s, t = _distributions(1)
    advantage = distillation_advantage(s, t, "k1", clip=100.0)
    # E_{y~q}[grad(-A(y) log q(y))] with q's probabilities as constants (sampling is not differentiated).
    torch.autograd.backward((s.exp().detach() * policy_gradient_loss(s, advantage)).sum())
    assert torch.allclose(logits.grad, torch.autograd.grad(reverse_kl(t, torch.log_softmax(logits, -1)), logits)[0], atol=1e-12)


def test_backpropagating_k3_at_fixed_samples_follows_the_forward_kl_and_k1_follows_nothing():
    logits, s, t = _distributions(2)
    expected_k3 = torch.autograd.grad((s.exp().detach() * sampled_reverse_kl(s, t, "k3")).sum(), logits, retain_graph=True)[0]
    assert torch.allclose(expected_k3, torch.autograd.grad(forward_kl(t, s), logits, retain_graph=True)[0], atol=1e-12)
    expected_k1 = torch.autograd.grad((s.exp().detach() * sampled_reverse_kl(s, t, "k1")).sum(), logits)[0]
    assert expected_k1.abs().max() < 1e-12


def test_the_advantage_is_clamped_detached_and_adds_the_reward():
    s = torch.tensor([-1.0, -5.0, -0.1], requires_grad=True)
    t = torch.tensor([-2.0, -0.5, -9.0])
    advantage = distillation_advantage(s, t, "k1", clip=2.0, reward=torch.tensor([0.0, 1.0, 0.5]))
    assert advantage.tolist() == pytest.approx([-1.0, 3.0, -1.5]) and not advantage.requires_grad


def test_mixed_token_logprobs_are_the_log_of_the_weighted_mixture():
    a, b = torch.tensor([-0.5, -3.0]), torch.tensor([-2.0, -0.1])
    mixed = mix_token_logprobs([a, b], [3.0, 1.0])
    assert mixed.exp().tolist() == pytest.approx((0.75 * a.exp() + 0.25 * b.exp()).tolist())


def test_the_privileged_prompt_fills_every_field():
    row = Row(prompt="12+30=", completion="042", answer="42")
    candidate = Candidate([1], "041", STUDENT, scores={"correctness": 0.25})
    template = "{prompt}|{reference}|{answer}|{completion}|{verdict}|{feedback}"
    assert privileged_prompt(template, row, candidate, False) == "12+30=|042|42|041|incorrect|correctness: 0.25"
    with pytest.raises(ValueError, match="needs a 'completion'"):
        privileged_prompt("{reference}", Row(prompt="1+1="), candidate, None)


@pytest.mark.parametrize(("settings", "message"), [
    ({"on_policy_loss": "sampled", "kl_estimator": "k1"}, "zero expected gradient"),
    ({"on_policy_update": "policy-gradient", "gkd_lambda": 0.5}, "--lambda 1"),
    ({"on_policy_update": "policy-gradient", "reward_weight": 1.0}, "needs --verifier"),
    ({"reward_weight": 1.0, "verifier": "exact"}, "applies to on_policy_update policy-gradient"),
    ({"route": "verified", "verifier": "exact"}, "needs teacher samples"),
    ({"teacher_cache": "cache"}, "--teacher-cache"),
    ({"method": "self-distill", "privileged_template": "{prompt}{hint}"}, "names {hint}"),
    ({"method": "self-distill", "privileged_template": "{prompt}{verdict}"}, "needs --verifier"),
    ({"method": "self-distill", "privileged_template": "{prompt}{feedback}"}, "--judge"),
    ({"sharding": "fsdp"}, "samples from the student"),
])
def test_settings_on_policy_methods_cannot_use_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"student": "s", "data": "d", "teachers": ["grpc://h:1"], "method": "on-policy", **settings})


def test_lambda_is_a_flag_and_a_file_key_and_train_help_documents_every_on_policy_setting(tmp_path):
    from trainer_client.trainer import config_from_args

    args = build_parser(["train"]).parse_args(["train", "--student", "s", "--data", "d", "--teacher", "grpc://h:1", "--lambda", "0.25"])
    assert config_from_args(args).gkd_lambda == 0.25
    (tmp_path / "run.yaml").write_text("student: s\ndata: d\nteachers: [grpc://h:1]\nlambda: 0.75\n")
    args = build_parser(["train"]).parse_args(["train", "--config", str(tmp_path / "run.yaml")])
    assert config_from_args(args).gkd_lambda == 0.75
    command = build_parser(["train"])._subparsers._group_actions[0].choices["train"]
    text = " ".join(command.format_help().split())
    for flag in ("--gkd-lambda GKD_LAMBDA, --lambda GKD_LAMBDA", "--on-policy-update {supervised,policy-gradient}",
                 "--on-policy-loss {topk,sampled}", "--kl-estimator {k1,k3}", "--advantage-clip", "--reward-weight",
                 "--privileged-template", "the student samples, the teachers score its tokens", "scoring under a privileged prompt"):
        assert flag in text


# --- end to end, against real teachers on loopback ---

ANSWER_TOKENS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("on-policy-models")
    path = build_tiny_model(root / "teacher", seed=1, initializer_range=0.3)
    with BackgroundTeacher(ServeOptions(model=str(path), http_port=0, grpc_port=0)) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("on-policy-student") / "student", seed=2, hidden_size=48))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(make_rows(8, seed=7), tmp_path_factory.mktemp("on-policy-data") / "train.jsonl")


def _train(tmp_path, student, data, teachers, **settings) -> list[dict]:
    config = TrainConfig(**{
        "student": student, "data": str(data), "output": str(tmp_path / "run"), "teachers": teachers, "steps": 2,
        "batch_size": 8, "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "save_every": 100, "max_new_tokens": ANSWER_TOKENS,
        "student_samples": 1, "top_k": 5, **settings,
    })
    result = train(config, progress=False)
    return [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]


def test_lambda_zero_is_logit_kd_on_the_data(tmp_path, student, data, served):
    on_data = _train(tmp_path / "on-policy", student, data, [served.grpc_url], method="on-policy", gkd_lambda=0.0, loss="jsd")
    logit_kd = _train(tmp_path / "logit-kd", student, data, [served.grpc_url], method="logit-kd", loss="jsd")
    assert [line["on_policy/student_batches"] for line in on_data] == [0.0, 0.0]
    assert [line["loss"] for line in on_data] == pytest.approx([line["loss"] for line in logit_kd], rel=1e-5)


@pytest.mark.parametrize("settings", [
    {"loss": "jsd", "beta": 0.5},
    {"loss": "reverse_kl"},
    {"on_policy_loss": "sampled", "kl_estimator": "k3"},
    {"on_policy_update": "policy-gradient", "reward_weight": 1.0, "verifier": "exact"},
])
def test_on_policy_trains_on_the_students_samples(tmp_path, student, data, served, settings):
    logs = _train(tmp_path, student, data, [served.grpc_url], method="on-policy", **settings)
    for line in logs:
        assert line["on_policy/student_batches"] == 1.0 and line["kd"] != 0.0
        if settings.get("on_policy_update") == "policy-gradient":
            assert 0.0 <= line["on_policy/verified"] <= 1.0 and "advantage" in line
        elif settings.get("on_policy_loss") != "sampled":
            assert line["kd"] > 0  # a top-k divergence
    # Each step's samples are scored once: 2 steps, one request of 8 sequences each.
    traffic = json.loads((tmp_path / "run" / "teacher_traffic.json").read_text())
    assert traffic[served.grpc_url]["requests"] == 2


def test_self_distill_scores_the_students_tokens_after_the_privileged_prompt(tmp_path, student, data, served):
    template = "{reference} {verdict}: {prompt}"
    config = TrainConfig(student=student, data=str(data), teachers=[served.http_url], method="self-distill", top_k=3,
                         privileged_template=template, verifier="exact")
    tokens = StudentTokens(load_tokenizer(student), config.max_seq_len)
    row = Row(prompt="12+30=", completion="042", answer="042")
    sampled = [Candidate(tokens.target("042"), "042", STUDENT), Candidate(tokens.target("7"), "7", STUDENT)]
    group = PromptGroup(row, tokens.prompt(row.prompt), sampled)

    async def annotated():
        async with await TeacherPool.connect([served.http_url], student_fingerprint=tokens.fingerprint) as pool:
            return await SelfDistill(config, tokens, pool).annotate([row], [group], 0)

    asyncio.run(annotated())
    for candidate, verdict in zip(group.candidates, ("correct", "incorrect")):
        prompt = template.format(reference="042", verdict=verdict, prompt="12+30=")
        assert candidate.reward == float(verdict == "correct")
        body = {"sequences": [{"prompt": tokens.prompt(prompt), "completion": candidate.target_ids}], "top_logprobs": 3}
        direct = httpx.post(f"{served.http_url}/v1/score", json=body, timeout=60).json()["results"][0]
        np.testing.assert_allclose(candidate.teacher_token_logprobs, direct["token_logprobs"], rtol=1e-5)
        np.testing.assert_allclose(candidate.teacher_logprobs, direct["top_logprobs"], rtol=1e-5)


def test_an_empty_student_sample_is_not_sent_for_scoring_and_never_an_example(student, data, served):
    config = TrainConfig(student=student, data=str(data), teachers=[served.http_url], method="on-policy", top_k=3)
    tokens = StudentTokens(load_tokenizer(student), config.max_seq_len)
    row = Row(prompt="12+30=", completion="042")
    group = PromptGroup(row, tokens.prompt(row.prompt), [Candidate([], "", STUDENT), Candidate(tokens.target("042"), "042", STUDENT)])

    async def annotated():
        async with await TeacherPool.connect([served.http_url], student_fingerprint=tokens.fingerprint) as pool:
            method = OnPolicy(config, tokens, pool)
            return method.select(await method.annotate([row], [group], 0), None)

    examples = asyncio.run(annotated())
    assert group.candidates[0].teacher_token_logprobs is None
    assert [e.target_ids for e in examples] == [tokens.target("042")] and len(examples[0].teacher_token_logprobs) == 4


def test_a_sampled_padding_id_stays_in_the_sample_and_text_after_eos_goes(student):
    tokens = StudentTokens(load_tokenizer(student), 64)
    pad, eos = tokens.tokenizer.pad_token_id, tokens.eos_id
    view = StudentView(None, tokens)
    assert view._candidate([pad, 30, pad]).target_ids == [pad, 30, pad]  # no EOS: generate padded nothing
    assert view._candidate([30, eos, pad, pad]).target_ids == [30, eos]


def test_self_distill_with_an_ema_self_teacher_runs_end_to_end(tmp_path, student, data):
    logs = _train(tmp_path, student, data, ["ema"], method="self-distill", privileged_template="{prompt}{reference}\n{prompt}",
                  teacher_push_interval=1)
    assert all(line["on_policy/student_batches"] == 1.0 and line["kd"] > 0 for line in logs)
