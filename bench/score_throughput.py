"""Score throughput (completion tokens/s) over gRPC, HTTP protobuf and HTTP JSON, against in-process.

    python bench/score_throughput.py [--hidden-size 256] [--layers 4] [--sequences 16] [--completion-len 192] [--k 20]

Builds a tiny Llama (with the project's 384-token tokenizer) and serves it on loopback ports
(a teacher server in a thread of this process), then scores the same batch repeatedly through
each transport and directly with `HFBackend.score_now` (on a worker thread, as the service calls
its backend). Repetitions interleave the paths in a rotating order. Every path ends with the
same numpy arrays on the caller's side (JSON lists are turned into arrays too), so the ratios
are the cost of the transport: serialisation, the socket and parsing. On a shared CPU the model
and the (de)serialisation compete for the same cores; the ratio is what to read.
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
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from potstill.toy.models import build_tiny_model
from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.backends.base import BackendConfig, ScoreItem
from teacher_service.backends.hf import HFBackend
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher

PROTOBUF = "application/x-protobuf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=16, help="sequences per request")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=192)
    parser.add_argument("--k", type=int, default=20, help="top_logprobs")
    parser.add_argument("--repeats", type=int, default=8, help="timed repetitions per path (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def json_arrays(results: list[dict]) -> list[dict[str, np.ndarray]]:
    return [
        {
            "top_ids": np.asarray(r["top_ids"], dtype=np.int32),
            "top_logprobs": np.asarray(r["top_logprobs"], dtype=np.float32),
            "token_logprobs": np.asarray(r["token_logprobs"], dtype=np.float32),
        }
        for r in results
    ]


def paths(teacher: BackgroundTeacher, backend: HFBackend, request: dict) -> dict[str, Callable[[], object]]:
    """Each way of scoring `request`, as a call returning the caller-side arrays."""
    http = httpx.Client(base_url=teacher.http_url, timeout=600)
    stub = teacher_pb2_grpc.TeacherStub(
        grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://"), options=[("grpc.max_receive_message_length", 2**30)])
    )
    items = [ScoreItem(s["prompt"], s["completion"], request["top_logprobs"]) for s in request["sequences"]]
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process-backend")

    def over_grpc():
        return wire.score_response(stub.Score(wire.score_request_pb(request))).results

    def over_http_protobuf():
        body = wire.score_request_pb(request).SerializeToString()
        response = http.post("/v1/score", content=body, headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF})
        response.raise_for_status()
        return wire.score_response(pb.ScoreResponse.FromString(response.content)).results

    def over_http_json():
        response = http.post("/v1/score", json=request)
        response.raise_for_status()
        return json_arrays(response.json()["results"])

    def in_process():
        # On one worker thread, as the service runs its backend (torch keeps a thread team per calling thread).
        return worker.submit(backend.score_now, items).result()

    return {"gRPC": over_grpc, "HTTP protobuf": over_http_protobuf, "HTTP JSON": over_http_json, "in-process": in_process}


def seconds_of(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    request = {
        "sequences": [
            {
                "prompt": [rng.randrange(5, 384) for _ in range(args.prompt_len)],
                "completion": [rng.randrange(5, 384) for _ in range(args.completion_len)],
            }
            for _ in range(args.sequences)
        ],
        "top_logprobs": args.k,
    }
    tokens = args.sequences * args.completion_len
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(
            Path(scratch) / "model",
            hidden_size=args.hidden_size,
            layers=args.layers,
            heads=args.heads,
            max_position_embeddings=max(256, args.prompt_len + args.completion_len),
        )
        backend = HFBackend.load(BackendConfig(model=str(model)))
        options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_top_logprobs=max(20, args.k))
        with BackgroundTeacher(options) as teacher:
            # Interleave the paths repetition by repetition, in a rotating order, so drifting machine load hits all alike.
            calls = paths(teacher, backend, request)
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():
                call()  # warm-up: connections, allocator, first-call costs
            names = list(calls)
            for repetition in range(args.repeats):
                for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
                    samples[name].append(seconds_of(calls[name]))

    reference = statistics.mean(samples["in-process"])
    table = Table(
        title=f"Score throughput: {args.sequences} x ({args.prompt_len} + {args.completion_len}) tokens, k={args.k}, "
        f"hidden {args.hidden_size}, {args.layers} layers, {args.repeats} repetitions"
    )
    for column in ("path", "mean s", "stdev s", "min s", "completion tokens/s", "throughput vs in-process", "overhead ms"):
        table.add_column(column, justify="right")
    for name, seconds in samples.items():
        mean = statistics.mean(seconds)
        table.add_row(
            name, f"{mean:.3f}", f"{statistics.stdev(seconds) if len(seconds) > 1 else 0:.3f}", f"{min(seconds):.3f}",
            f"{tokens / mean:,.0f}", f"{reference / mean:.2f}", f"{(mean - reference) * 1000:+.0f}",
        )
    Console(width=max(Console().width, 120)).print(table)


if __name__ == "__main__":
    main()
