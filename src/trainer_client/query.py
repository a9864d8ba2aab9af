"""`potstill query URL info|score|generate`: ask one teacher endpoint and print its answer.

    potstill query grpc://localhost:50051 info
    potstill query http://localhost:8000 score --prompt "2+2=" --completion "4" -k 5
    potstill query openai+http://localhost:8000/v1 generate --prompt "hello" -n 2 --max-tokens 16 --seed 0
    potstill query grpc://localhost:50051 score --prompt "hi" --completion " there" --json
    potstill query http://localhost:8000 generate --prompt "how many squares?" --image shapes.png

Any URL `connect_client` takes works. Token text is shown with a tokenizer: `--tokenizer`, or the
teacher's model path where it exists on this machine; without one, token ids are shown. `--json`
prints the answer exactly as the teacher's JSON endpoints would (`ModelInfo`, `ScoreResponse`,
`GenerateResponse`).

`--image PATH` and `--video PATH` (an animated GIF, PNG or WebP, or a directory of frame images in
name order) make the prompt one user turn holding the pictures, then the prompt text, for a
vision teacher (grpc:// or http:// URLs; the OpenAI client sends text only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from teacher_service.media import animation_part, image_part, video_part
from teacher_service.protocol import GenerateResponse, ModelInfo, ScoreResponse, TokenDistributions
from trainer_client.teachers import OpenAITeacherClient, TeacherClientError, connect_client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="teacher endpoint: grpc://, grpcs://, http://, https://, openai+http(s)://host:port/v1")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the answer as JSON instead of tables")
    common.add_argument("--api-key-file", type=Path, help="file holding the teacher's API key")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    common.add_argument("--ca-file", help="PEM certificates to trust for grpcs:// and https:// (default: the system's)")
    common.add_argument("--tokenizer", help="tokenizer path or hub id for token text (default: the teacher's model, if local)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("info", parents=[common], help="what the teacher serves and its limits")
    media = argparse.ArgumentParser(add_help=False)
    media.add_argument("--image", type=Path, action="append", default=[], help="an image shown before the prompt text (repeatable)")
    media.add_argument("--video", type=Path, action="append", default=[],
                       help="a video shown before the prompt text: an animated GIF/PNG/WebP, or a directory of frames in name order (repeatable)")

    score = actions.add_parser("score", parents=[common, media], help="the teacher's top-k at every completion token")
    score.add_argument("--prompt", required=True, help="the context the teacher conditions on")
    score.add_argument("--completion", required=True, help="the tokens to score")
    score.add_argument("-k", "--top-logprobs", type=int, default=5, help="most likely tokens per position")
    score.add_argument("--temperature", type=float, default=1.0)

    generate = actions.add_parser("generate", parents=[common, media], help="samples with their top-k log-probs")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("-n", type=int, default=1, help="samples")
    generate.add_argument("--max-tokens", type=int, default=16)
    generate.add_argument("-k", "--top-logprobs", type=int, default=5)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    generate.add_argument("--top-p", type=float, default=1.0)


def main(args: argparse.Namespace) -> None:
    console = Console(highlight=False)
    try:
        info, answer, tokenizer = asyncio.run(_query(args))
    except (TeacherClientError, ValueError, OSError) as error:  # OSError: an --image or --video that cannot be read
        Console(stderr=True, highlight=False).print(Text(f"error: {error}", style="red"))
        raise SystemExit(1) from None
    if args.json:
        print(json.dumps(info.model_dump() if answer is None else answer.to_json(), indent=2))
        return
    PRINTERS[args.action](console, args, info, answer, tokenizer)


# --- asking ---


async def _query(args: argparse.Namespace) -> tuple[ModelInfo, Any, Any]:
    api_key = args.api_key_file.read_text().strip() if args.api_key_file else None
    client = connect_client(args.url, api_key=api_key, timeout=args.timeout, ca_file=args.ca_file)
    try:
        info = await client.model_info()
        # OpenAI-compatible endpoints need a tokenizer for text; the others only for display.
        needs_tokenizer = isinstance(client, OpenAITeacherClient) or not args.json
        tokenizer = _load_tokenizer(args.tokenizer or info.model) if needs_tokenizer and args.action != "info" else None
        if isinstance(client, OpenAITeacherClient) and args.action != "info" and (args.image or args.video):
            raise ValueError("--image and --video need a grpc:// or http(s):// teacher URL: the OpenAI client sends text only")
        if isinstance(client, OpenAITeacherClient) and tokenizer is not None:
            await client.close()
            client = connect_client(args.url, api_key=api_key, timeout=args.timeout, ca_file=args.ca_file, tokenizer=tokenizer)
        return info, await ACTIONS[args.action](client, args), tokenizer
    finally:
        await client.close()


async def _info(client, args) -> None:
    return None


async def _score(client, args) -> ScoreResponse:
    request = {
        "sequences": [{"prompt": _prompt(args), "completion": args.completion}],
        "top_logprobs": args.top_logprobs,
        "temperature": args.temperature,
    }
    return await client.score(request)


async def _generate(client, args) -> GenerateResponse:
    request = {
        "prompts": [_prompt(args)],
        "n": args.n,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "top_logprobs": args.top_logprobs,
    }
    return await client.generate(request)


ACTIONS = {"info": _info, "score": _score, "generate": _generate}


def _prompt(args: argparse.Namespace) -> str | list[dict]:
    """The prompt text, or with --image / --video one user turn: the pictures, then the text."""
    if not (args.image or args.video):
        return args.prompt
    parts = [image_part(path.read_bytes()) for path in args.image] + [_video(path) for path in args.video]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]


def _video(path: Path) -> dict:
    if path.is_dir():
        return video_part([frame.read_bytes() for frame in sorted(path.iterdir()) if frame.is_file()])
    return animation_part(path.read_bytes())


def _load_tokenizer(name: str) -> Any | None:
    """A tokenizer from a local path or the local hub cache (never downloaded), or None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # transformers missing, or no such tokenizer here: show ids instead
        return None


