"""Self-teachers end to end: the student served by a real teacher service, kept up to date by weight pushes."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from potstill.cli import build_parser
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.self_teacher import next_push_micro
from trainer_client.trainer import train

ADMIN = "self-admin"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("self-models") / "student", seed=2, hidden_size=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("self-data")
    return {"train": str(write_jsonl(make_rows(64, seed=0), root / "train.jsonl")),
            "eval": str(write_jsonl(make_rows(8, seed=0, split="eval"), root / "eval.jsonl"))}


def _config(student: str, data: dict, output, **overrides) -> TrainConfig:
    # ce_weight moves the student off its teacher (at step 0 they are one model, and the KL is 0).
    settings = dict(student=student, data=data["train"], output=str(output), method="logit-kd", ce_weight=1.0, steps=8,
                    batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, save_every=4, top_k=8, max_new_tokens=4,
                    eval_max_new_tokens=4, teacher_push_interval=2)
    return TrainConfig(**{**settings, **overrides})


def _final(output) -> dict[str, torch.Tensor]:
    return load_file(output / "final" / "model.safetensors")


def test_an_ema_teacher_run_resumes_to_the_same_weights(student, data, tmp_path):
    """A run whose EMA teacher is pushed every 2 steps, then the same run resumed from its step-4
    checkpoint (a fresh teacher process, the EMA and served weights restored): equal weights."""
    config = _config(student, data, tmp_path / "run", teachers=["ema"], ema_decay=0.5, eval_data=data["eval"], eval_every=8)
    straight = train(config, progress=False)
    expected = _final(straight.output)
    traffic = json.loads((straight.output / "teacher_traffic.json").read_text())
    assert [entry["model_version"] for entry in traffic.values()] == [7]  # pushed after steps 2, 4, 6
    # No answer came on other weights than the pinned ones: prefetching never ran past a push.
    assert [entry["failures"] for entry in traffic.values()] == [0]
    metrics = [json.loads(line) for line in (straight.output / "metrics.jsonl").read_text().splitlines()]
    # Each evaluation measures the KL to the teacher served at that step, and names its version.
    assert [(m["step"], m["eval/teacher_version/ema"]) for m in metrics if "eval/kl" in m] == [(0, 1), (8, 7)]
    assert any(m.get("kd", 0) > 0 for m in metrics if m["step"] > 2)  # the teacher lags the student
    checkpoint = straight.output / "checkpoints" / "step-00000004"
    assert json.loads((checkpoint / "self_teacher.json").read_text()) == {"kind": "ema", "served_version": 5}
    state = load_file(checkpoint / "self_teacher.safetensors")
    assert {name.split(".")[0] for name in state} == {"ema", "served"}

    shutil.rmtree(straight.output / "final")
    resumed = train(config.model_copy(update={"resume": True}), progress=False)
    actual = _final(resumed.output)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(actual["model.norm.weight"], load_file(f"{student}/model.safetensors")["model.norm.weight"])


@pytest.mark.parametrize("kind, served_step, version", [("lagged", 2, 3), ("self", 0, 1)])
def test_a_self_teacher_at_a_given_url_serves_the_student_of_its_version(student, data, tmp_path, kind, served_step, version):
    """The trainer pushes (by path) to a teacher it did not start; afterwards the teacher answers
    exactly as the student's weights of the step it was last pushed (the initial ones for self)."""
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN)
    options = ServeOptions(model=student, http_port=0, grpc_port=0, admin_keys=(ADMIN,), grace_seconds=1.0)
    with BackgroundTeacher(options) as teacher:
        config = _config(student, data, tmp_path / "run", teachers=[kind], steps=4, save_every=2, self_teacher_url=teacher.http_url,
                         admin_key_file=str(key_file), teacher_push="path")
        result = train(config, progress=False)
        info = httpx.get(f"{teacher.http_url}/v1/model").json()
        sequence = {"prompt": [5, 17, 42], "completion": [33, 71, 8]}
        scored = httpx.post(f"{teacher.http_url}/v1/score", json={"sequences": [sequence]}).json()["results"][0]
    assert info["model_version"] == scored["model_version"] == version
    model = AutoModelForCausalLM.from_pretrained(student)
    if served_step:
        model.load_state_dict(load_file(result.output / "checkpoints" / f"step-{served_step:08d}" / "model.safetensors"), strict=False)
        assert (result.output / "self_teacher" / "pushed.safetensors").is_file()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence["prompt"] + sequence["completion"]])).logits[0, 2:-1]
    expected = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor(sequence["completion"])]
    torch.testing.assert_close(torch.tensor(scored["token_logprobs"]), expected, atol=1e-4, rtol=0)


def test_prefetching_stops_where_the_next_pushed_weights_teach():
    # Pushes every 3 steps of 2 micro-batches: steps 0-2 are micro-batches 0-5, taught by one version.
    assert [next_push_micro(micro, 2, 3) for micro in (0, 5, 6, 11, 12)] == [6, 6, 12, 12, 18]
    assert [next_push_micro(micro, 1, 1) for micro in (0, 1, 7)] == [1, 2, 8]


@pytest.mark.parametrize("settings, message", [
    ({"teachers": ["ema", "lagged"]}, "one self-teacher per run"),
    ({"teachers": ["ema"], "lora_r": 4}, "LoRA"),
    ({"teachers": ["grpc://h:1"], "self_teacher_url": "grpc://h:2"}, "add --teacher self, ema or lagged"),
    ({"teachers": ["self"], "record_teacher_cache": "cache"}, "teacher cache"),
])
def test_self_teacher_settings_that_cannot_work_are_refused(student, data, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _config(student, data, tmp_path, **settings)


def test_train_help_documents_the_self_teacher_settings():
    command = build_parser(["train"])._subparsers._group_actions[0].choices["train"]
    text = " ".join(command.format_help().split())
    for flag in ("--ema-decay", "--teacher-push-interval", "--teacher-push {stream,path}", "--self-teacher-url", "--admin-key-file"):
        assert flag in text
    assert "self (the initial student, frozen), ema" in text and "(default: 0.99; range: >= 0, < 1)" in text
