"""Distillation quality at a fixed student budget: which way of learning from a teacher works best.

    python bench/quality.py [--steps 1000] [--seeds 0 1 2] [--output bench-quality]

Builds (or reuses) the toy arithmetic teacher, serves it with one `potstill serve` process, and
trains the same student from the same initialisation with each method for the same number of
steps on the same prompts (batch 128, as the demo). Reports held-out accuracy (greedy, verified) as mean ± std
over the seeds, and the share of the teacher's accuracy each method recovers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from potstill.demo import BATCH_SIZE, VERIFIER, default_cache_dir, model_accuracy
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.world import build_student, build_teacher
from teacher_service.serve import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.trainer import train

# Row name -> TrainConfig settings; None means the untrained student.
METHODS: dict[str, dict | None] = {
    "no distillation": None,
    "sft on ground truth": {"method": "sft"},
    "seq-kd, 1 sample": {"method": "seq-kd", "samples_per_prompt": 1, "sample_temperature": 1.0},
    "logit-kd forward KL": {"method": "logit-kd", "loss": "forward_kl"},
    "logit-kd reverse KL": {"method": "logit-kd", "loss": "reverse_kl"},
    "logit-kd JSD(0.5)": {"method": "logit-kd", "loss": "jsd", "beta": 0.5},
}


def run_method(settings: dict | None, seed: int, paths: dict[str, Path], teacher_url: str, steps: int, eval_rows: list[dict]) -> float:
    student = build_student(paths["cache"], seed=seed)
    if settings is None:
        return model_accuracy(student, eval_rows)
    config = TrainConfig(
        student=str(student), teachers=[teacher_url], data=str(paths["train"]),
        output=str(paths["output"] / f"{settings['method']}-{settings.get('loss', '')}-{seed}"),
        steps=steps, batch_size=BATCH_SIZE, lr=1.5e-3, warmup_steps=min(50, steps // 10), seed=seed,
        max_new_tokens=6, log_every=max(1, steps // 10), save_every=10**9, **settings,
    )
    result = train(config, progress=False)
    return model_accuracy(result.output / "final", eval_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("bench-quality"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()

    teacher = build_teacher("arith", args.cache_dir)
    eval_rows = make_rows(args.eval_rows, seed=0, split="eval")
    paths = {"cache": args.cache_dir / "bench-students", "output": args.output,
             "train": write_jsonl(make_rows(5000, seed=0), args.output / "train.jsonl")}
    teacher_accuracy = model_accuracy(teacher, eval_rows)
    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    with TeacherProcess(str(teacher), threads=1) as served:
        for name, settings in METHODS.items():
            results[name] = [run_method(settings, seed, paths, served.grpc_url, args.steps, eval_rows) for seed in args.seeds]
            Console().print(f"{name}: {results[name]}  ({time.perf_counter() - started:.0f} s so far)")

    table = Table(title=f"Held-out accuracy after {args.steps} steps x {BATCH_SIZE} prompts, {len(args.seeds)} seeds "
                  f"(teacher: {teacher_accuracy:.1%}, verifier: {VERIFIER})")
    for column in ("method", "accuracy (mean ± std)", "teacher accuracy recovered"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name, values in results.items():
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        table.add_row(name, f"{mean:.1%} ± {spread:.1%}", f"{mean / teacher_accuracy:.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
