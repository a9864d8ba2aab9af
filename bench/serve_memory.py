"""Peak memory of the HF backend's score and generate at two lengths, with a large vocabulary.

    python bench/serve_memory.py [--vocab 128256] [--score-lengths 512 2048] [--generate-lengths 32 128] [--rows 64]

A one-layer Llama with a 128k vocabulary (the output layer dominates, as in real teachers):
- score: one sequence whose completion is the given number of positions, k = 20;
- generate: `--rows` samples (8 prompts x n = 8 at temperature 1) of the given number of new tokens, k = 20.
Beside each, what a [positions, vocabulary] float32 tensor of the same call would take: scoring
never builds one (chunked log-softmax), and generate used to keep raw logits over [rows, steps,
vocabulary] and a log-softmax of them (two such tensors). Each measurement runs in a fresh
process on the CPU and reports the highest resident memory seen during the call (sampled every
millisecond) minus the resident memory just before it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

import torch
from loss_memory import PeakResident, _resident_mib
from rich.console import Console
from rich.table import Table


def measure(way: str, length: int, vocab: int, rows: int) -> float:
    """Growth of peak memory (MiB) over one score or generate call, in this process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.toy.models import build_tokenizer
    from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams, ScoreItem
    from teacher_service.backends.hf import HFBackend

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=length + 64,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)).eval()
    backend = HFBackend(model, tokenizer, BackendConfig(model="in-memory", max_batch_tokens=1 << 20))
    prompt = torch.randint(5, 384, (16,)).tolist()
    if way == "score":
        call = lambda: backend.score_now([ScoreItem(prompt, torch.randint(5, vocab, (length,)).tolist(), 20)])  # noqa: E731
    else:
        # The end token never ends a sample here: every row runs all `length` steps.
        backend.stop_ids = [vocab + 1]
        params = SamplingParams(n=8, max_tokens=length, temperature=1.0, top_p=1.0, seed=0, top_logprobs=20)
        call = lambda: backend.generate_now([GenerateItem(prompt, params) for _ in range(rows // 8)])  # noqa: E731
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back, so the call cannot reuse it unseen
    baseline = _resident_mib()
    with PeakResident() as peak:
        call()
    return peak.peak - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--score-lengths", type=int, nargs=2, default=[512, 2048])
    parser.add_argument("--generate-lengths", type=int, nargs=2, default=[32, 128])
    parser.add_argument("--rows", type=int, default=64, help="generated samples in the call (a multiple of 8)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a single measurement, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.vocab, args.rows)))
        return

    def in_fresh_process(way: str, length: int) -> float:
        command = [sys.executable, __file__, "--one", way, str(length), "--vocab", str(args.vocab), "--rows", str(args.rows)]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    table = Table(title=f"HF backend peak memory (MiB), vocabulary {args.vocab}, k = 20, CPU, one thread")
    for column in ("call", "positions", "a \\[positions, V] fp32 tensor", "before: generate's kept logits + log-softmax", "peak growth"):
        table.add_column(column, justify="right")
    for length in args.score_lengths:
        dense = length * args.vocab * 4 / 2**20
        table.add_row("score", f"{length}", f"{dense:.0f}", "-", f"{in_fresh_process('score', length):.0f}")
    for length in args.generate_lengths:
        positions = args.rows * length
        dense = positions * args.vocab * 4 / 2**20
        table.add_row(f"generate {args.rows} rows x {length}", f"{positions}", f"{dense:.0f}", f"{2 * dense:.0f}",
                      f"{in_fresh_process('generate', length):.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
