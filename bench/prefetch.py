"""How long the student waits on teachers, with and without prefetching.

    python bench/prefetch.py [--steps 60] [--prefetch 4]

Starts a teacher service (HTTP + gRPC on loopback) on a tiny Llama built on the spot, then runs
the same logit-kd training twice: prefetch=0 (each step asks the teacher and waits) and
prefetch=N (teacher requests for the next N micro-batches run while the optimizer works).
Prints the fraction of step time spent waiting on the teacher and the run time, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.config import TrainConfig
from trainer_client.trainer import train


def run(teacher_url: str, student: Path, data: Path, output: Path, steps: int, prefetch: int) -> tuple[float, float]:
    config = TrainConfig(
        student=str(student), teachers=[teacher_url], data=str(data), output=str(output), method="logit-kd",
        steps=steps, batch_size=16, prefetch=prefetch, log_every=steps, save_every=10**9, top_k=20,
    )
    started = time.perf_counter()
    result = train(config, progress=False)
    return result.teacher_wait_fraction, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        teacher = build_tiny_model(root / "teacher", hidden_size=args.teacher_hidden, layers=args.teacher_layers)
        student = build_tiny_model(root / "student", seed=1, hidden_size=64)
        data = write_jsonl(make_rows(2000, seed=0), root / "train.jsonl")
        rows = []
        with BackgroundTeacher(ServeOptions(model=str(teacher), http_port=0, grpc_port=0)) as served:
            for prefetch in (0, args.prefetch):
                wait, seconds = run(served.grpc_url, student, data, root / f"run-{prefetch}", args.steps, prefetch)
                rows.append((prefetch, wait, seconds))
    table = Table(title=f"logit-kd, {args.steps} steps, batch 16, teacher over gRPC on loopback")
    for column in ("prefetch", "waiting on teacher (fraction of step time)", "run seconds", "speed-up vs prefetch 0"):
        table.add_column(column, justify="right")
    baseline = rows[0][2]
    for prefetch, wait, seconds in rows:
        table.add_row(str(prefetch), f"{wait:.1%}", f"{seconds:.1f}", f"{baseline / seconds:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
