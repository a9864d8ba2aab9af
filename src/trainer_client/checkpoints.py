"""Resumable checkpoints with no pickle in them: tensors in safetensors, everything else in JSON.

`checkpoints/step-N/` holds
- `model.safetensors`: the student's weights (tied weights stored once);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's per-parameter tensors, and its
  parameter groups and scalar state;
- `scheduler.json`: the learning-rate schedule's position;
- `rng-R.safetensors` + `rng-R.json`: process R's torch (CPU and CUDA), NumPy and Python random
  states, so a resumed run draws the same numbers;
- the files of each extra part of the run's state (`TrainingState.parts`, such as a self-teacher's
  EMA and served weights), in safetensors and JSON too;
- `trainer_state.json`, written last: a folder without it was interrupted and is never resumed.
Model, optimizer and scheduler are written by the main process (data-parallel ranks hold the same;
the shards of a `--sharding fsdp` run are gathered whole first, so its files are like any other run's).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model

from trainer_client.sharding import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)

CHECKPOINT_MARKER = "trainer_state.json"


class CheckpointPart(Protocol):
    """More state a run keeps in its checkpoints, in files of its own (safetensors and JSON)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclass
class TrainingState:
    """What a checkpoint saves and restores."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler
    parts: list[CheckpointPart] = field(default_factory=list)  # saved by the main process, loaded by every one


def checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    found = [p for p in (output / "checkpoints").glob("step-*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpointed_step(output: Path) -> int | None:
    """The step of the newest complete checkpoint (None without one)."""
    found = checkpoints(output)
    return json.loads((found[-1] / CHECKPOINT_MARKER).read_text())["step"] if found else None


def save_checkpoint(state: TrainingState, output: Path, step: int, keep: int = 2) -> None:
    """The state after `step`; the `keep` newest checkpoints are kept. A failed write (a full disk)
    deletes what it wrote and raises `OSError` saying where and how much space is left, rather
    than the serializer's own chained error."""
    accelerator = state.accelerator
    directory = output / "checkpoints" / f"step-{step:08d}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sharded = _gathered_if_sharded(state)  # a collective: before the main process writes alone
        if accelerator.is_main_process:
            if sharded:
                weights, optimizer_state = sharded
                save_file({name: tensor.clone() for name, tensor in weights.items()}, str(directory / "model.safetensors"))
                save_optimizer_state(optimizer_state, directory)
            else:
                save_model(accelerator.unwrap_model(state.model), str(directory / "model.safetensors"))
                save_optimizer_state(state.optimizer.state_dict(), directory)
            (directory / "scheduler.json").write_text(json.dumps(state.scheduler.state_dict()))
            for part in state.parts:
                part.save(directory)
        _save_rng(directory, accelerator.process_index)
    except (OSError, RuntimeError) as error:  # safetensors and torch report a short write as RuntimeError
        shutil.rmtree(directory, ignore_errors=True)
        free = shutil.disk_usage(output).free / 2**20
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"could not write the checkpoint of step {step} to {directory} ({free:.0f} MiB free there): {first_line}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (directory / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
        for old in checkpoints(output)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_from_checkpoint(state: TrainingState, output: Path) -> int:
    """Load the newest complete checkpoint; returns its step (0, with a note, when there is none)."""
    found = checkpoints(output)
    if not found:
        print(f"no checkpoint in {output}/checkpoints: starting from step 0")
        return 0
    directory = found[-1]
    if is_sharded(state.model):
        load_full_model_state(state.model, load_file(str(directory / "model.safetensors")))
        load_full_optimizer_state(state.model, _inner(state.optimizer), load_optimizer_state(directory))
    else:
        load_model(state.accelerator.unwrap_model(state.model), str(directory / "model.safetensors"))
        state.optimizer.load_state_dict(load_optimizer_state(directory))
    state.scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    _load_rng(directory, state.accelerator.process_index)
    for part in state.parts:
        part.load(directory)
    step = json.loads((directory / CHECKPOINT_MARKER).read_text())["step"]
    if state.accelerator.is_main_process:
        print(f"resumed from step {step} ({directory})", flush=True)
    return step


# --- optimizer: tensors apart from the rest ---


def _inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _gathered_if_sharded(state: TrainingState) -> tuple[dict, dict] | None:
    """A sharded model's full weights and optimizer state (every process takes part); None otherwise."""
    if not is_sharded(state.model):
        return None
    return full_model_state(state.model), full_optimizer_state(state.model, _inner(state.optimizer))


def save_optimizer_state(state_dict: dict, directory: Path, name: str = "optimizer") -> None:
    """An optimizer's `state_dict` as `name.safetensors` (its tensors) and `name.json` (the rest)."""
    tensors, scalars = {}, {}
    for parameter, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{parameter}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{parameter}.{key}"] = value
    save_file(tensors, str(directory / f"{name}.safetensors"))
    layout = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    (directory / f"{name}.json").write_text(json.dumps(layout))


def load_optimizer_state(directory: Path, name: str = "optimizer") -> dict:
    layout = json.loads((directory / f"{name}.json").read_text())
    state: dict[int | str, dict[str, Any]] = {}
    entries = {**load_file(str(directory / f"{name}.safetensors")), **layout["scalars"]}
    for key, value in entries.items():
        # Keyed by parameter index, or by parameter name for a sharded model (names hold dots).
        parameter, entry = key.rsplit(".", 1)
        state.setdefault(int(parameter) if parameter.isdigit() else parameter, {})[entry] = value
    return {"state": state, "param_groups": layout["param_groups"]}


# --- random number generators, one set per process ---


def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{index}": s for index, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states = {
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": [version, list(python_state), python_gauss],
    }
    (directory / f"rng-{rank}.json").write_text(json.dumps(states))


def _load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{index}"] for index in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads((directory / f"rng-{rank}.json").read_text())
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
