"""Self-teachers: the student as its own teacher, served by a real teacher service.

`--teacher self` serves the student as it was before the first step (frozen), `--teacher ema` an
exponential moving average of its weights, `--teacher lagged` a copy of it refreshed every
`teacher_push_interval` steps. The trainer starts `potstill serve` for it on loopback (the
initial student, saved under `output/self_teacher/initial`), or uses the service at
`self_teacher_url` with its admin key; either way it is an ordinary pool member named after its
kind, so sampling and scoring go through the same clients, batching and retries as any teacher.

EMA, after every optimizer step, in float32:  θ̄ ← d·θ̄ + (1 − d)·θ   (d = `ema_decay`).

After step c with c % N = 0 (N = `teacher_push_interval`) the EMA (or the student's weights, for
`lagged`) is pushed as safetensors, streamed or as a file path (`teacher_push`), as model version
c + 1 (version 1 is the initial student), and the pool is pinned to that version. So steps
[c, c + N) are taught by exactly the weights of step c: prefetching stops at the next push
(`prefetch_horizon`), every answer is checked against the pin, and a checkpoint keeps the EMA and
the served weights, which a resumed run pushes again under the same version.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Awaitable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from teacher_service.testing import TeacherProcess
from trainer_client.config import SELF_TEACHERS, TrainConfig
from trainer_client.pool import PoolRunner
from trainer_client.weight_push import WeightPusher

INITIAL_VERSION = 1
STATE_TENSORS = "self_teacher.safetensors"
STATE_JSON = "self_teacher.json"


def self_teacher_kind(config: TrainConfig) -> str | None:
    """Which self-teacher the run's --teacher list names (at most one), or None."""
    return next((spec for spec in config.teachers if spec in SELF_TEACHERS), None)


