"""`potstill train`: build, train, evaluate, save.

Teacher requests for the next `prefetch` micro-batches run on a background event loop while
the optimizer works on the current one; the time the optimizer still waits is logged as
`teacher_wait_s`. With a self-teacher (`--teacher self|ema|lagged`, `self_teacher`) the run
serves its own student, pushing new weights to it between steps. A checkpoint holds the model,
optimizer, scheduler and RNG states (and a self-teacher's weights) and the step; data order and teacher sampling seeds are functions of the step, so `--resume`
continues exactly where the run stopped. Whatever stops a run (teachers unreachable longer than
`teacher_max_wait`, a bug, a full disk), it checkpoints the steps it completed first, and the
command line says in one line how to continue (`--resume`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from potstill.devices import check_device
from potstill.flags import add_schema_arguments, settings_values
from potstill.usage import one_line
from trainer_client.cache_source import (
    CacheSource,
    RecordingSource,
    TeacherCache,
    check_cache,
    check_live_teachers,
    record_run,
    request_settings,
)
from trainer_client.checkpoints import TrainingState, checkpointed_step, resume_from_checkpoint, save_checkpoint
from trainer_client.config import TrainConfig
from trainer_client.data import DataError, Dataset, StreamedRows, load_rows, rows_for_step
from trainer_client.evaluation import Evaluator
from trainer_client.guided import Guided
from trainer_client.judges import JUDGE_TAG
from trainer_client.methods import SFT, LogitKD, Method, SampledTargets, attach_teacher_distributions
from trainer_client.on_policy import OnPolicy, SelfDistill
from trainer_client.pool import PoolRunner, TeacherSpec
from trainer_client.progress import RunProgress
from trainer_client.report import write_report
from trainer_client.rundir import locked, note_stop, prepare, stop_note
from trainer_client.samples import Example, StudentTokens
from trainer_client.self_teacher import SelfTeacher, self_teacher_kind
from trainer_client.sharding import full_model_state, is_sharded, shard_student
from trainer_client.student import StudentView
from trainer_client.student_loss import collate
from trainer_client.student_model import (
    load_processor,
    load_student,
    save_student,
    student_fingerprint,
    trainable_parameters,
    transformer_model,
)
from trainer_client.teachers import TeacherClientError
from trainer_client.tracking import MetricsLog, accelerator_tracking, finish_tracking, start_tracking
from trainer_client.verifiers import get_verifier
from trainer_client.visd import GRPO, VISD

METHODS: dict[str, type[Method]] = {
    "sft": SFT, "seq-kd": SampledTargets, "multi-sample": SampledTargets, "logit-kd": LogitKD, "guided": Guided,
    "on-policy": OnPolicy, "self-distill": SelfDistill,
    "grpo": GRPO, "visd": VISD,
}


@dataclass
class RunResult:
    output: Path
    steps: int
    final_eval: dict[str, float]
    teacher_wait_fraction: float


def train(config: TrainConfig, progress: bool = True) -> RunResult:
    with contextlib.ExitStack() as cleanup:
        # --- build ---
        output = Path(config.output)
        output.mkdir(parents=True, exist_ok=True)
        accelerator = build_accelerator(config, output)
        if accelerator.is_main_process:  # one writer per run directory
            cleanup.enter_context(locked(output))
            prepare(output, config.resume, config.overwrite)
        accelerator.wait_for_everyone()
        set_seed(config.seed)
        tokenizer, model = load_student(config)
        tokens = student_tokens(config, tokenizer)
        data = load_training_rows(config)
        eval_rows = load_eval_rows(config)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        self_teacher = cleanup.enter_context(start_self_teacher(config, accelerator, model, tokenizer, output)) if self_teacher_kind(config) else None
        runner = cleanup.enter_context(teacher_source(config, tokenizer, vocab_size, self_teacher)) if config.teachers or config.teacher_cache else None
        if self_teacher:
            self_teacher.attach(runner)
        student = StudentView(transformer_model(model), tokens)
        if runner:
            traffic = output / ("teacher_traffic.json" if accelerator.is_main_process else f"teacher_traffic.rank{accelerator.process_index}.json")
            cleanup.callback(lambda: traffic.write_text(json.dumps(runner.pool.stats(), indent=2)))
        method = METHODS[config.method](config, tokens, runner.pool if runner else None)
        evaluator = build_evaluator(config, eval_rows, tokens, runner, method) if eval_rows else None
        if config.sharding == "fsdp":  # FSDP does its own gradient reduction: no DDP wrapper from accelerate
            model = shard_student(model.to(accelerator.device), accelerator.device, accelerator.num_processes)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
        if config.sharding == "fsdp":
            optimizer = accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        state = TrainingState(accelerator, model, optimizer, scheduler, parts=[*([self_teacher] if self_teacher else []), *method.checkpoint_parts()])
        start_step = resume_from_checkpoint(state, output) if config.resume else 0
        metrics = MetricsLog(output / "metrics.jsonl", keep_through_step=start_step if config.resume else None,
                             accelerator=accelerator)
        start_tracking(accelerator, config.report_to, output, config.model_dump())
        cleanup.callback(finish_tracking, accelerator)
        if accelerator.is_main_process:
            (output / "config.json").write_text(config.model_dump_json(indent=2))
            if data.skipped:
                print(f"skipped {data.skipped} malformed rows of {config.data}")

        # --- train ---
        # From here on a first Ctrl-C (even during the baseline evaluation) ends the run at a step boundary, checkpointed.
        stop_requested = cleanup.enter_context(_stop_at_step_boundary())
        if evaluator and start_step == 0:
            metrics.write({"step": 0, **evaluator(accelerator.unwrap_model(model))})  # the baseline
        completed = start_step  # steps whose update the model holds: what a checkpoint must record
        if config.record_teacher_cache:
            if accelerator.num_processes > 1:
                raise ValueError("--record-teacher-cache records single-process runs; collect the cache with `potstill collect`")
            # Registered before the prefetcher, so it runs after the prefetcher stopped: nothing is still arriving.
            rows = None if config.data_streaming else len(data)
            cleanup.callback(lambda: record_run(Path(config.record_teacher_cache), runner.pool, request_settings(config, tokens.fingerprint),
                                                {"train": {"source": config.data, "rows": rows}}, (start_step, completed)))
        horizon = self_teacher.prefetch_horizon if self_teacher else None
        prefetcher = cleanup.enter_context(contextlib.closing(Prefetcher(method, data, config, accelerator, runner, student, horizon)))
        waited = stepped = 0.0
        final_eval: dict[str, float] = {}
        try:
            with RunProgress(config.steps, start_step, config.log_every, progress and accelerator.is_main_process) as bar:
                for step in range(start_step, config.steps):
                    started = time.perf_counter()
                    losses, wait = train_step(model, optimizer, scheduler, accelerator, prefetcher, method, step, config)
                    completed = step + 1
                    if self_teacher:
                        self_teacher.after_step(completed)
                    waited, stepped = waited + wait, stepped + time.perf_counter() - started
                    if completed % config.log_every == 0 or completed == config.steps:
                        metrics.write({"step": completed, **losses, **method.stats.drain(), "lr": scheduler.get_last_lr()[0],
                                       "teacher_wait_s": wait, "step_s": time.perf_counter() - started,
                                       "teacher_wait_fraction": waited / stepped})
                    if evaluator and (completed % config.eval_every == 0 or completed == config.steps):
                        if self_teacher and evaluator.teacher_versions.get(self_teacher.kind) != self_teacher.version:
                            evaluator = build_evaluator(config, eval_rows, tokens, runner, method)  # the teacher served now
                        final_eval = evaluator(accelerator.unwrap_model(model))
                        metrics.write({"step": completed, **final_eval})
                    if completed % config.save_every == 0 and completed < config.steps:
                        save_checkpoint(state, output, completed)
                    rate = (completed - start_step) / stepped
                    bar.update(completed,
                               status=f"{rate:.2f} step/s  loss {losses['loss']:.4f}  waiting on teachers {waited / stepped:.0%}")
                    if stop_requested.is_set():
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            save_checkpoint(state, output, completed)
            print(f"interrupted: {completed} completed steps are checkpointed in {output}; continue with --resume")
            raise
        except Exception as error:  # whatever stopped the run, the steps it completed are kept first
            _checkpoint_before_stopping(state, output, completed, error)
            raise

        # --- save (the last evaluation ran at the last step); before the cleanup, which ends the process group ---
        save_final(accelerator, model, tokens.processor or tokenizer, output, config.merge_lora)
    if accelerator.is_main_process:
        write_report(output)  # after the cleanup wrote teacher_traffic.json, which the report plots
    return RunResult(output, config.steps, final_eval, waited / stepped if stepped else 0.0)


@contextlib.contextmanager
def _stop_at_step_boundary():
    """A first Ctrl-C asks the run to stop after the current step (the event is set); a second one
    interrupts at once. Outside the main thread signals cannot be caught, and Ctrl-C interrupts as usual."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_interrupt(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nstopping after this step (Ctrl-C again to stop at once)", flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def student_tokens(config: TrainConfig, tokenizer) -> StudentTokens:
    """How the student encodes rows: its tokenizer, and its processor for the pixels of rows with media (unless --student-media none)."""
    return StudentTokens(tokenizer, config.max_seq_len, load_processor(config.student), see_media=config.student_media == "pixels")


