"""Weight push: how long a self-teacher takes to serve new weights, against restarting it.

    python bench/weight_push.py [--repeats 5] [--hidden-size 96]

Serves the toy student (`potstill.toy.world.STUDENT_CONFIG`, or a wider one with --hidden-size)
with `potstill serve` in a child process on one thread, as the trainer does for `--teacher ema`,
and pushes other weights of the same shapes with the trainer's `WeightPusher`, four ways: a path
(JSON over HTTP, one message over gRPC) and streamed safetensors (an HTTP body, gRPC chunks).
For each it times the push (call to answer) and the push followed by the first score request,
which must come back on the new version (so: time until the new weights teach), medians of the
repeats, interleaved. The alternative it replaces is a restart: a new `potstill serve` process
started and answering its first score request, timed --restarts times. Ratios are to the restart.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from potstill.toy.models import build_tiny_model
from potstill.toy.world import STUDENT_CONFIG
from teacher_service.testing import TeacherProcess
from trainer_client.weight_push import WeightPusher, safetensors_bytes

SCORE = {"sequences": [{"prompt": [5, 17, 42, 9, 11, 30], "completion": [33, 71, 8, 120, 64, 7]}], "top_logprobs": 20}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=STUDENT_CONFIG["hidden_size"])
    parser.add_argument("--layers", type=int, default=STUDENT_CONFIG["layers"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=2)
    return parser.parse_args()


def scored_version(url: str) -> int:
    response = httpx.post(f"{url}/v1/score", json=SCORE, timeout=120)
    response.raise_for_status()
    return response.json()["results"][0]["model_version"]


def timed_push(teacher: TeacherProcess, pusher: WeightPusher, way: str, weights: dict, path: Path, version: int) -> tuple[float, float]:
    """(seconds of the push, seconds until a score request answers on the new version)."""
    started = time.perf_counter()
    if way.endswith("path"):
        served = asyncio.run(pusher.push_path(str(path), version))
    else:
        served = asyncio.run(pusher.push_tensors(weights, version))
    pushed = time.perf_counter()
    if served != version or scored_version(teacher.http_url) != version:
        raise RuntimeError(f"{way}: the teacher does not serve version {version}")
    return pushed - started, time.perf_counter() - started


def timed_restart(model: Path) -> float:
    """Seconds from starting `potstill serve` to its first score answer."""
    started = time.perf_counter()
    with TeacherProcess(str(model), threads=1) as teacher:
        scored_version(teacher.http_url)
        return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    shape = {"hidden_size": args.hidden_size, "layers": args.layers, "heads": STUDENT_CONFIG["heads"]}
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "student", seed=0, **shape)
        other = build_tiny_model(Path(scratch) / "other", seed=1, **shape)
        weights = dict(AutoModelForCausalLM.from_pretrained(other).named_parameters())
        size = len(safetensors_bytes(weights))
        path = Path(scratch) / "pushed.safetensors"
        save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()}, str(path))
        admin_key = secrets.token_urlsafe(16)
        samples: dict[str, list[tuple[float, float]]] = {}
        with TeacherProcess(str(model), threads=1, env={"POTSTILL_ADMIN_KEYS": admin_key}) as teacher:
            pushers = {"HTTP": WeightPusher(teacher.http_url, admin_key), "gRPC": WeightPusher(teacher.grpc_url, admin_key)}
            ways = [f"{transport} {form}" for transport in pushers for form in ("path", "stream")]
            scored_version(teacher.http_url)  # warm-up
            version = 1
            for repetition in range(args.repeats + 1):  # the first round warms every path up and is dropped
                for way in ways[repetition % len(ways):] + ways[: repetition % len(ways)]:
                    version += 1
                    timing = timed_push(teacher, pushers[way.split()[0]], way, weights, path, version)
                    if repetition:
                        samples.setdefault(way, []).append(timing)
            score_alone = statistics.median(_seconds(lambda: scored_version(teacher.http_url)) for _ in range(args.repeats))
        restart = statistics.median(timed_restart(model) for _ in range(args.restarts))

    parameters = sum(t.numel() for t in weights.values())
    table = Table(title=f"Weight push: toy student, hidden {args.hidden_size}, {args.layers} layers, {parameters / 1e6:.2f} M "
                  f"parameters, {size / 2**20:.2f} MiB of safetensors; medians of {args.repeats}; teacher on one CPU thread")
    for column in ("way", "push, s", "push + first score on the new version, s", "restart / that"):
        table.add_column(column, justify="right")
    for way in ways:
        push = statistics.median(p for p, _ in samples[way])
        first = statistics.median(f for _, f in samples[way])
        table.add_row(way, f"{push:.3f}", f"{first:.3f}", f"{restart / first:.0f}x")
    table.add_row("score request alone (no push)", "", f"{score_alone:.3f}", "")
    table.add_row(f"restart: new process to first score (median of {args.restarts})", "", f"{restart:.2f}", "1x")
    Console(width=max(Console().width, 130)).print(table)


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
