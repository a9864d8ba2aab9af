"""Distillation quality at a fixed student budget: which way of learning from a teacher works best.

    python bench/quality.py [--steps 2000] [--seeds 0 1 2] [--methods NAME ...]
                            [--train-rows 5000] [--output bench-quality]

Builds (or reuses) the toy arithmetic teacher, serves it with one `potstill serve` process, and
trains the same student from the same initialisation with each method for the same number of
steps on the same prompts (batch 128, as the demo). Reports held-out accuracy (greedy, verified,
measured by the trainer's own evaluation) after each quarter of the budget as mean ± std over
the seeds, the share of the teacher's accuracy each method recovers, and how confident the
teacher is at the answers' tokens (a near one-hot teacher gives white-box methods little to add).

A run whose metrics already reach the last step is read back, not trained again, so an
interrupted benchmark picks up at the run it stopped in (which starts again from step 0); give
each setting (steps, training rows) its own --output. The table is printed and written, as
Markdown, to OUTPUT/quality.md, with the raw numbers in OUTPUT/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from potstill.demo import BATCH_SIZE, VERIFIER, default_cache_dir, model_accuracy
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.world import build_student, build_teacher
from teacher_service.testing import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.pool import TeacherPool
from trainer_client.report import read_metrics
from trainer_client.trainer import train

# Row name -> TrainConfig settings; None means the untrained student.
METHODS: dict[str, dict | None] = {
    "no distillation": None,
    "sft on ground truth": {"method": "sft"},
    "seq-kd, 1 sample": {"method": "seq-kd", "samples_per_prompt": 1, "sample_temperature": 1.0},
    "logit-kd forward KL": {"method": "logit-kd", "loss": "forward_kl"},
    "logit-kd forward KL, τ=2": {"method": "logit-kd", "loss": "forward_kl", "temperature": 2.0},
    "logit-kd reverse KL": {"method": "logit-kd", "loss": "reverse_kl"},
    "logit-kd JSD(0.5)": {"method": "logit-kd", "loss": "jsd", "beta": 0.5},
}
CHECKPOINTS = 4  # accuracy is measured every steps / CHECKPOINTS


@dataclass(frozen=True)
class Bench:
    """What every run shares: the budget, the data, the served teacher, where runs are written."""

    steps: int
    train_data: Path
    eval_data: Path
    eval_rows: list[dict]
    teacher_url: str
    student_cache: Path
    output: Path


def accuracy_curve(bench: Bench, method: str, seed: int) -> dict[int, float]:
    """Held-out accuracy by step for one method and seed; the untrained student is flat at its step-0 value."""
    settings = METHODS[method]
    student = build_student(bench.student_cache / f"seed-{seed}", seed=seed)
    if settings is None:
        untrained = model_accuracy(student, bench.eval_rows)
        return {step: untrained for step in (0, *checkpoint_steps(bench.steps))}
    run_dir = bench.output / f"{re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')}-seed{seed}"
    if not _finished(run_dir, bench.steps):
        config = TrainConfig(
            student=str(student), teachers=[bench.teacher_url], data=str(bench.train_data), eval_data=str(bench.eval_data),
            output=str(run_dir), steps=bench.steps, batch_size=BATCH_SIZE, lr=1.5e-3, warmup_steps=min(50, bench.steps // 10),
            seed=seed, max_new_tokens=6, log_every=max(1, bench.steps // 10), save_every=10**9,
            eval_every=bench.steps // CHECKPOINTS, eval_rows=len(bench.eval_rows), verifier=VERIFIER, eval_max_new_tokens=6, **settings,
        )
        train(config, progress=False)
    return {m["step"]: m["eval/accuracy"] for m in read_metrics(run_dir) if "eval/accuracy" in m}


def teacher_confidence(teacher_url: str, eval_rows: list[dict]) -> tuple[float, float]:
    """At the held-out answers' tokens: the teacher's mean probability on its most likely token,
    and the share of positions where that probability exceeds 0.99 (how little its top-k adds to
    its argmax)."""

    async def top1_logprobs() -> np.ndarray:
        async with await TeacherPool.connect([teacher_url]) as pool:
            request = {"sequences": [{"prompt": r["prompt"], "completion": r["completion"]} for r in eval_rows], "top_logprobs": 1}
            answer = await pool.score(pool.groups()[0].name, request)
        return np.concatenate([result.top_logprobs[:, 0] for result in answer.results])

    top1 = np.exp(asyncio.run(top1_logprobs()))
    return float(top1.mean()), float((top1 > 0.99).mean())


def checkpoint_steps(steps: int) -> list[int]:
    return [steps * (i + 1) // CHECKPOINTS for i in range(CHECKPOINTS)]


def _finished(run_dir: Path, steps: int) -> bool:
    return any(m.get("step") == steps and "eval/accuracy" in m for m in read_metrics(run_dir))


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} ± {spread:.1%}"


def results_table(results: dict[str, list[dict[int, float]]], steps: int, teacher_accuracy: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method, accuracy at each checkpoint (mean ± std over seeds), per-seed finals, recovered."""
    header = ["method", *(f"accuracy @ {s} steps" for s in checkpoint_steps(steps)), f"per seed @ {steps}", "teacher accuracy recovered"]
    rows = []
    for name, curves in results.items():
        finals = [curve[steps] for curve in curves]
        rows.append([
            name,
            *(mean_std([curve[s] for curve in curves]) for s in checkpoint_steps(steps)),
            " / ".join(f"{value:.1%}" for value in finals),
            f"{statistics.mean(finals) / teacher_accuracy:.1%}" if teacher_accuracy else "n/a (teacher at 0%)",
        ])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="student steps per run (default: %(default)s, the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="NAME",
                        help=f"rows to run (default: all of {', '.join(METHODS)})")
    parser.add_argument("--train-rows", type=int, default=5000, help="distinct training prompts (default: %(default)s)")
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("bench-quality"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default: the toy teacher's own)")
    args = parser.parse_args()
    if args.steps < CHECKPOINTS:
        parser.error(f"--steps must be at least {CHECKPOINTS}")

    teacher = build_teacher("arith", args.cache_dir, **({"steps": args.teacher_steps} if args.teacher_steps else {}))
    eval_rows = make_rows(args.eval_rows, seed=0, split="eval")
    teacher_accuracy = model_accuracy(teacher, eval_rows)
    results: dict[str, list[dict[int, float]]] = {}
    started = time.perf_counter()
    with TeacherProcess(str(teacher), threads=1) as served:
        bench = Bench(
            steps=args.steps, train_data=write_jsonl(make_rows(args.train_rows, seed=0), args.output / "train.jsonl"),
            eval_data=write_jsonl(eval_rows, args.output / "eval.jsonl"), eval_rows=eval_rows,
            teacher_url=served.grpc_url, student_cache=args.cache_dir / "bench-students", output=args.output,
        )
        top1_mean, top1_sure = teacher_confidence(served.grpc_url, eval_rows)
        for name in args.methods:
            results[name] = [accuracy_curve(bench, name, seed) for seed in args.seeds]
            finals = ", ".join(f"{curve[args.steps]:.1%}" for curve in results[name])
            Console().print(f"{name}: {finals}  ({time.perf_counter() - started:.0f} s so far)")

    header, rows = results_table(results, args.steps, teacher_accuracy)
    title = (f"Held-out accuracy ({args.eval_rows} problems, verifier: {VERIFIER}) after {args.steps} steps x {BATCH_SIZE} "
             f"prompts drawn from {args.train_rows} training rows, seeds {', '.join(map(str, args.seeds))}; "
             f"teacher: {teacher_accuracy:.1%}, mean top-1 probability at answer tokens {top1_mean:.3f} "
             f"(> 0.99 at {top1_sure:.1%} of them)")
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    (args.output / "quality.md").write_text(f"{title}\n\n{markdown(header, rows)}")
    (args.output / "results.json").write_text(json.dumps(
        {"steps": args.steps, "seeds": args.seeds, "train_rows": args.train_rows, "teacher_accuracy": teacher_accuracy,
         "teacher_top1_probability": top1_mean, "teacher_top1_above_0.99": top1_sure,
         "accuracy_by_step": {name: [{str(k): v for k, v in curve.items()} for curve in curves] for name, curves in results.items()}},
        indent=1))


if __name__ == "__main__":
    main()