def load_training_rows(config: TrainConfig) -> Dataset | StreamedRows:
    if config.data_streaming:
        return StreamedRows(config.data, config.columns, config.data_split, config.seed, config.shuffle_buffer)
    return load_rows(config.data, config.skip_bad_rows, config.columns, config.data_split)


def load_eval_rows(config: TrainConfig) -> list:
    """The first `eval_rows` held-out rows (none without --eval-data)."""
    if not config.eval_data:
        return []
    return load_rows(config.eval_data, config.skip_bad_rows, config.columns, config.eval_split).rows[: config.eval_rows]


def build_accelerator(config: TrainConfig, output: Path) -> Accelerator:
    """bf16 autocast where the GPU has it (for a float32 student); the device and tracker the config names."""
    # cpu=True on a machine without CUDA: under torchrun, Accelerate then joins the processes over
    # gloo; without it each process would train alone and all of them would write the same run.
    on_cpu = check_device(config.device) == "cpu"
    autocast = not on_cpu and config.dtype == "float32" and torch.cuda.is_bf16_supported()
    if config.device.startswith("cuda:"):
        torch.cuda.set_device(int(config.device.partition(":")[2]))
    accelerator = Accelerator(cpu=on_cpu, mixed_precision="bf16" if autocast else "no", **accelerator_tracking(config.report_to, output))
    if accelerator.distributed_type == DistributedType.FSDP:  # its wrapper would hide the shards from our checkpoints
        raise ValueError("accelerate's FSDP plugin is not used: launch with torchrun (or accelerate launch without --use_fsdp) "
                         "and pass --sharding fsdp")
    return accelerator


