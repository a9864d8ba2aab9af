"""`potstill demo`: the whole system on an embedded default, on a CPU, with no download.

Build (or reuse) a toy arithmetic teacher, serve it with two real `potstill serve` processes
(one reached over gRPC, one over HTTP), distil a smaller student from them by white-box
logit distillation, evaluate, and write a report with plots. The teacher processes are
stopped on every exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.world import build_student, build_teacher, is_built, load, teacher_spec
from teacher_service.testing import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.evaluation import accuracy
from trainer_client.samples import StudentTokens
from trainer_client.progress import RunProgress
from trainer_client.report import read_metrics, write_report
from trainer_client.trainer import train
from trainer_client.verifiers import get_verifier

VERIFIER = "integer"
# The toy student learns arithmetic far faster per example in large batches (measured: batch 32
# reaches ~14% where batch 128 reaches ~97% after 1000 supervised steps).
BATCH_SIZE = 128


@dataclass(frozen=True)
class DemoOptions:
    output: Path
    cache_dir: Path
    steps: int = 2000
    lr: float = 1.5e-3
    teacher_steps: int | None = None  # None: the toy teacher's own budget
    eval_rows: int = 200
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    teacher_accuracy: float
    student_before: float
    student_after: float
    report: Path

    @property
    def recovered(self) -> float:
        """Share of the teacher's accuracy the student reached."""
        return self.student_after / self.teacher_accuracy if self.teacher_accuracy else 0.0


def run_demo(options: DemoOptions, console: Console | None = None) -> DemoResult:
    console = console or Console()
    # --- build ---
    console.print("[bold]1/4[/] building the toy teacher (cached after the first run) and the student")
    overrides = {"steps": options.teacher_steps} if options.teacher_steps else {}
    teacher_dir = build_toy_teacher(options.cache_dir, options.seed, overrides, console)
    student_dir = build_student(options.cache_dir, seed=options.seed)
    data_dir = options.output / "data"
    train_path = write_jsonl(make_rows(20_000, seed=options.seed), data_dir / "train.jsonl")
    eval_rows = make_rows(options.eval_rows, seed=options.seed, split="eval")
    eval_path = write_jsonl(eval_rows, data_dir / "eval.jsonl")
    teacher_accuracy = model_accuracy(teacher_dir, eval_rows)

    # --- serve and train ---
    console.print(f"[bold]2/4[/] starting two teacher services on loopback (teacher accuracy {teacher_accuracy:.1%})")
    # One thread per teacher process: two of them and the trainer share this machine's cores.
    with TeacherProcess(str(teacher_dir), threads=1) as over_grpc, TeacherProcess(str(teacher_dir), threads=1) as over_http:
        console.print(f"      {over_grpc.grpc_url}  and  {over_http.http_url}")
        console.print(f"[bold]3/4[/] distilling the student: logit-kd, forward KL on the teachers' top-20, {options.steps} steps")
        config = TrainConfig(
            student=str(student_dir),
            teachers=[over_grpc.grpc_url, over_http.http_url],
            data=str(train_path),
            eval_data=str(eval_path),
            output=str(options.output),
            method="logit-kd",
            loss="forward_kl",
            top_k=20,
            steps=options.steps,
            batch_size=BATCH_SIZE,
            lr=options.lr,
            warmup_steps=min(50, options.steps // 10),
            log_every=10,
            eval_every=max(1, options.steps // 6),
            eval_rows=options.eval_rows,
            save_every=max(1, options.steps // 2),
            verifier=VERIFIER,
            eval_max_new_tokens=6,
            seed=options.seed,
        )
        train(config)

    # --- evaluate and report ---
    console.print("[bold]4/4[/] writing the report")
    accuracies = [m["eval/accuracy"] for m in read_metrics(options.output) if "eval/accuracy" in m]
    result = DemoResult(teacher_accuracy, accuracies[0], accuracies[-1], options.output / "report.md")
    write_report(options.output, _summary_markdown(result, options), title="Potstill demo: distilling a toy arithmetic teacher")
    console.print(_summary_table(result))
    console.print(f"report: {result.report}")
    return result


def build_toy_teacher(cache_dir: Path, seed: int, overrides: dict, console: Console) -> Path:
    """The cached "arith" teacher, or a new build with a progress bar (plain lines off a terminal)."""
    steps = teacher_spec("arith", **overrides).steps
    building = not is_built("arith", cache_dir, seed, **overrides)
    with RunProgress(steps, 0, every=max(1, steps // 10), enabled=building, console=console, label="teacher") as bar:
        return build_teacher("arith", cache_dir, seed=seed, on_step=lambda step, loss: bar.update(step, f"loss {loss:.4f}"), **overrides)


def model_accuracy(model_dir: Path, rows: list[dict]) -> float:
    model, tokenizer = load(model_dir)
    return accuracy(model, StudentTokens(tokenizer, max_seq_len=512), [Row(**r) for r in rows], get_verifier(VERIFIER), max_new_tokens=6)


def _rows(result: DemoResult) -> list[tuple[str, str]]:
    return [
        ("teacher", f"{result.teacher_accuracy:.1%}"),
        ("student before", f"{result.student_before:.1%}"),
        ("student after", f"{result.student_after:.1%}"),
        ("teacher accuracy recovered", f"{result.recovered:.1%}"),
    ]


def _summary_table(result: DemoResult) -> Table:
    table = Table(title="Held-out accuracy (2-digit addition and subtraction, greedy, verified)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, value in _rows(result):
        table.add_row(name, value)
    return table


def _summary_markdown(result: DemoResult, options: DemoOptions) -> str:
    rows = "\n".join(f"| {name} | {value} |" for name, value in _rows(result))
    return (
        f"White-box distillation (logit-kd, forward KL on the top-20, {options.steps} steps, batch {BATCH_SIZE}) "
        "of a toy arithmetic teacher served by two `potstill serve` processes (gRPC and HTTP).\n\n"
        f"| model | held-out accuracy |\n|---|---|\n{rows}\n"
    )


# --- command line ---


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "potstill" / "toy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoOptions(output=Path("potstill-demo"), cache_dir=default_cache_dir())
    parser.add_argument("--output", type=Path, default=defaults.output, help="report, plots, metrics and the student (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir, help="where toy models are built and reused (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="student optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="student peak learning rate (default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default: the toy teacher's own)")
    parser.add_argument("--eval-rows", type=int, default=defaults.eval_rows, help="held-out problems (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def main(args: argparse.Namespace) -> None:
    options = DemoOptions(
        output=args.output, cache_dir=args.cache_dir, steps=args.steps, lr=args.lr,
        teacher_steps=args.teacher_steps, eval_rows=args.eval_rows, seed=args.seed,
    )
    run_demo(options)
