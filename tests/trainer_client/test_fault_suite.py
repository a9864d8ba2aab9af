"""The fault suite: real teacher processes, a real toy run, and the faults a cluster deals out.

Every scenario trains the same logit-kd run (N steps) while something goes wrong, and must end
as the uninterrupted run did: metrics for steps 1..N exactly once and final weights bitwise
equal. Teachers are `potstill serve` processes at one thread each (their answers are then the
same bits whichever replica gives them), running one sequence per forward pass
(`--max-batch-tokens 1`), so a sequence's numbers never depend on what else the teacher is
doing; requests go one at a time (`prefetch=0`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.testing import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.trainer import train

from ..teacher_service.test_bad_input import queue_depth
from .test_pool import free_port

STEPS = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-suite")
    return {
        "teacher": str(build_tiny_model(root / "teacher", seed=1, initializer_range=0.3)),
        "student": str(build_tiny_model(root / "student", seed=2, hidden_size=32)),
        "data": str(write_jsonl(make_rows(200, seed=0), root / "train.jsonl")),
    }


def _teacher(world, http_port: int = 0, grpc_port: int = 0) -> TeacherProcess:
    return TeacherProcess(world["teacher"], "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                          "--grace-seconds", "0.5", "--max-batch-tokens", "1", threads=1).start()


@pytest.fixture(scope="module")
def replicas(world):
    started = [_teacher(world), _teacher(world)]
    yield started
    for teacher in started:
        teacher.stop()


def _settings(world, output: Path, teachers: list[str]) -> dict:
    return dict(student=world["student"], data=world["data"], output=str(output), teachers=teachers, method="logit-kd",
                steps=STEPS, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, save_every=3, prefetch=0, top_k=8,
                teacher_timeout=10.0, teacher_max_wait=120.0)


def _steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(output: Path, reference: Path) -> None:
    assert _steps(output) == list(range(1, STEPS + 1))
    expected, actual = load_file(reference / "final" / "model.safetensors"), load_file(output / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected), "weights differ from the uninterrupted run"


def _when_step(output: Path, step: int, action, timeout: float = 300.0) -> threading.Thread:
    """Run `action` in a thread once the run has logged `step`."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = output / "metrics.jsonl"
            if log.exists() and any(s >= step for s in _steps_so_far(log)):
                action()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def _steps_so_far(log: Path) -> list[int]:
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return steps


@pytest.fixture(scope="module")
def reference(world, replicas, tmp_path_factory):
    output = tmp_path_factory.mktemp("fault-reference") / "run"
    train(TrainConfig(**_settings(world, output, [replicas[0].grpc_url])), progress=False)
    assert _steps(output) == list(range(1, STEPS + 1))
    return output


def test_kill_9_of_one_of_two_replicas(world, replicas, reference, tmp_path):
    doomed = _teacher(world)
    try:
        output = tmp_path / "run"
        killer = _when_step(output, 4, doomed.process.kill)  # SIGKILL: no goodbye, connections just drop
        train(TrainConfig(**_settings(world, output, [doomed.grpc_url, replicas[0].http_url])), progress=False)
        killer.join(timeout=5)
        assert doomed.process.wait(timeout=30) == -signal.SIGKILL
        traffic = json.loads((output / "teacher_traffic.json").read_text())
        assert traffic[doomed.grpc_url]["requests"] > 0 and traffic[replicas[0].http_url]["requests"] > 0
        _assert_same_run(output, reference)
    finally:
        doomed.stop()


def test_all_teachers_down_for_a_while(world, reference, tmp_path):
    ports = (free_port(), free_port())
    teacher = _teacher(world, *ports)
    back: list[TeacherProcess] = []

    def outage() -> None:
        teacher.process.kill()
        teacher.process.wait()
        time.sleep(2.0)  # no teacher at all: the run waits, probing
        back.append(_teacher(world, *ports))

    try:
        output = tmp_path / "run"
        watcher = _when_step(output, 4, outage)
        train(TrainConfig(**_settings(world, output, [teacher.grpc_url])), progress=False)
        watcher.join(timeout=60)
        assert back, "the outage never happened"
        _assert_same_run(output, reference)
    finally:
        teacher.stop()
        for process in back:
            process.stop()


def _flood(url: str, stop: threading.Event, answers: list[int], clients: int = 8) -> list[threading.Thread]:
    """`clients` threads each sending heavy score requests to `url` until `stop` or the server is gone."""
    body = {"sequences": [{"prompt": list(range(5, 125)), "completion": list(range(5, 125))}] * 64, "top_logprobs": 8}

    def send() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                try:
                    answers.append(client.post("/v1/score", json=body).status_code)
                except httpx.TransportError:  # the teacher has exited
                    return

    threads = [threading.Thread(target=send, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_sigterm_of_an_http_teacher_with_queued_work(world, replicas, reference, tmp_path):
    leaving = _teacher(world)
    stop, flood_answers, flood = threading.Event(), [], []

    def flood_then_sigterm() -> None:
        flood.extend(_flood(leaving.http_url, stop, flood_answers))
        deadline = time.monotonic() + 60
        while queue_depth(leaving.http_url) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        leaving.process.send_signal(signal.SIGTERM)

    try:
        output = tmp_path / "run"
        watcher = _when_step(output, 4, flood_then_sigterm)
        train(TrainConfig(**_settings(world, output, [leaving.http_url, replicas[1].http_url])), progress=False)
        watcher.join(timeout=60)
        assert leaving.process.wait(timeout=30) == 0  # it drained and exited cleanly
        _assert_same_run(output, reference)
        # Work was queued past the 0.5 s grace: it was answered 503 (retry elsewhere), never 500.
        assert 503 in flood_answers and 500 not in flood_answers
    finally:
        stop.set()
        for thread in flood:
            thread.join(timeout=60)
        leaving.stop()


def test_kill_9_of_the_trainer_then_resume(world, replicas, reference, tmp_path):
    output = tmp_path / "run"
    settings = _settings(world, output, [replicas[0].grpc_url])
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items() if key != "teachers"]
    command = [sys.executable, "-m", "potstill.cli", "train", *flags, "--teacher", settings["teachers"][0]]
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    trainer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        deadline = time.monotonic() + 300
        while not ((output / "metrics.jsonl").exists() and max(_steps_so_far(output / "metrics.jsonl"), default=0) >= 7):
            assert trainer.poll() is None and time.monotonic() < deadline, "the trainer ended before it was killed"
            time.sleep(0.05)
        trainer.kill()
        trainer.wait()
    finally:
        if trainer.poll() is None:
            trainer.kill()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=environment, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(output, reference)