def _checkpoint_before_stopping(state: TrainingState, output: Path, completed: int, error: Exception) -> None:
    """Checkpoint the completed steps (unless the newest checkpoint holds them) and note it on `error`."""
    try:
        if checkpointed_step(output) != completed:
            save_checkpoint(state, output, completed)
        note_stop(error, output, completed)
    except OSError as save_error:
        note_stop(error, output, completed, save_error)


def start_self_teacher(config: TrainConfig, accelerator, model, tokenizer, output: Path) -> SelfTeacher:
    if accelerator.num_processes > 1:
        raise ValueError(f"--teacher {self_teacher_kind(config)} serves a single-process run; launch it without torchrun")
    return SelfTeacher.start(config, transformer_model(model), tokenizer, output, str(accelerator.device))


def teacher_source(config: TrainConfig, tokenizer, vocab_size: int, self_teacher: SelfTeacher | None = None) -> PoolRunner:
    """Where the run's teacher answers come from, on a background event loop (`runner.pool`): the live
    teachers, or with `--teacher-cache` the cache (checked against the run), falling back to the live
    teachers for what it lacks with `--cache-miss live`."""
    if not config.teacher_cache:
        runner = connect_teachers(config, tokenizer, vocab_size, self_teacher)
        if config.record_teacher_cache:
            runner.pool = RecordingSource(runner.pool)
        return runner
    cache = TeacherCache(config.teacher_cache)
    check_cache(cache.manifest, request_settings(config, student_fingerprint(config.student, tokenizer)), vocab_size, config.white_box, cache.directory)
    runner = connect_teachers(config, tokenizer, vocab_size) if config.live_teachers else PoolRunner()
    try:
        if runner.pool is not None:
            check_live_teachers(cache.manifest.teachers, runner.pool.groups(), cache.directory)
        runner.pool = CacheSource(cache, fallback=runner.pool)
    except BaseException:
        runner.close()
        raise
    return runner


