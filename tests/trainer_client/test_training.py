"""End-to-end training runs against real teacher services on loopback ports.

The teacher is a tiny random Llama with a large initialisation scale, so its next-token
distributions are peaked (far from the fresh student's near-uniform ones): learning from it
shows up clearly within a few dozen CPU steps.
"""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.cli import main as cli_main
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.data import DataError
from trainer_client.rundir import stop_note
from trainer_client.teachers import TeacherUnavailable
from trainer_client.trainer import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-models")
    teacher = build_tiny_model(root / "teacher", seed=1, initializer_range=0.3)
    student = build_tiny_model(root / "student", seed=2, hidden_size=48)
    return {"teacher": str(teacher), "student": str(student)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-data")
    return {
        "train": str(write_jsonl(make_rows(400, seed=0), root / "train.jsonl")),
        "eval": str(write_jsonl(make_rows(48, seed=0, split="eval"), root / "eval.jsonl")),
    }


@pytest.fixture(scope="module")
def replicas(models):
    """Two services of the same teacher model: one logical teacher with two replicas."""
    started = [BackgroundTeacher(ServeOptions(model=models["teacher"], http_port=0, grpc_port=0)).start() for _ in range(2)]
    yield started
    for teacher in started:
        teacher.stop()


def _config(models, data, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        student=models["student"], data=data["train"], eval_data=data["eval"], output=str(tmp_path / "run"),
        steps=40, batch_size=8, lr=3e-3, warmup_steps=2, log_every=5, eval_every=20, save_every=20,
        max_new_tokens=6, eval_max_new_tokens=6, eval_rows=48, top_k=20,
    )
    return TrainConfig(**{**settings, **overrides})


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logit_kd_halves_held_out_kl(models, data, replicas, tmp_path):
    config = _config(models, data, tmp_path, method="logit-kd", teachers=[r.grpc_url for r in replicas], steps=200, eval_every=100)
    result = train(config, progress=False)
    kls = [m["eval/kl"] for m in _metrics(result.output) if "eval/kl" in m]
    assert len(kls) == 3  # step 0 (baseline), 100, 200
    assert kls[-1] <= 0.5 * kls[0], kls
    assert result.final_eval["eval/kl"] == pytest.approx(kls[-1])
    # Both replicas of the one logical teacher took traffic.
    traffic = json.loads((result.output / "teacher_traffic.json").read_text())
    assert all(traffic[r.grpc_url]["requests"] > 0 for r in replicas), traffic
    # The final model and its tokenizer load with the standard classes, and every log line has its step.
    AutoModelForCausalLM.from_pretrained(result.output / "final")
    AutoTokenizer.from_pretrained(result.output / "final")
    assert all("step" in m for m in _metrics(result.output))
    assert (result.output / "report.md").exists() and (result.output / "kl.png").exists()


def _teacher_loglikelihood(student_dir, teacher_url, prompts) -> float:
    """Mean log-prob per token, under the teacher (asked over HTTP), of the student's greedy completions."""
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    output = model.generate(**tokenizer(prompts, return_tensors="pt"), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    prompt_length = len(tokenizer(prompts[0])["input_ids"])
    sequences = [{"prompt": row[:prompt_length].tolist(), "completion": row[prompt_length:].tolist()} for row in output]
    scored = httpx.post(f"{teacher_url}/v1/score", json={"sequences": sequences}, timeout=30).json()["results"]
    return sum(sum(r["token_logprobs"]) for r in scored) / sum(len(r["token_logprobs"]) for r in scored)


def test_seq_kd_moves_student_samples_toward_the_teacher(models, data, replicas, tmp_path):
    config = _config(models, data, tmp_path, method="seq-kd", teachers=[replicas[0].http_url],
                     sample_temperature=0.0, max_new_tokens=4, eval_data=None, steps=60)
    result = train(config, progress=False)
    # Held-out prompts of one length (so they batch without padding).
    prompts = [row["prompt"] for row in make_rows(40, seed=0, split="eval") if len(row["prompt"]) == 6]
    before = _teacher_loglikelihood(models["student"], replicas[0].http_url, prompts)
    after = _teacher_loglikelihood(result.output / "final", replicas[0].http_url, prompts)
    assert after > before + 1.0, (before, after)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(models, data, replicas, tmp_path, capsys):
    """12 steps straight == the same run resumed from its step-6 checkpoint (seq-kd with sampled
    teacher outputs: seeds must replay)."""
    config = _config(models, data, tmp_path, method="seq-kd", teachers=[replicas[0].grpc_url], sample_temperature=1.0,
                     eval_data=None, steps=12, save_every=6)
    straight = train(config, progress=False)
    expected = _weights(straight.output)
    assert [p.name for p in (straight.output / "checkpoints").iterdir()] == ["step-00000006"]
    shutil.rmtree(straight.output / "final")
    capsys.readouterr()
    resumed = train(config.model_copy(update={"resume": True}), progress=False)
    assert "resumed from step 6" in capsys.readouterr().out
    actual = _weights(resumed.output)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(actual["model.norm.weight"], load_file(f"{models['student']}/model.safetensors")["model.norm.weight"])
    steps = [m["step"] for m in _metrics(resumed.output) if "loss" in m]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_replica_dying_mid_run_does_not_stop_training(models, data, tmp_path):
    teachers = [BackgroundTeacher(ServeOptions(model=models["teacher"], http_port=0, grpc_port=0)).start() for _ in range(2)]
    try:
        urls = [t.http_url for t in teachers]
        timer = threading.Timer(2.0, teachers[1].stop)  # killed while the run is sending it requests
        timer.start()
        config = _config(models, data, tmp_path, method="logit-kd", teachers=urls, eval_data=None, steps=150, prefetch=2)
        result = train(config, progress=False)
        timer.join()
        assert [m["step"] for m in _metrics(result.output) if "loss" in m][-1] == 150
        traffic = json.loads((result.output / "teacher_traffic.json").read_text())
        assert traffic[urls[0]]["requests"] > traffic[urls[1]]["requests"] > 0, traffic
        assert traffic[urls[1]]["failures"] >= 1 and not traffic[urls[1]]["alive"], traffic
    finally:
        teachers[0].stop()


def test_teachers_gone_for_good_checkpoint_the_run_and_resume_continues(models, data, tmp_path):
    teacher = BackgroundTeacher(ServeOptions(model=models["teacher"], http_port=0, grpc_port=0)).start()
    url = teacher.grpc_url
    timer = threading.Timer(1.5, teacher.stop)
    timer.start()
    config = _config(models, data, tmp_path, method="logit-kd", teachers=[url], eval_data=None,
                     steps=400, teacher_max_wait=2.0, teacher_timeout=5.0, prefetch=0)
    with pytest.raises(TeacherUnavailable) as stopped:
        train(config, progress=False)
    assert "--resume" in stop_note(stopped.value)
    timer.join()
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json"))
    assert checkpoints, "the completed steps were not checkpointed"
    done = json.loads(checkpoints[-1].read_text())["step"]
    assert 0 < done < 400


def test_unreachable_teacher_at_start_is_named(models, data, tmp_path):
    with pytest.raises(TeacherUnavailable, match="127.0.0.1:9"):
        train(_config(models, data, tmp_path, method="logit-kd", teachers=["grpc://127.0.0.1:9"], teacher_timeout=2.0), progress=False)


def test_white_box_refuses_a_teacher_with_another_tokenizer(tmp_path, data):
    from potstill.toy.models import tiny_llama_config
    from potstill.toy.tokenizer import build_tokenizer
    from transformers import LlamaForCausalLM

    other_tokenizer = build_tokenizer(vocab_size=320)
    other = tmp_path / "other-teacher"
    LlamaForCausalLM(tiny_llama_config(other_tokenizer)).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    student = build_tiny_model(tmp_path / "student")
    with BackgroundTeacher(ServeOptions(model=str(other), http_port=0, grpc_port=0)) as teacher:
        config = TrainConfig(student=str(student), data=data["train"], teachers=[teacher.grpc_url], method="logit-kd",
                             output=str(tmp_path / "run"), steps=1)
        with pytest.raises(ValueError, match="fingerprint|vocab"):
            train(config, progress=False)


def test_malformed_rows_name_file_and_line_or_are_skipped(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 5}\nnot json\n{"prompt": "2+2=", "completion": "4"}\n')
    config = TrainConfig(student=models["student"], data=str(bad), method="sft", output=str(tmp_path / "run"), steps=2, batch_size=2)
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed row: prompt"):
        train(config, progress=False)
    result = train(config.model_copy(update={"skip_bad_rows": True}), progress=False)
    assert (result.output / "final" / "config.json").exists()


def test_cli_runs_from_a_yaml_config_with_flags_overriding_it(models, data, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"student: {models['student']}\ndata: {data['train']}\nmethod: sft\nsteps: 50\nbatch-size: 4\n"
        f"output: {tmp_path / 'from-yaml'}\n"
    )
    cli_main(["train", "--config", str(config_file), "--steps", "3", "--output", str(tmp_path / "from-flags")])
    *_, summary_line, last_line = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(summary_line)
    assert last_line == f"report: {tmp_path / 'from-flags' / 'report.md'}"
    assert summary["steps"] == 3 and summary["output"] == str(tmp_path / "from-flags")
    assert json.loads((tmp_path / "from-flags" / "config.json").read_text())["batch_size"] == 4


def test_checkpoints_hold_no_pickle(models, data, tmp_path):
    """Tensors in safetensors, the rest in JSON: nothing a loader would have to unpickle."""
    config = _config(models, data, tmp_path, method="sft", steps=4, save_every=2, eval_data=None)
    train(config, progress=False)
    files = [path for path in (tmp_path / "run" / "checkpoints").rglob("*") if path.is_file()]
    assert files and {path.suffix for path in files} == {".safetensors", ".json"}, sorted(p.name for p in files)
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_file(path)  # a safetensors file with at least one tensor