# --- printing ---


def _token(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"#{token_id}"
    return repr(tokenizer.decode([int(token_id)]))


def _top_k(tokenizer: Any, ids, logprobs) -> Text:
    return Text("  ".join(f"{_token(tokenizer, i)} {lp:.2f}" for i, lp in zip(ids, logprobs) if math.isfinite(lp)))


def _positions(title: str, view: TokenDistributions, tokenizer: Any) -> Table:
    table = Table(title=Text(title), title_justify="left")
    for column, justify in (("#", "right"), ("id", "right"), ("token", "left"), ("logprob", "right"), ("top-k (token logprob)", "left")):
        table.add_column(column, justify=justify)
    for position, (token_id, logprob, row_ids, row_lps) in enumerate(
        zip(view.token_ids, view.token_logprobs, view.top_ids, view.top_logprobs)
    ):
        table.add_row(str(position), str(int(token_id)), Text(_token(tokenizer, token_id)), f"{logprob:.3f}", _top_k(tokenizer, row_ids, row_lps))
    return table


def _print_info(console: Console, args, info: ModelInfo, answer, tokenizer) -> None:
    table = Table(title=Text(f"teacher {args.url}"), title_justify="left", show_header=False)
    for key, value in info.model_dump().items():
        unknown = key in _MAY_BE_UNKNOWN and value in ("", 0)  # what an OpenAI-compatible endpoint cannot report
        table.add_row(key, Text("unknown" if unknown else str(value)))
    console.print(table)


_MAY_BE_UNKNOWN = {"tokenizer_fingerprint", "vocab_size", "max_model_len", "max_top_logprobs", "max_samples", "max_new_tokens", "max_batch",
                   "model_version"}


def _print_score(console: Console, args, info: ModelInfo, answer: ScoreResponse, tokenizer) -> None:
    result = answer.results[0]
    total = float(result.token_logprobs.sum())
    title = (f"{info.model} (model version {result.model_version}): {len(result.token_ids)} completion tokens after "
             f"{result.prompt_tokens} prompt tokens")
    console.print(_positions(title, result, tokenizer))
    console.print(f"sum of log-probs {total:.3f}, mean {total / max(len(result.token_ids), 1):.3f}")


def _print_generate(console: Console, args, info: ModelInfo, answer: GenerateResponse, tokenizer) -> None:
    result = answer.results[0]
    for index, sample in enumerate(result.samples):
        console.print(Text(f"sample {index} ({sample.finish_reason}, {len(sample.token_ids)} tokens): {sample.text!r}", style="bold"))
        console.print(_positions(f"{info.model}, after {result.prompt_tokens} prompt tokens", sample, tokenizer))


PRINTERS = {"info": _print_info, "score": _print_score, "generate": _print_generate}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="potstill query")
    add_arguments(parser)
    main(parser.parse_args(sys.argv[1:]))
