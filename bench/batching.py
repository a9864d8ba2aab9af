"""Cross-request batching and small-request latency: many small requests against one big one.

    python bench/batching.py [--hidden-size 256] [--layers 4] [--repeats 3]

Serves a tiny Llama (the project's 384-token tokenizer; compute dominates at the default size)
in a thread of this process, torch on one thread, and times, each against its one-request
equivalent (throughput ratio = the one request's seconds / the many requests' seconds; 1.0
means many small callers lose nothing):
- 16 concurrent clients each scoring one sequence vs one 16-sequence request, over HTTP and gRPC;
- 8 concurrent single-prompt generate requests (n = 8) vs one 8-prompt request, over gRPC;
- 16 sequential one-sequence score requests vs one 16-sequence request, over HTTP and gRPC.
Repetitions interleave the paths; the table gives medians. On a shared CPU the ratio is what to read.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import torch
from rich.console import Console
from rich.table import Table

from potstill.toy.models import build_tiny_model
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=32, help="max_tokens of the generate requests")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


class Clients:
    """Callers of one teacher: a JSON HTTP client and a gRPC stub per thread, as separate trainers would hold."""

    def __init__(self, teacher: BackgroundTeacher, callers: int):
        self.http = [httpx.Client(base_url=teacher.http_url, timeout=600) for _ in range(callers)]
        channels = [grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) for _ in range(callers)]
        self.grpc = [teacher_pb2_grpc.TeacherStub(channel) for channel in channels]
        self.pool = ThreadPoolExecutor(max_workers=callers)

    def score(self, transport: str, caller: int, request: dict) -> None:
        if transport == "HTTP":
            self.http[caller].post("/v1/score", json=request).raise_for_status()
        else:
            wire.score_response(self.grpc[caller].Score(wire.score_request_pb(request)))

    def generate(self, caller: int, request: dict) -> None:
        wire.generate_response(self.grpc[caller].Generate(wire.generate_request_pb(request)))

    def concurrently(self, calls: list[Callable[[], None]]) -> None:
        for future in [self.pool.submit(call) for call in calls]:
            future.result()


def seconds_of(call: Callable[[], None]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(5, 384) for _ in range(count)]

    sequences = [{"prompt": tokens(args.prompt_len), "completion": tokens(args.completion_len)} for _ in range(16)]
    score_all = {"sequences": sequences, "top_logprobs": 20}
    score_one = [{"sequences": [s], "top_logprobs": 20} for s in sequences]
    prompts = [tokens(16) for _ in range(8)]
    sampling = {"n": 8, "max_tokens": args.new_tokens, "top_logprobs": 20, "seed": 1}
    generate_all = {"prompts": prompts, **sampling}
    generate_one = [{"prompts": [p], **sampling} for p in prompts]

    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "model", hidden_size=args.hidden_size, layers=args.layers,
                                 max_position_embeddings=max(256, args.prompt_len + args.completion_len))
        options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_new_tokens=max(64, args.new_tokens))
        with BackgroundTeacher(options) as teacher:
            clients = Clients(teacher, 16)
            paths: dict[str, Callable[[], None]] = {}
            for transport in ("HTTP", "gRPC"):
                paths[f"score, one 16-sequence request, {transport}"] = lambda t=transport: clients.score(t, 0, score_all)
                paths[f"score, 16 concurrent 1-sequence requests, {transport}"] = lambda t=transport: clients.concurrently(
                    [lambda i=i: clients.score(t, i, score_one[i]) for i in range(16)])
                paths[f"score, 16 sequential 1-sequence requests, {transport}"] = lambda t=transport: [
                    clients.score(t, 0, request) for request in score_one]
            paths["generate, one 8-prompt request (n = 8), gRPC"] = lambda: clients.generate(0, generate_all)
            paths["generate, 8 concurrent 1-prompt requests (n = 8), gRPC"] = lambda: clients.concurrently(
                [lambda i=i: clients.generate(i, generate_one[i]) for i in range(8)])
            for call in paths.values():
                call()  # warm-up: connections, allocator, first-call costs
            samples: dict[str, list[float]] = {name: [] for name in paths}
            names = list(paths)
            for repetition in range(args.repeats):
                for name in names[repetition % len(names):] + names[: repetition % len(names)]:
                    samples[name].append(seconds_of(paths[name]))

    median = {name: statistics.median(seconds) for name, seconds in samples.items()}
    comparisons = [
        ("score, 16 concurrent 1-sequence requests, HTTP", "score, one 16-sequence request, HTTP", 0.9),
        ("score, 16 concurrent 1-sequence requests, gRPC", "score, one 16-sequence request, gRPC", 0.9),
        ("generate, 8 concurrent 1-prompt requests (n = 8), gRPC", "generate, one 8-prompt request (n = 8), gRPC", 0.8),
        ("score, 16 sequential 1-sequence requests, HTTP", "score, one 16-sequence request, HTTP", None),
        ("score, 16 sequential 1-sequence requests, gRPC", "score, one 16-sequence request, gRPC", None),
    ]
    table = Table(title=f"Batching: hidden {args.hidden_size}, {args.layers} layers, score {args.prompt_len} + "
                  f"{args.completion_len} tokens, generate {args.new_tokens} new tokens, k = 20, medians of {args.repeats}")
    for column in ("many requests", "seconds", "one request, seconds", "throughput ratio", "goal"):
        table.add_column(column, justify="right")
    for many, one, goal in comparisons:
        table.add_row(many, f"{median[many]:.3f}", f"{median[one]:.3f}", f"{median[one] / median[many]:.2f}",
                      f">= {goal}" if goal else "")
    http_vs_grpc = (median["score, 16 sequential 1-sequence requests, gRPC"]
                    / median["score, 16 sequential 1-sequence requests, HTTP"])
    table.add_row("16 sequential requests: HTTP vs gRPC", "", "", f"{http_vs_grpc:.2f}", ">= 0.9")
    Console(width=max(Console().width, 140)).print(table)


if __name__ == "__main__":
    main()
