"""Bytes per scored position: JSON against protobuf, for several k and sequence lengths.

    python bench/wire_size.py [--lengths 32 128 512 1024] [--ks 5 20 50]

Starts a teacher (a tiny model built on the spot) on loopback ports, scores one random sequence
per (k, length) over HTTP JSON, HTTP protobuf (Accept: application/x-protobuf) and gRPC, and
prints the response sizes per completion position. `OpenAI echo` is /v1/completions with
echo, logprobs=k and max_tokens=0 over the same tokens (legacy format: text-keyed dicts). `gzip` is the JSON body gzip-compressed, what
a client sending `Accept-Encoding: gzip` would receive from a compressing proxy. The
floor of the packed form is 8 + 8k bytes per position (an int32 id and a float32 log-prob, plus
the same for each of the k alternatives); with `logprobs_dtype: float16` it is 6 + 6k.
`vLLM layout` is the same scores written as vLLM's `prompt_logprobs` JSON (per position a dict
from token id to {logprob, rank, decoded_token}, the top-k plus the actual token when outside
it; `vllm.logprobs.Logprob`), built here from our answer since vLLM does not run on this machine.
Decode: seconds per position to turn a body into numpy arrays (ids, log-probs) on the client:
protobuf through `wire.score_response`, vLLM's JSON through json.loads and a rank sort.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from potstill.toy.models import build_tiny_model
from potstill.v1 import teacher_pb2 as pb
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


def vllm_layout(result: dict, decode: Callable[[int], str]) -> bytes:
    """One scored sequence as vLLM's `prompt_logprobs` JSON: per position {id: {logprob, rank, decoded_token}}."""
    positions = []
    for token, token_logprob, top_ids, top_logprobs in zip(
        result["token_ids"], result["token_logprobs"], result["top_ids"], result["top_logprobs"]
    ):
        entry = {str(i): {"logprob": v, "rank": rank, "decoded_token": decode(i)}
                 for rank, (i, v) in enumerate(zip(top_ids, top_logprobs), start=1)}
        # The actual token comes first, as vLLM puts it; its rank is past the top-k when outside it.
        actual = {"logprob": token_logprob, "rank": top_ids.index(token) + 1 if token in top_ids else len(top_ids) + 1,
                  "decoded_token": decode(token)}
        positions.append({str(token): actual, **entry})
    return json.dumps({"prompt_logprobs": positions}).encode()


def decode_vllm_layout(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Top ids and log-probs [L, k] from vLLM's layout: entries sorted by rank (dict order is not a contract)."""
    ids, values = [], []
    for position in json.loads(body)["prompt_logprobs"]:
        ranked = sorted(position.items(), key=lambda item: item[1]["rank"])
        ids.append([int(i) for i, _ in ranked])
        values.append([entry["logprob"] for _, entry in ranked])
    width = min(len(row) for row in ids)
    return np.asarray([row[:width] for row in ids], np.int32), np.asarray([row[:width] for row in values], np.float32)


def seconds_per_call(call: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def measure(http: httpx.Client, stub, request: dict, decode: Callable[[int], str]) -> dict[str, float]:
    """Response sizes in bytes of one score request over each transport, and client decode seconds."""
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
    half = stub.Score(wire.score_request_pb({**request, "logprobs_dtype": "float16"}))
    as_vllm = vllm_layout(as_json.json()["results"][0], decode)
    grpc_bytes = over_grpc.SerializeToString()
    return {
        "grpc16": len(half.SerializeToString()),
        "vllm": len(as_vllm),
        "decode_pb": seconds_per_call(lambda: wire.score_response(pb.ScoreResponse.FromString(grpc_bytes))),
        "decode_vllm": seconds_per_call(lambda: decode_vllm_layout(as_vllm)),
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
    columns = ("k", "L", "OpenAI echo", "vLLM layout", "JSON", "JSON gzip", "HTTP protobuf", "gRPC msg", "gRPC fp16", "floor",
               "JSON/pb", "vLLM/pb", "vLLM/pb fp16", "decode pb µs", "decode vLLM µs")
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "model", max_position_embeddings=max(256, longest))
        options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_top_logprobs=max(args.ks))
        tokenizer = AutoTokenizer.from_pretrained(model)
        decode = lambda token: tokenizer.decode([token])  # noqa: E731
        with BackgroundTeacher(options) as teacher, httpx.Client(base_url=teacher.http_url, timeout=300) as http:
            with grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) as channel:
                stub = teacher_pb2_grpc.TeacherStub(channel)
                for k in args.ks:
                    for length in args.lengths:
                        sequence = {
                            "prompt": [rng.randrange(5, 384) for _ in range(args.prompt_len)],
                            "completion": [rng.randrange(5, 384) for _ in range(length)],
                        }
                        sizes = measure(http, stub, {"sequences": [sequence], "top_logprobs": k}, decode)
                        per = {name: size / length for name, size in sizes.items()}
                        table.add_row(
                            str(k), str(length), f"{per['openai']:.1f}", f"{per['vllm']:.1f}", f"{per['json']:.1f}", f"{per['gzip']:.1f}",
                            f"{per['protobuf']:.1f}", f"{per['grpc']:.1f}", f"{per['grpc16']:.1f}", str(8 + 8 * k),
                            f"{sizes['json'] / sizes['protobuf']:.2f}x", f"{sizes['vllm'] / sizes['grpc']:.1f}x",
                            f"{sizes['vllm'] / sizes['grpc16']:.1f}x", f"{per['decode_pb'] * 1e6:.2f}", f"{per['decode_vllm'] * 1e6:.1f}",
                        )
    Console(width=max(Console().width, 200)).print(table)
    print("JSON/pb: JSON bytes over protobuf bytes; vLLM/pb: vLLM's prompt_logprobs JSON over the gRPC message (float32, "
          "then float16 log-probs); floor: 8 + 8k bytes of packed ids and float32 log-probs; decode: µs per position.")


if __name__ == "__main__":
    main()