class SelfTeacher:
    """The served copy of the student and what keeps it up to date. Build it with `SelfTeacher.start`."""

    def __init__(self, kind: str, config: TrainConfig, model: torch.nn.Module, url: str, admin_key: str,
                 directory: Path, process: TeacherProcess | None = None):
        self.kind = kind
        self.config = config
        self.model = model  # the trained transformers model (unwrapped)
        self.url = url
        self.directory = directory
        self.process = process
        self.pusher = WeightPusher(url, admin_key, timeout=config.teacher_timeout, ca_file=config.teacher_ca_file)
        self.runner: PoolRunner | None = None
        self.ema = self._weights(torch.float32) if kind == "ema" else None
        self.served: dict[str, torch.Tensor] | None = None  # the weights pushed last (None: the initial student)
        self.served_version = INITIAL_VERSION

    @classmethod
    def start(cls, config: TrainConfig, model: torch.nn.Module, tokenizer, output: Path, device: str) -> SelfTeacher:
        """Save the initial student (kept across --resume) and start its teacher service on `device`, or reach `self_teacher_url`."""
        kind = self_teacher_kind(config)
        directory = output / "self_teacher"
        initial = directory / "initial"
        if not (config.resume and initial.is_dir()):
            model.save_pretrained(initial)
            tokenizer.save_pretrained(initial)
        if config.self_teacher_url:
            return cls(kind, config, model, config.self_teacher_url, _admin_key(config), directory)
        admin_key = secrets.token_urlsafe(24)
        process = TeacherProcess(
            str(initial), "--device", device, "--dtype", config.dtype,
            "--max-top-logprobs", str(config.top_k), "--max-new-tokens", str(max(config.max_new_tokens, config.eval_max_new_tokens)),
            "--max-samples", str(max(config.samples_per_prompt, config.student_samples)),
            threads=max(1, torch.get_num_threads() // 2), env={"POTSTILL_ADMIN_KEYS": admin_key},
        ).start()
        return cls(kind, config, model, process.grpc_url, admin_key, directory, process)

    @property
    def spec(self) -> str:
        """The pool member serving it, named after its kind."""
        return f"{self.url}#name={self.kind}"

    def attach(self, runner: PoolRunner) -> None:
        """Serve the initial student as version 1 (pushed to a service the trainer did not start) and pin the pool to it;
        before anything asks the teacher."""
        self.runner = runner
        if self.process is None:
            self._publish(self._weights(), INITIAL_VERSION)
        else:
            self._run(self._pin(INITIAL_VERSION))

    # --- during the run ---

    @torch.no_grad()
    def after_step(self, completed: int) -> None:
        """Fold the step into the EMA; every `teacher_push_interval` steps, serve the new teacher weights."""
        if self.ema is not None:
            for name, parameter in self.model.named_parameters():  # the EMA follows the student to its device
                self.ema[name] = self.ema[name].to(parameter.device).lerp_(parameter.detach().float(), 1 - self.config.ema_decay)
        due = self.kind != "self" and completed % self.config.teacher_push_interval == 0
        if due and completed < self.config.steps:  # after the last step nobody asks
            self._publish(self.ema if self.ema is not None else self._weights(), completed + 1)

    def prefetch_horizon(self, micro: int) -> int:
        """The first micro-batch after `micro` that must wait for the next push (`sys.maxsize`: none)."""
        if self.kind == "self":
            return sys.maxsize
        return next_push_micro(micro, self.config.grad_accum, self.config.teacher_push_interval)

    @property
    def version(self) -> int:
        return self.served_version

    # --- checkpoints (`TrainingState.parts`) ---

    def save(self, directory: Path) -> None:
        tensors = {f"ema.{name}": t for name, t in (self.ema or {}).items()}
        tensors |= {f"served.{name}": t for name, t in (self.served or {}).items()}
        if tensors:
            save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(directory / STATE_TENSORS))
        (directory / STATE_JSON).write_text(json.dumps({"kind": self.kind, "served_version": self.served_version}))

    def load(self, directory: Path) -> None:
        """Restore the EMA and serve the weights the checkpointed run served, under their version."""
        if not (directory / STATE_JSON).is_file():
            raise ValueError(f"{directory} holds no self-teacher state: it was not made with --teacher {self.kind}")
        state = json.loads((directory / STATE_JSON).read_text())
        if state["kind"] != self.kind:
            raise ValueError(f"{directory} was made with --teacher {state['kind']}, not --teacher {self.kind}")
        tensors = load_file(str(directory / STATE_TENSORS)) if (directory / STATE_TENSORS).is_file() else {}
        device = next(self.model.parameters()).device
        if self.ema is not None:
            self.ema = {name: tensors[f"ema.{name}"].to(device) for name in self.ema}
        served = {name.removeprefix("served."): t for name, t in tensors.items() if name.startswith("served.")}
        if served:
            self._publish(served, state["served_version"])

    # --- pushing ---

    def _weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A copy of the student's parameters (tied ones once), in `dtype` (default: their own)."""
        return {name: p.detach().to(dtype or p.dtype, copy=True) for name, p in self.model.named_parameters()}

    def _publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Serve `weights` as `version` and pin the pool to it; they are kept for the next checkpoint."""
        snapshot = {name: t.detach().cpu().clone() for name, t in weights.items()}
        if self.config.teacher_push == "path":
            self.directory.mkdir(parents=True, exist_ok=True)
            pushed = (self.directory / "pushed.safetensors").resolve()
            save_file(snapshot, str(pushed))
            served = self._run(self.pusher.push_path(str(pushed), version))
        else:
            served = self._run(self.pusher.push_tensors(snapshot, version))
        self._run(self._pin(served))
        self.served, self.served_version = snapshot, served

    async def _pin(self, version: int) -> None:
        self.runner.pool.pin_version(self.kind, version)

    def _run(self, coroutine: Awaitable):
        """On the pool's event loop, where the teacher's clients live."""
        return self.runner.run(coroutine)

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> SelfTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def next_push_micro(micro: int, grad_accum: int, interval: int) -> int:
    """The first micro-batch taught by the weights of the next push after `micro`'s step: pushes
    follow steps c = k·interval, and step c is micro-batches [c·grad_accum, (c + 1)·grad_accum)."""
    return (micro // grad_accum // interval + 1) * interval * grad_accum


def _admin_key(config: TrainConfig) -> str:
    if not config.admin_key_file:
        raise ValueError("--self-teacher-url needs --admin-key-file: the key its weight pushes are sent with")
    return Path(config.admin_key_file).read_text().strip()
