"""Distillation quality at a fixed student budget: which way of learning from teachers works best.

    python bench/quality.py [--world arith|noisy|specialists|guided|on-policy|self-distill|vision|rl] [--steps 2000] [--seeds 0 1 2]
                            [--methods NAME ...] [--train-rows 5000] [--output bench-quality]

A world is a set of toy teachers and the rows (methods) compared on it:
- arith: the main teacher; classic methods (sft, seq-kd, logit-kd with several divergences).
- noisy: a teacher trained on answers that are wrong 30% of the time and one at 50% (and a toy
  judge); single-sample seq-kd against multi-sample distillation (R-MSD) selecting by verifier,
  majority, judge or confidence.
- specialists: an add-only and a sub-only teacher on the mixed task; either alone, their
  mixture, and per-prompt routing (by task tags, by verified answer, by confidence, a gate).
- guided: the main teacher; seq-kd against guidance on demand (teachers asked only where the
  student's own samples all fail), with the share of prompts that asked no teacher.
- on-policy: the main teacher; off-policy logit-kd (forward KL on the data's completions) against
  on-policy distillation (the student's own samples scored by the teacher: JSD(0.5), reverse KL,
  and the policy-gradient form), at equal teacher calls (one scored sequence per prompt and step).
- self-distill: SFT on the references against self-distillation, where an EMA of the student,
  shown the reference answer in its prompt, scores the student's samples (no outside teacher).
- vision: the toy vision teacher (a tiny Qwen2-VL, `potstill.toy.vision`: count squares, name a
  colour, tell which way a bar moves in a video) and a smaller vision student, learning from it
  over the wire with the images and videos in the requests; the same student with
  `--student-media none` (the teacher still sees the pictures, the student only the words) shows
  how much of the answer is in the pixels: chance is 25%.
- rl: no teacher; the student is first trained on ground truth for `warm_start` steps (seed 0's
  student, once, shared by every seed: so some of its samples pass), then learns from its own
  rollouts: plain GRPO against VISD (the same rollouts, 4 per prompt; an EMA self-teacher shown a
  rule judge's feedback sets each token's magnitude). Reported besides accuracy: the steps each
  run takes until its rollouts' pass rate (the verifier's reward on fresh training prompts,
  averaged per log line of 10 steps) first reaches `target`, per seed, and that pass rate over the
  last 50 steps.
Builds (or reuses) the world's toy teachers, serves each with one `potstill serve` process, and
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
import contextlib
import dataclasses
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from potstill.demo import BATCH_SIZE, VERIFIER, default_cache_dir, model_accuracy
from potstill.toy import arithmetic, vision
from potstill.toy.arithmetic import JUDGE_NO, JUDGE_RUBRIC, JUDGE_YES, write_jsonl
from potstill.toy.world import build_student, build_teacher
from teacher_service.testing import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.media import teacher_messages
from trainer_client.pool import TeacherPool
from trainer_client.report import METHOD_STAT_PREFIXES, read_metrics
from trainer_client.trainer import train

SEQ_KD = {"method": "seq-kd", "samples_per_prompt": 1, "sample_temperature": 1.0}
MULTI = {"method": "multi-sample", "samples_per_prompt": 4, "sample_temperature": 1.0}
# One student sample per prompt: as many sequences scored per step as logit-kd on the data.
ON_POLICY = {"method": "on-policy", "student_samples": 1, "student_temperature": 1.0}


@dataclass(frozen=True)
class World:
    """Teachers (pool name -> (toy teacher, tags)), an optional toy judge, and the rows compared:
    row name -> TrainConfig settings plus "use": the teachers it learns from (default: all);
    None is the untrained student. `tasks` tags each data row with its operation."""

    teachers: dict[str, tuple[str, str]]
    methods: dict[str, dict | None]
    judge: str | None = None
    tasks: bool = False
    reference: str = "arith"  # whose accuracy the recovered share is measured against
    vision: bool = False  # the toy vision world's teacher, student and rows (images and videos) instead of arithmetic's
    warm_start: int = 0  # steps of sft on ground truth (seed 0) before each method (rl), shared by every method and seed
    target: float | None = None  # rl: the rollouts' pass rate whose first step is reported


# Rollouts per step: 32 prompts x 4 samples; lr 1e-4 (3e-4 and above knock the warm student's greedy
# accuracy down by half within 20 steps, for grpo and for sft continued at batch 32 alike).
RL = {"batch_size": 32, "student_samples": 4, "student_temperature": 1.0, "lr": 1e-4, "schedule": "constant", "warmup_steps": 0,
      "log_every": 10}


WORLDS: dict[str, World] = {
    "arith": World({"arith": ("arith", "")}, {
        "no distillation": None,
        "sft on ground truth": {"method": "sft"},
        "seq-kd, 1 sample": SEQ_KD,
        "logit-kd forward KL": {"method": "logit-kd", "loss": "forward_kl"},
        "logit-kd forward KL, τ=2": {"method": "logit-kd", "loss": "forward_kl", "temperature": 2.0},
        "logit-kd reverse KL": {"method": "logit-kd", "loss": "reverse_kl"},
        "logit-kd JSD(0.5)": {"method": "logit-kd", "loss": "jsd", "beta": 0.5},
    }),
    "noisy": World({"noisy": ("noisy", ""), "noisy-50": ("noisy-50", "")}, {
        "seq-kd, 1 sample (30% teacher)": {**SEQ_KD, "use": ["noisy"]},
        "multi-sample x4, verifier (30%)": {**MULTI, "select": "verifier", "use": ["noisy"]},
        "multi-sample x4, majority (30%)": {**MULTI, "select": "majority", "use": ["noisy"]},
        "seq-kd, 1 sample (30% + 50% mixture)": SEQ_KD,
        "multi-sample x2 each, majority (30% + 50%)": {**MULTI, "samples_per_prompt": 2, "select": "majority"},
        "multi-sample x4, judge, no verifier (30%)": {**MULTI, "select": "judge", "use": ["noisy"]},
        "multi-sample x4, confidence (30%)": {**MULTI, "select": "confidence", "use": ["noisy"]},
        "multi-sample x4, verifier + adversarial 0.1 (30%)": {**MULTI, "select": "verifier", "adversarial_weight": 0.1,
                                                              "use": ["noisy"]},
    }, judge="judge", reference="noisy"),
    "specialists": World({"add": ("add-only", "add"), "sub": ("sub-only", "sub")}, {
        "seq-kd, add-only teacher": {**SEQ_KD, "use": ["add"]},
        "seq-kd, sub-only teacher": {**SEQ_KD, "use": ["sub"]},
        "seq-kd, mixture of both": SEQ_KD,
        "route by task tags": {**SEQ_KD, "route": "tags"},
        "route to the verified teacher": {**SEQ_KD, "route": "verified"},
        "route to the more confident teacher": {**SEQ_KD, "route": "confidence"},
        "route by a learned gate": {**SEQ_KD, "route": "gate"},
    }, tasks=True, reference="add"),
    "guided": World({"arith": ("arith", "")}, {
        "seq-kd, 1 sample": SEQ_KD,
        "guided, 4 student samples": {"method": "guided", "student_samples": 4, "student_temperature": 1.0,
                                      "samples_per_prompt": 1, "sample_temperature": 1.0},
    }),
    "on-policy": World({"arith": ("arith", "")}, {
        "logit-kd forward KL (off-policy, data)": {"method": "logit-kd", "loss": "forward_kl"},
        "on-policy JSD(0.5)": {**ON_POLICY, "loss": "jsd", "beta": 0.5},
        "on-policy reverse KL": {**ON_POLICY, "loss": "reverse_kl"},
        "on-policy JSD(0.5), lambda 0.5": {**ON_POLICY, "loss": "jsd", "beta": 0.5, "gkd_lambda": 0.5},
        "on-policy policy gradient (-k1)": {**ON_POLICY, "on_policy_update": "policy-gradient"},
    }),
    "self-distill": World({"arith": ("arith", "")}, {
        "sft on ground truth": {"method": "sft"},
        "self-distill, EMA teacher, reference in context": {
            "method": "self-distill", "use": ["ema"], "privileged_template": "{prompt}{reference}\n{prompt}", "loss": "forward_kl",
            "student_samples": 1, "teacher_push_interval": 10},
    }),
    "vision": World({"vision": ("vision-teacher", "")}, {
        "no distillation": None,
        "sft on ground truth": {"method": "sft"},
        "seq-kd, 1 sample": SEQ_KD,
        "logit-kd forward KL": {"method": "logit-kd", "loss": "forward_kl"},
        "text-only student (no pixels), logit-kd": {"method": "logit-kd", "loss": "forward_kl", "student_media": "none"},
    }, reference="vision", vision=True),
    "rl": World({}, {
        "grpo": {**RL, "method": "grpo"},
        "visd (ema teacher, rule-judge feedback)": {**RL, "method": "visd", "use": ["ema"], "ema_decay": 0.99,
                                                    "teacher_push_interval": 10},
    }, warm_start=600, target=0.5),
}
# A vision world's batches: its teacher learnt in batches of 32 (an image is 16 patches, a prompt ~20 tokens).
VISION_BATCH_SIZE, VISION_LR = 32, 1e-3

CHECKPOINTS = 4  # accuracy is measured every steps / CHECKPOINTS


@dataclass(frozen=True)
class Bench:
    """What every run shares: the budget, the data, the served teacher, where runs are written."""

    steps: int
    train_data: Path
    eval_data: Path
    eval_rows: list[dict]
    teacher_urls: dict[str, str]  # pool name -> URL with its name and tags
    judge_url: str | None
    methods: dict[str, dict | None]
    student_cache: Path
    output: Path
    vision: bool = False
    warm_start: int = 0


def toy_student(bench: Bench, seed: int) -> Path:
    cache = bench.student_cache / f"seed-{seed}"
    return vision.build_vision_student(cache, seed=seed) if bench.vision else build_student(cache, seed=seed)


def toy_accuracy(model_dir: Path, rows: list[dict], is_vision: bool) -> float:
    """Greedy held-out accuracy of a toy model, with the trainer's evaluation."""
    return vision.accuracy(*vision.load(model_dir), rows) if is_vision else model_accuracy(model_dir, rows)


