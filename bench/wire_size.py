"""Bytes per scored position: JSON against protobuf, for several k and sequence lengths.

    python bench/wire_size.py [--lengths 32 128 512 1024] [--ks 5 20 50]

Starts a teacher (a tiny model built on the spot) on loopback ports, scores one random sequence
per (k, length) over HTTP JSON, HTTP protobuf (Accept: application/x-protobuf) and gRPC, and
prints the response sizes per completion position. `OpenAI echo` is /v1/completions with
echo, logprobs=k and max_tokens=0 over the same tokens (legacy format: text-keyed dicts). `gzip` is the JSON body gzip-compressed, what
a client sending `Accept-Encoding: gzip` would receive from a compressing proxy. The
floor of the packed form is 8 + 8k bytes per position (an int32 id and a float32 log-prob, plus
the same for each of the k alternatives).
"""

from __future__ import annotations

import argparse
import gzip
import random
import tempfile
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table

from potstill.toy.models import build_tiny_model
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher

PROTOBUF = "application/x-protobuf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512, 1024], help="completion tokens per sequence")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 20, 50], help="top_logprobs values to try")
    parser.add_argument("--prompt-len", type=int, default=16)
    return parser.parse_args()


def measure(http: httpx.Client, stub, request: dict) -> dict[str, int]:
    """Response sizes in bytes of one score request over each transport."""
    as_json = http.post("/v1/score", json=request)
    as_json.raise_for_status()
    message = wire.score_request_pb(request)
    as_protobuf = http.post(
        "/v1/score", content=message.SerializeToString(), headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF}
    )
    as_protobuf.raise_for_status()
    over_grpc = stub.Score(message)
    # The same positions in OpenAI's legacy format: echo the whole sequence, generate nothing.
    sequence = request["sequences"][0]
    openai_style = http.post(
        "/v1/completions",
        json={"prompt": sequence["prompt"] + sequence["completion"], "max_tokens": 0, "echo": True, "logprobs": request["top_logprobs"]},
    )
    openai_style.raise_for_status()
    positions = len(sequence["prompt"]) + len(sequence["completion"]) - 1
    return {
        "openai": round(len(openai_style.content) * len(sequence["completion"]) / positions),
        "json": len(as_json.content),
        "gzip": len(gzip.compress(as_json.content, compresslevel=6)),
        "protobuf": len(as_protobuf.content),
        "grpc": len(over_grpc.SerializeToString()),
    }


def main() -> None:
    args = parse_args()
    longest = args.prompt_len + max(args.lengths)
    rng = random.Random(0)
    table = Table(title="Score response size per completion position (bytes)")
    columns = ("k", "L", "OpenAI echo", "JSON", "JSON gzip", "HTTP protobuf", "gRPC msg", "floor", "JSON/pb", "gzip/pb")
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "model", max_position_embeddings=max(256, longest))
        options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_top_logprobs=max(args.ks))
        with BackgroundTeacher(options) as teacher, httpx.Client(base_url=teacher.http_url, timeout=300) as http:
            with grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) as channel:
                stub = teacher_pb2_grpc.TeacherStub(channel)
                for k in args.ks:
                    for length in args.lengths:
                        sequence = {
                            "prompt": [rng.randrange(5, 384) for _ in range(args.prompt_len)],
                            "completion": [rng.randrange(5, 384) for _ in range(length)],
                        }
                        sizes = measure(http, stub, {"sequences": [sequence], "top_logprobs": k})
                        per = {name: size / length for name, size in sizes.items()}
                        table.add_row(
                            str(k), str(length), f"{per['openai']:.1f}", f"{per['json']:.1f}", f"{per['gzip']:.1f}", f"{per['protobuf']:.1f}",
                            f"{per['grpc']:.1f}", str(8 + 8 * k), f"{sizes['json'] / sizes['protobuf']:.2f}x",
                            f"{sizes['gzip'] / sizes['protobuf']:.2f}x",
                        )
    Console(width=max(Console().width, 120)).print(table)
    print("JSON/pb: JSON bytes over protobuf bytes; floor: 8 + 8k bytes of packed ids and float32 log-probs.")


if __name__ == "__main__":
    main()