def connect_teachers(config: TrainConfig, tokenizer, vocab_size: int, self_teacher: SelfTeacher | None = None) -> PoolRunner:
    """Reach every teacher and judge (a self-teacher at its service); white-box methods refuse a teacher whose
    tokenizer differs from the student's."""
    api_key = Path(config.api_key_file).read_text().strip() if config.api_key_file else None
    teachers = [self_teacher.spec if self_teacher and spec == self_teacher.kind else spec for spec in config.teachers]
    return PoolRunner.connect(
        [*teachers, *(judge_spec(url, index) for index, url in enumerate(config.judges))],
        api_key=api_key,
        ca_file=config.teacher_ca_file,
        timeout=config.teacher_timeout,
        max_wait=config.teacher_max_wait,
        student_fingerprint=student_fingerprint(config.student, tokenizer),
        student_vocab_size=vocab_size,
        require_white_box=config.white_box,
        tokenizer=tokenizer,
    )


def judge_spec(url: str, index: int) -> TeacherSpec:
    """A `--judge` endpoint as a pool member tagged `judge` (so no method routes to it), named judge-N unless named."""
    spec = TeacherSpec.parse(url)
    return dataclasses.replace(spec, name=spec.name or f"judge-{index}", tags=(*spec.tags, JUDGE_TAG))


def build_evaluator(config: TrainConfig, rows, tokens: StudentTokens, runner: PoolRunner | None, method: Method) -> Evaluator:
    """Held-out rows; with white-box teachers, their view of the references at temperature 1 is fetched once."""
    with_reference = [r for r in rows if r.completion is not None]
    groups = method.reference_groups(with_reference)
    versions = {}
    if runner and config.white_box and groups:
        runner.run(annotate_held_out(method, groups))
        versions = runner.pool.versions()  # nothing else has asked the teachers yet
    examples = [example for group in groups for example in group.examples(tokens)]
    verify = get_verifier(config.verifier) if config.verifier else None
    return Evaluator(rows, examples, tokens, verify, config.eval_max_new_tokens, teacher_versions=versions)


async def annotate_held_out(method: Method, groups: list) -> None:
    """The teachers' view of held-out references, at temperature 1, from the method's source
    (route lowest-ce first asks every teacher's cross-entropy on them, to pick one)."""
    await method.router.reference_ce(groups)
    teachers = method.router.teachers_for_scoring(groups)
    await attach_teacher_distributions(method.source, teachers, method.tokens, groups, method.config, temperature=1.0)