def world_rows(world: World, count: int, split: str) -> list[dict]:
    if world.vision:
        return vision.make_rows(count, seed=0, split=split)
    return _with_tasks(arithmetic.make_rows(count, seed=0, split=split), world.tasks)


def write_rows(world: World, rows: list[dict], stem: Path) -> Path:
    """The rows as the trainer reads them: Parquet with the media bytes for a vision world, else JSONL."""
    return vision.write_parquet(rows, stem.with_suffix(".parquet")) if world.vision else write_jsonl(rows, stem.with_suffix(".jsonl"))


def build_teachers(world: World, cache_dir: Path, overrides: dict) -> dict[str, Path]:
    """Each toy teacher (and judge) of the world, built or reused, by its toy name."""
    if world.vision:
        return {"vision-teacher": vision.build_vision_teacher(cache_dir, **overrides)}
    toy_names = {toy for toy, _ in world.teachers.values()} | ({world.judge} if world.judge else set())
    return {toy: build_teacher(toy, cache_dir, **overrides) for toy in sorted(toy_names)}


def run_settings(is_vision: bool) -> dict:
    """What differs between the worlds' runs: batch, learning rate, verifier."""
    if is_vision:
        return {"batch_size": VISION_BATCH_SIZE, "lr": VISION_LR, "verifier": "exact"}
    return {"batch_size": BATCH_SIZE, "lr": 1.5e-3, "verifier": VERIFIER}


