"""Images in requests: bytes and time with each picture inline in every sequence or shared once, and
the cost of refusing a decompression bomb.

    python bench/media.py [--samples 1 4 16] [--side 224] [--repeats 5]

Starts a vision teacher (the toy world's tiny Qwen2-VL, untrained, built on the spot) on loopback
ports and scores K sequences that show the same picture (a noisy `side` x `side` PNG, the K samples
of one prompt): once with the picture inline in each sequence's prompt, once in the request's
`media` list named `media:0`. Prints the request sizes as JSON and protobuf, and the median time of
a protobuf score over HTTP. Then it sends a 65-byte PNG declaring 100000 x 100000 pixels (30 GB
decoded) and reports how long the 400 takes.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from potstill.toy.vlm import build_tiny_vlm
from teacher_service import wire
from teacher_service.config import ServeOptions
from teacher_service.media import data_url, image_part
from teacher_service.testing import BackgroundTeacher

PROTOBUF = "application/x-protobuf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16], help="sequences showing the same picture")
    parser.add_argument("--side", type=int, default=224, help="picture width and height in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per row (median reported)")
    return parser.parse_args()


def noisy_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def requests(picture: bytes, samples: int) -> dict[str, dict]:
    completions = [[21 + i % 50, 22] for i in range(samples)]
    text = {"type": "text", "text": "how many?"}
    inline = [{"role": "user", "content": [image_part(picture), text]}]
    shared = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "media:0"}}, text]}]
    return {
        "inline": {"sequences": [{"prompt": inline, "completion": c} for c in completions], "top_logprobs": 5},
        "shared": {"sequences": [{"prompt": shared, "completion": c} for c in completions], "top_logprobs": 5,
                   "media": [data_url(picture)]},
    }


def timed_score(client: httpx.Client, body: bytes, repeats: int) -> float:
    headers = {"Content-Type": PROTOBUF, "Accept": PROTOBUF}
    seconds = []
    for _ in range(repeats + 1):  # the first warms up
        started = time.perf_counter()
        response = client.post("/v1/score", content=body, headers=headers)
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
    return statistics.median(seconds[1:])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    picture = noisy_png(args.side)
    table = Table(title=f"{len(picture)} byte PNG ({args.side}x{args.side}) shown by K sequences of one score request")
    for column in ("K", "form", "JSON bytes", "protobuf bytes", "score ms (protobuf, median)"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as root:
        model = build_tiny_vlm(Path(root) / "vlm")  # its processor resizes pictures to at most 56 x 56
        options = ServeOptions(model=str(model), http_port=0, grpc_port=0, max_images=8)
        with BackgroundTeacher(options) as teacher, httpx.Client(base_url=teacher.http_url, timeout=300) as client:
            for samples in args.samples:
                for form, request in requests(picture, samples).items():
                    body = wire.score_request_pb(request).SerializeToString()
                    too_many = form == "inline" and samples > options.max_images
                    milliseconds = "refused (max_images)" if too_many else f"{1000 * timed_score(client, body, args.repeats):.1f}"
                    table.add_row(str(samples), form, str(len(httpx.Request("POST", "/", json=request).content)), str(len(body)), milliseconds)
            bomb = {"sequences": [{"prompt": [{"role": "user", "content": [image_part(bomb_png())]}], "completion": [21]}]}
            started = time.perf_counter()
            response = client.post("/v1/score", json=bomb)
            refused_ms = 1000 * (time.perf_counter() - started)
    console = Console()
    console.print(table)
    console.print(f"a {len(bomb_png())} byte PNG declaring 100000x100000 pixels: HTTP {response.status_code} in {refused_ms:.1f} ms "
                  f"({response.json()['error']['message']})")


if __name__ == "__main__":
    main()
