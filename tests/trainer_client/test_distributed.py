"""Data-parallel training: two processes joined over gloo (torchrun on CPU), each fetching its own
share of the batch and of the teachers' answers, end with the weights of one process training on
the doubled batch; the run's metrics and final model are written once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from potstill.usage import UsageError
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.trainer import train

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="needs torchrun")


def run_training(tmp_path: Path, name: str, processes: int, batch_size: int, student: str, data: str, teacher: str,
                 *extra: str) -> Path:
    output = tmp_path / name
    arguments = ["-m", "potstill.cli", "train", "--student", student, "--data", data, "--teacher", teacher,
                 "--method", "logit-kd", "--top-k", "8", "--steps", str(STEPS), "--batch-size", str(batch_size),
                 "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--save-every", "3", "--output", str(output), *extra]
    launcher = [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    finished = subprocess.run(launcher + arguments, timeout=600, env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return output


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path):
    student = str(build_tiny_model(tmp_path / "student", seed=2, hidden_size=48))
    teacher_dir = build_tiny_model(tmp_path / "teacher", seed=1, initializer_range=0.3)
    data = str(write_jsonl(make_rows(200, seed=0), tmp_path / "train.jsonl"))
    with BackgroundTeacher(ServeOptions(model=str(teacher_dir), http_port=0, grpc_port=0)) as teacher:
        parallel = run_training(tmp_path, "two-processes", 2, 4, student, data, teacher.grpc_url)
        single = run_training(tmp_path, "one-process", 1, 8, student, data, teacher.grpc_url)

    _assert_close_weights(single, parallel, rtol=1e-4, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (parallel / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # written by one process, each step once
    # Each rank asked the teacher for its own half of every step's rows.
    rank_traffic = [json.loads(path.read_text()) for path in sorted(parallel.glob("teacher_traffic*.json"))]
    assert len(rank_traffic) == 2
    assert all(sum(endpoint["requests"] for endpoint in traffic.values()) >= STEPS for traffic in rank_traffic)


def _assert_close_weights(one: Path, other: Path, **tolerance) -> None:
    expected, actual = load_file(one / "final" / "model.safetensors"), load_file(other / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


def test_fsdp_over_two_gloo_processes_matches_one_process_and_resumes_exactly(tmp_path):
    """--sharding fsdp: each process holds half of every weight; the run ends with the weights of one
    unsharded process on the doubled batch, writes full weights once, and a resume from its step-3
    checkpoint (gathered shards) ends where the uninterrupted sharded run did."""
    student = str(build_tiny_model(tmp_path / "student", seed=2, hidden_size=48))
    teacher_dir = build_tiny_model(tmp_path / "teacher", seed=1, initializer_range=0.3)
    data = str(write_jsonl(make_rows(200, seed=0), tmp_path / "train.jsonl"))
    with BackgroundTeacher(ServeOptions(model=str(teacher_dir), http_port=0, grpc_port=0)) as teacher:
        sharded = run_training(tmp_path, "sharded", 2, 4, student, data, teacher.grpc_url, "--sharding", "fsdp")
        single = run_training(tmp_path, "one-process", 1, 8, student, data, teacher.grpc_url)
        _assert_close_weights(single, sharded, rtol=1e-4, atol=1e-5)
        steps = [json.loads(line)["step"] for line in (sharded / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        checkpoint = sharded / "checkpoints" / "step-00000003"
        assert load_file(checkpoint / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 384  # whole, not a shard

        uninterrupted = tmp_path / "uninterrupted"
        shutil.copytree(sharded / "final", uninterrupted / "final")
        shutil.rmtree(sharded / "final")
        run_training(tmp_path, "sharded", 2, 4, student, data, teacher.grpc_url, "--sharding", "fsdp", "--resume")
    _assert_close_weights(uninterrupted, sharded, rtol=0, atol=0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "guided", "verifier": "integer"}, "method guided samples from the student"),
    ({"method": "multi-sample", "adversarial_weight": 0.1}, "adversarial_weight samples from the student"),
    ({"lora_r": 4}, "LoRA"),
])
def test_fsdp_refuses_what_it_cannot_shard(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(student="s", data="d", teachers=["http://t:1"], sharding="fsdp", **settings)


def test_fsdp_outside_a_distributed_launch_says_how_to_launch(tmp_path):
    student = str(build_tiny_model(tmp_path / "student", seed=2, hidden_size=48))
    data = str(write_jsonl(make_rows(20, seed=0), tmp_path / "train.jsonl"))
    config = TrainConfig(student=student, data=data, method="sft", sharding="fsdp", steps=1, output=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="torchrun --nproc-per-node N"):
        train(config, progress=False)
