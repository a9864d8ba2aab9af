"""`potstill demo`, shortened: the whole pipeline runs, reports, and leaves no teacher process behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from potstill.demo import DemoOptions, run_demo

SHORT = ["--steps", "12", "--teacher-steps", "40", "--eval-rows", "32"]


def _teacher_processes() -> list[psutil.Process]:
    """`potstill serve` processes started from this test process, directly or through a child."""
    return [
        p for p in psutil.Process().children(recursive=True)
        if "serve" in p.cmdline() and "potstill.cli" in p.cmdline()
    ]


def test_shortened_demo_runs_end_to_end(tmp_path, toy_cache_dir):
    options = DemoOptions(output=tmp_path / "out", cache_dir=toy_cache_dir, steps=12, teacher_steps=40, eval_rows=32)
    result = run_demo(options)
    assert 0.0 <= result.student_before <= result.teacher_accuracy <= 1.0
    assert result.report.exists()
    report = result.report.read_text()
    assert "teacher accuracy recovered" in report
    for plot in ("loss.png", "kl.png", "accuracy.png", "teacher_traffic.png"):
        assert (options.output / plot).stat().st_size > 0, plot
    traffic = json.loads((options.output / "teacher_traffic.json").read_text())
    assert len(traffic) == 2 and all(t["requests"] > 0 for t in traffic.values()), traffic
    assert {url.split(":")[0] for url in traffic} == {"grpc", "http"}
    assert not _teacher_processes()


def test_ctrl_c_stops_the_demo_and_its_teachers(tmp_path, toy_cache_dir):
    command = [sys.executable, "-m", "potstill.cli", "demo", "--output", str(tmp_path / "out"),
               "--cache-dir", str(toy_cache_dir), *SHORT, "--steps", "100000"]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        for line in demo.stdout:  # wait until training is under way, teachers up
            if line.startswith("3/4"):
                break
        time.sleep(3)
        teachers = _teacher_processes()
        assert len(teachers) == 2
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) != 0
        gone, alive = psutil.wait_procs(teachers, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # whatever failed above, leave nothing running
        leftovers = _teacher_processes()
        demo.kill()  # a no-op once it has exited
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    # The interrupted run kept its progress: a checkpoint to resume from.
    assert list(Path(tmp_path / "out" / "checkpoints").glob("step-*/trainer_state.json"))


def test_teacher_build_shows_progress_and_a_cached_teacher_none(tmp_path, capsys):
    from rich.console import Console

    from potstill.demo import build_toy_teacher

    tiny = {"steps": 6, "hidden_size": 32, "layers": 1, "heads": 2, "batch_size": 8, "train_rows": 100}
    console = Console(file=io.StringIO())  # not a terminal: plain lines
    build_toy_teacher(tmp_path, 0, tiny, console)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == [f"{step}/6" for step in range(1, 7)], lines
    assert all(line.startswith("teacher step ") and "loss" in line for line in lines)
    build_toy_teacher(tmp_path, 0, tiny, console)
    assert capsys.readouterr().out == ""


def test_demo_help_names_its_options(capsys):
    from potstill.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--output" in capsys.readouterr().out