def accuracy_curve(bench: Bench, method: str, seed: int) -> dict[int, float]:
    """Held-out accuracy by step for one method and seed; the untrained student is flat at its step-0 value."""
    settings = bench.methods[method]
    student = warm_student(bench) if bench.warm_start else toy_student(bench, seed)
    if settings is None:
        untrained = toy_accuracy(student, bench.eval_rows, bench.vision)
        return {step: untrained for step in (0, *checkpoint_steps(bench.steps))}
    run_dir = run_directory(bench, method, seed)
    if not _finished(run_dir, bench.steps):
        settings = dict(settings)
        # A name the world does not serve is passed on as it is: a self-teacher (ema, self, lagged).
        teachers = [bench.teacher_urls.get(name, name) for name in settings.pop("use", bench.teacher_urls)]
        if settings.get("select") == "judge":  # the toy judge, asked exactly as it was trained
            settings.update(judges=[bench.judge_url], judge_rubrics={"correctness": JUDGE_RUBRIC}, judge_yes=JUDGE_YES, judge_no=JUDGE_NO)
        train_run(bench, student, run_dir, seed, {"teachers": teachers, **settings})
    return {m["step"]: m["eval/accuracy"] for m in read_metrics(run_dir) if "eval/accuracy" in m}


def train_run(bench: Bench, student: Path, run_dir: Path, seed: int, settings: dict) -> None:
    """One training run of the bench's budget on its data (the world's batch and learning rate unless `settings` say otherwise)."""
    config = TrainConfig(**{
        "student": str(student), "data": str(bench.train_data), "eval_data": str(bench.eval_data),
        "output": str(run_dir), "steps": bench.steps, "warmup_steps": min(50, bench.steps // 10),
        "seed": seed, "max_new_tokens": 6, "log_every": max(1, bench.steps // 10), "save_every": 10**9,
        "eval_every": bench.steps // CHECKPOINTS, "eval_rows": len(bench.eval_rows), "eval_max_new_tokens": 6,
        "overwrite": True, **run_settings(bench.vision), **settings,  # an unfinished earlier attempt is run again from the start
    })
    train(config, progress=False)


def warm_student(bench: Bench, seed: int = 0) -> Path:
    """The student of `seed` after `warm_start` steps of sft on ground truth (trained once, then read back).
    The rl world starts every seed's runs from seed 0's: the seeds differ in the rl phase (its data
    order and samples), and one warm start is all a shared 2-core machine affords."""
    run_dir = bench.output / f"warm-start-{bench.warm_start}-seed{seed}"
    if not _finished(run_dir, bench.warm_start):
        train_run(dataclasses.replace(bench, steps=bench.warm_start), toy_student(bench, seed), run_dir, seed, {"method": "sft", "teachers": []})
    return run_dir / "final"


def run_directory(bench: Bench, method: str, seed: int) -> Path:
    return bench.output / f"{re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')}-seed{seed}"


def steps_to_pass_rate(bench: Bench, method: str, seed: int, target: float) -> int | None:
    """The first logged step whose rollouts' pass rate (`rl/reward`) reaches `target` (None: never)."""
    return next((m["step"] for m in read_metrics(run_directory(bench, method, seed)) if m.get("rl/reward", -1.0) >= target), None)


def late_pass_rate(bench: Bench, method: str, seed: int, last: int = 50) -> float:
    """The rollouts' mean pass rate over the run's last `last` steps."""
    rates = [m["rl/reward"] for m in read_metrics(run_directory(bench, method, seed)) if "rl/reward" in m and m["step"] > bench.steps - last]
    return statistics.mean(rates)


def method_statistics(bench: Bench, method: str, seed: int) -> dict[str, float]:
    """A run's method statistics (routing shares, acceptance, calls saved...) averaged over its log lines,
    and the requests it sent its teachers (`teacher/requests`, from teacher_traffic.json)."""
    run_dir = run_directory(bench, method, seed)
    records = [m for m in read_metrics(run_dir) if "loss" in m]
    keys = sorted({k for m in records for k in m if k.startswith(METHOD_STAT_PREFIXES)})
    traffic = run_dir / "teacher_traffic.json"
    requests = {"teacher/requests": sum(e["requests"] for e in json.loads(traffic.read_text()).values())} if traffic.exists() else {}
    return {**{k: statistics.mean(m[k] for m in records if k in m) for k in keys}, **requests}


def teacher_confidence(teacher_url: str, eval_rows: list[dict]) -> tuple[float, float]:
    """At the held-out answers' tokens: the teacher's mean probability on its most likely token,
    and the share of positions where that probability exceeds 0.99 (how little its top-k adds to
    its argmax). A row with media is asked as the trainer asks it (chat turns carrying the pictures)."""

    def prompt(row: dict):
        return teacher_messages(Row(**row)) if row.get("images") or row.get("video") else row["prompt"]

    async def top1_logprobs() -> np.ndarray:
        async with await TeacherPool.connect([teacher_url]) as pool:
            request = {"sequences": [{"prompt": prompt(r), "completion": r["completion"]} for r in eval_rows], "top_logprobs": 1}
            answer = await pool.score(pool.groups()[0].name, request)
        return np.concatenate([result.top_logprobs[:, 0] for result in answer.results])

    top1 = np.exp(asyncio.run(top1_logprobs()))
    return float(top1.mean()), float((top1 > 0.99).mean())


def checkpoint_steps(steps: int) -> list[int]:
    """The steps the table reports: the evaluations' (every steps // CHECKPOINTS) and the last."""
    return [steps // CHECKPOINTS * (i + 1) for i in range(CHECKPOINTS - 1)] + [steps]


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
    parser.add_argument("--world", choices=list(WORLDS), default="arith", help="teachers and rows compared (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2000, help="student steps per run (default: %(default)s, the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="rows to run (default: all of the world's)")
    parser.add_argument("--train-rows", type=int, default=5000, help="distinct training prompts (default: %(default)s)")
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("bench-quality"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default: the toy teachers' own)")
    parser.add_argument("--warm-start", type=int, help="sft steps before the rl world's methods (default: the world's, 600)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one core's worth per benchmark process
    world = WORLDS[args.world]
    if args.warm_start is not None:
        world = dataclasses.replace(world, warm_start=args.warm_start)
    methods = args.methods or list(world.methods)
    unknown = [name for name in methods if name not in world.methods]
    if unknown:
        parser.error(f"unknown rows {unknown} for world {args.world}; choose from: {', '.join(world.methods)}")
    if args.steps < CHECKPOINTS:
        parser.error(f"--steps must be at least {CHECKPOINTS}")

    overrides = {"steps": args.teacher_steps} if args.teacher_steps else {}
    built = build_teachers(world, args.cache_dir, overrides)
    eval_rows = world_rows(world, args.eval_rows, "eval")
    accuracies = {name: toy_accuracy(built[toy], eval_rows, world.vision) for name, (toy, _) in world.teachers.items()}
    # A vision teacher takes a whole batch's pictures in one request (its default allows 8 images).
    serve_options = ("--max-images", "100000", "--max-videos", "100000") if world.vision else ()
    results: dict[str, list[dict[int, float]]] = {}
    stats: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        served = {toy: stack.enter_context(TeacherProcess(str(path), *serve_options, threads=1)) for toy, path in built.items()}
        bench = Bench(
            steps=args.steps, train_data=write_rows(world, world_rows(world, args.train_rows, "train"), args.output / "train"),
            eval_data=write_rows(world, eval_rows, args.output / "eval"), eval_rows=eval_rows,
            teacher_urls={name: f"{served[toy].grpc_url}#name={name}" + (f"&tags={tags}" if tags else "")
                          for name, (toy, tags) in world.teachers.items()},
            judge_url=served[world.judge].grpc_url if world.judge else None, methods=world.methods,
            student_cache=args.cache_dir / "bench-students", output=args.output, vision=world.vision, warm_start=world.warm_start,
        )
        no_teacher = (float("nan"), float("nan"))
        top1_mean, top1_sure = teacher_confidence(served[world.teachers[world.reference][0]].grpc_url, eval_rows) if world.teachers else no_teacher
        for name in methods:
            results[name] = [accuracy_curve(bench, name, seed) for seed in args.seeds]
            stats[name] = [method_statistics(bench, name, seed) for seed in args.seeds]
            finals = ", ".join(f"{curve[args.steps]:.1%}" for curve in results[name])
            Console().print(f"{name}: {finals}  ({time.perf_counter() - started:.0f} s so far)")

    teacher_accuracy = accuracies.get(world.reference, 0.0)
    header, rows = results_table(results, args.steps, teacher_accuracy)
    header, rows = [*header, f"Δ vs '{methods[0]}'", "method statistics (mean over logs and seeds)"], [
        [*row, gap_against(results[methods[0]], results[name], args.steps), summarise(stats[name])]
        for row, name in zip(rows, methods)
    ]
    rollouts = {}
    if world.target is not None:
        rollouts = {name: {"steps_to_target": [steps_to_pass_rate(bench, name, seed, world.target) for seed in args.seeds],
                           "late_pass_rate": [late_pass_rate(bench, name, seed) for seed in args.seeds]} for name in methods}
        header, rows = [*header, f"steps to pass rate ≥ {world.target:.0%} (per seed)", "pass rate, last 50 steps"], [
            [*row, rl_steps_text(rollouts[name]["steps_to_target"], args.steps), rl_rates_text(rollouts[name]["late_pass_rate"])]
            for row, name in zip(rows, methods)
        ]
    teachers_text = ", ".join(f"{name} {accuracy:.1%}" for name, accuracy in accuracies.items())
    run = run_settings(world.vision)
    per_step = f"{RL['batch_size']} prompts x {RL['student_samples']} rollouts" if world.target is not None else f"{run['batch_size']} prompts"
    start = f"from seed 0's student after {world.warm_start} steps of sft; " if world.warm_start else ""
    teachers = (f"teachers (greedy): {teachers_text}; {world.reference}'s mean top-1 probability at answer tokens {top1_mean:.3f} "
                f"(> 0.99 at {top1_sure:.1%} of them)") if world.teachers else "no teacher"
    title = (f"World '{args.world}'. Held-out accuracy ({args.eval_rows} problems, verifier: {run['verifier']}) after {args.steps} steps x "
             f"{per_step} drawn from {args.train_rows} training rows, {start}seeds {', '.join(map(str, args.seeds))}; {teachers}")
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    (args.output / "quality.md").write_text(f"{title}\n\n{markdown(header, rows)}")
    (args.output / "results.json").write_text(json.dumps(
        {"world": args.world, "steps": args.steps, "seeds": args.seeds, "train_rows": args.train_rows,
         "teacher_accuracy": teacher_accuracy, "teacher_accuracies": accuracies,
         "teacher_top1_probability": top1_mean, "teacher_top1_above_0.99": top1_sure,
         "accuracy_by_step": {name: [{str(k): v for k, v in curve.items()} for curve in curves] for name, curves in results.items()},
         "method_statistics": stats, "warm_start": world.warm_start, "target_pass_rate": world.target, "rollouts": rollouts},
        indent=1))


def rl_steps_text(steps: list[int | None], budget: int) -> str:
    """'120 / 80 / not in 300', then the mean and spread over the seeds that reached the target."""
    reached = [s for s in steps if s is not None]
    per_seed = " / ".join(str(s) if s is not None else f"not in {budget}" for s in steps)
    if not reached:
        return per_seed
    spread = statistics.stdev(reached) if len(reached) > 1 else 0.0
    return f"{per_seed} (mean {statistics.mean(reached):.0f} ± {spread:.0f} over {len(reached)})"


def rl_rates_text(rates: list[float]) -> str:
    return f"{mean_std(rates)} ({' / '.join(f'{r:.1%}' for r in rates)})"


def _with_tasks(rows: list[dict], tasks: bool) -> list[dict]:
    """The rows, each tagged with its operation as its `task` when asked (the specialists' routing key)."""
    return [{**row, "task": "add" if "+" in row["prompt"] else "sub"} for row in rows] if tasks else rows


def gap_against(baseline: list[dict[int, float]], other: list[dict[int, float]], steps: int) -> str:
    """Mean final-accuracy difference, and whether it exceeds the larger of the two seed spreads."""
    a, b = [c[steps] for c in baseline], [c[steps] for c in other]
    if a == b:
        return "—"
    spread = max(statistics.stdev(a) if len(a) > 1 else 0.0, statistics.stdev(b) if len(b) > 1 else 0.0)
    gap = statistics.mean(b) - statistics.mean(a)
    return f"{gap:+.1%} ({'exceeds' if abs(gap) > spread else 'within'} spread {spread:.1%})"


def summarise(per_seed: list[dict[str, float]]) -> str:
    keys = sorted({k for s in per_seed for k in s})
    return ", ".join(f"{k} {statistics.mean(s[k] for s in per_seed if k in s):.2f}" for k in keys) or "—"


if __name__ == "__main__":
    main()
