"""`python -m potstill.toy DIR`: build the toy world into one folder, for deployments.

The Docker Compose stack and the Kubernetes dev overlay serve and train on a toy world built
inside the cluster (no download): `DIR/models/<teacher>` and `DIR/models/student` load with
`from_pretrained`, `DIR/data/{train,eval}.jsonl` are the rows `potstill train` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.world import TEACHER_SPECS, build_student, build_teacher


def build_world(root: Path, teacher: str | None, seed: int, teacher_steps: int | None, train_rows: int, eval_rows: int) -> None:
    if teacher:
        overrides = {"steps": teacher_steps} if teacher_steps else {}
        print(f"teacher: {build_teacher(teacher, root / 'models', seed=seed, **overrides)}", flush=True)
    print(f"student: {build_student(root / 'models', seed=seed)}", flush=True)
    print(f"train rows: {write_jsonl(make_rows(train_rows, seed=seed), root / 'data' / 'train.jsonl')}")
    print(f"eval rows: {write_jsonl(make_rows(eval_rows, seed=seed, split='eval'), root / 'data' / 'eval.jsonl')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m potstill.toy", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to build into (reused: finished models are not rebuilt)")
    teachers = parser.add_mutually_exclusive_group()
    teachers.add_argument("--teacher", default="arith", choices=sorted(TEACHER_SPECS), help="which toy teacher (default: %(default)s)")
    teachers.add_argument("--no-teacher", dest="teacher", action="store_const", const=None,
                          help="only the student and the data (a trainer's node needs no teacher)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default: the toy teacher's own)")
    parser.add_argument("--train-rows", type=int, default=20_000, help="(default: %(default)s)")
    parser.add_argument("--eval-rows", type=int, default=200, help="(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    build_world(args.root, args.teacher, args.seed, args.teacher_steps, args.train_rows, args.eval_rows)


if __name__ == "__main__":
    main()