def train_step(model, optimizer, scheduler, accelerator, prefetcher: Prefetcher, method: Method, step: int, config: TrainConfig):
    """One optimizer step over `grad_accum` micro-batches; returns (losses, seconds waited on teachers).

    The loss is Σ weight · token loss over all the step's micro-batches (on every process) divided
    by their total weight, so a token counts the same whichever micro-batch carries it.
    """
    micros, waited = [], 0.0
    for micro in range(config.grad_accum):
        examples, wait = prefetcher.get(step * config.grad_accum + micro)
        micros.append(examples)
        waited += wait
    local_weight = sum(e.weight * len(e.target_ids) for examples in micros for e in examples)
    total_weight = accelerator.reduce(torch.tensor(local_weight, device=accelerator.device), reduction="sum").item()
    # Σ over processes of each one's mean-reduced gradient: each process scales by the world size.
    scale = accelerator.num_processes / max(total_weight, 1e-12)
    totals: dict[str, float] = {"loss": 0.0}
    unwrapped = transformer_model(accelerator.unwrap_model(model))
    for examples in micros:
        if not examples:
            continue
        batch = collate(examples, model_pad_id(accelerator, model)).to(accelerator.device)
        with accelerator.autocast():
            loss_sum, parts = method.loss(model, unwrapped, batch)
        accelerator.backward(loss_sum * scale)
        for name, value in {"loss": loss_sum.item(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value / max(local_weight, 1e-12)
    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "weight": local_weight}, waited


def model_pad_id(accelerator, model) -> int:
    pad = accelerator.unwrap_model(model).config.get_text_config().pad_token_id
    return pad if pad is not None else 0


class Prefetcher:
    """Runs a method's stages for each micro-batch: `rollout` and `select` on the training thread,
    `annotate` on the teachers' event loop. A method without a rollout has its next `prefetch`
    micro-batches annotated ahead while the optimizer works; one with a rollout starts a step's
    micro-batches when the step starts (all of them, so their teacher calls overlap), with the
    student's weights of that step. `get` blocks only on teachers that have not answered yet, and
    nothing is started at or past `horizon(micro)` (where a self-teacher's next weights begin)."""

    def __init__(self, method: Method, data: Dataset | StreamedRows, config: TrainConfig, accelerator, runner: PoolRunner | None,
                 student: StudentView, horizon: Callable[[int], int] | None = None):
        self.method, self.data, self.config, self.runner, self.student = method, data, config, runner, student
        self.horizon = horizon or (lambda micro: sys.maxsize)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.pending: dict[int, Future] = {}

    def _rows(self, micro: int):
        # Each process takes its own slice of the global micro-batch.
        return rows_for_step(self.data, micro * self.world + self.rank, self.config.batch_size * self.method.draw_factor, self.config.seed)

    def _submit(self, micro: int) -> None:
        if micro not in self.pending and micro < self.config.steps * self.config.grad_accum:
            rows = self._rows(micro)
            coroutine = self.method.annotate(rows, self.method.rollout(self.student, rows, micro), micro)
            self.pending[micro] = self.runner.submit(coroutine) if self.runner else _done(coroutine)

    def get(self, micro: int) -> tuple[list[Example], float]:
        if self.method.uses_student:
            step_start = micro - micro % self.config.grad_accum
            ahead = range(micro, step_start + self.config.grad_accum)
        else:
            ahead = range(micro, min(micro + self.config.prefetch + 1, self.horizon(micro)))
        for later in ahead:
            self._submit(later)
        started = time.perf_counter()
        groups = self.pending.pop(micro).result()
        waited = time.perf_counter() - started
        return self.method.select(groups, self.student), waited

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()


def _done(coroutine) -> Future:
    """Run a coroutine that needs no teacher (SFT) to completion, as a finished future."""
    future: Future = Future()
    future.set_result(asyncio.run(coroutine))
    return future


# --- checkpoints and outputs ---


def save_final(accelerator, model, tokenizer, output: Path, merge_lora: bool = False) -> None:
    accelerator.wait_for_everyone()
    weights = full_model_state(model) if is_sharded(model) else None  # every process gathers, the first writes
    if accelerator.is_main_process:
        save_student(accelerator.unwrap_model(model), tokenizer, output / "final", merge_lora, weights)


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """The `--config` file and a flag per `TrainConfig` field (those in `only` when given)."""
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    parser.add_argument("--teacher", dest="teachers", action="append", metavar="URL",
                        help="teacher endpoint (repeatable): grpc://h:p, http://h:p, openai+http://h:p/v1; "
                        "'#name=N&tags=a,b&weight=W' names, tags or weights it; or a self-teacher: self (the initial student, frozen), "
                        "ema (an EMA of the student, see --ema-decay) or lagged (a copy refreshed every --teacher-push-interval steps), "
                        "served on loopback or at --self-teacher-url (default: none; needed by every method but sft)")
    parser.add_argument("--judge", dest="judges", action="append", metavar="URL",
                        help="judge endpoint (repeatable; any teacher service), for --select judge (default: none)")
    parser.add_argument("--judge-rubric", dest="judge_rubrics", action="append", metavar="NAME=TEMPLATE", type=_rubric,
                        help="judge prompt for one dimension, with {prompt} and {completion} (repeatable; default: "
                        f"{TrainConfig.model_fields['judge_rubrics'].default_factory()})")
    others = {name for name in TrainConfig.model_fields if only is not None and name not in only}
    add_schema_arguments(parser, TrainConfig, skip={"teachers", "judges", "judge_rubrics", *others})


def _rubric(text: str) -> tuple[str, str]:
    name, separator, template = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=TEMPLATE, got {text!r}")
    return name, template


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> TrainConfig:
    """The `--config` file with the flags given over it (flags named in `skip` belong to another schema)."""
    given = argparse.Namespace(**{**vars(args), **dict.fromkeys(skip)})
    values = settings_values(given, TrainConfig, args.config)
    if args.judge_rubrics is not None:
        values["judge_rubrics"] = dict(args.judge_rubrics)
    return TrainConfig(**values)


# A user's mistake: one line naming the flag or file, exit status 2 (see potstill.cli).
USER_ERRORS = (DataError, TeacherClientError, ValueError)


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    try:
        result = train(config)
    except Exception as error:
        note = stop_note(error)
        if note is None or getattr(args, "debug", False):
            raise
        resume = shlex.join(["potstill", *[a for a in getattr(args, "argv", ["train"]) if a != "--resume"], "--resume"])
        print(f"potstill train: error: {one_line(error)}; {note}: {resume}", file=sys.stderr)
        sys.exit(2 if isinstance(error, USER_ERRORS) else 1)
    print(json.dumps({"output": str(result.output), "steps": result.steps, **result.final_eval,
                      "teacher_wait_fraction": round(result.teacher_wait_fraction, 4)}))
    print(f"report: {result.output / 'report.md'}")
