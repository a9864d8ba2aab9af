"""`bench/quality.py`, shortened: every requested row is measured, written as a table, and reused on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


def run_bench(tmp_path: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(BENCH), "--steps", "8", "--seeds", "0", "1", "--eval-rows", "16", "--teacher-steps", "40",
        "--methods", "no distillation", "logit-kd forward KL", "--output", str(tmp_path / "out"), "--cache-dir", str(cache_dir),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}, check=True)


def test_the_quality_bench_measures_each_row_and_reuses_finished_runs(tmp_path, toy_cache_dir):
    run_bench(tmp_path, toy_cache_dir)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"] == 8 and results["seeds"] == [0, 1] and results["train_rows"] == 5000
    assert 0.0 < results["teacher_top1_probability"] <= 1.0 and 0.0 <= results["teacher_top1_above_0.99"] <= 1.0
    curves = results["accuracy_by_step"]
    assert list(curves) == ["no distillation", "logit-kd forward KL"]
    assert curves["no distillation"][0] == dict.fromkeys(["0", "2", "4", "6", "8"], curves["no distillation"][0]["0"])
    for curve in curves["logit-kd forward KL"]:
        assert list(curve) == ["0", "2", "4", "6", "8"]  # step 0, then every quarter of the budget
        assert all(0.0 <= value <= 1.0 for value in curve.values())
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "| method | accuracy @ 2 steps | accuracy @ 4 steps | accuracy @ 6 steps | accuracy @ 8 steps |" in table
    assert table.count("\n| logit-kd forward KL |") == 1 and table.count("\n| no distillation | 0.0% ± 0.0% |") == 1

    metrics = sorted((tmp_path / "out").glob("logit-kd-forward-kl-seed*/metrics.jsonl"))
    assert len(metrics) == 2
    written = [path.stat().st_mtime_ns for path in metrics]
    run_bench(tmp_path, toy_cache_dir)
    assert [path.stat().st_mtime_ns for path in metrics] == written  # finished runs are read back, not trained again
    assert json.loads((tmp_path / "out" / "results.json").read_text())["accuracy_by_step"] == curves


def test_the_rl_world_warms_the_student_up_once_and_reports_steps_to_the_target_pass_rate(tmp_path, toy_cache_dir):
    command = [
        sys.executable, str(BENCH), "--world", "rl", "--steps", "4", "--warm-start", "8", "--seeds", "0", "--eval-rows", "8",
        "--train-rows", "64", "--methods", "grpo", "--output", str(tmp_path / "out"), "--cache-dir", str(toy_cache_dir),
    ]
    subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}, check=True)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["warm_start"] == 8 and results["target_pass_rate"] == 0.5
    rollouts = results["rollouts"]["grpo"]
    assert rollouts["steps_to_target"] == [None]  # 8 steps of sft leave (nearly) every sample wrong
    logged = [json.loads(line) for line in (tmp_path / "out" / "grpo-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert rollouts["late_pass_rate"] == [m["rl/reward"] for m in logged if "rl/reward" in m]  # one log line, at step 4
    assert rollouts["late_pass_rate"][0] < 0.5
    warm = [json.loads(line) for line in (tmp_path / "out" / "warm-start-8-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert warm[-1]["step"] == 8
    grpo = json.loads((tmp_path / "out" / "grpo-seed0" / "config.json").read_text())
    assert grpo["student"] == str(tmp_path / "out" / "warm-start-8-seed0" / "final") and grpo["method"] == "grpo"
    assert "| grpo |" in (tmp_path / "out" / "quality.md").read_text() and "not in 4" in (tmp_path / "out" / "quality.md").read_text()
