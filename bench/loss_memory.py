"""Peak memory of the student-side loss: full [B, T, V] logits against the chunked loss.

    python bench/loss_memory.py [--vocab 32768] [--lengths 1024 4096] [--chunk 256]

A one-layer Llama with a large vocabulary (the output layer dominates, as in real students)
takes one forward and backward pass of logit-kd (forward KL on a teacher top-20 plus
cross-entropy) on one sequence whose positions are all targets, two ways:
- full: the model's [1, T, V] logits, then the per-token loss on all of them (what the trainer
  did before; TRL's and torchtune's plain KD losses do the same);
- chunked: `student_loss.weighted_loss_sum`, the trainer's loss (output layer, log-softmax and
  divergence on `--chunk` positions at a time, recomputed in the backward pass).
Each measurement runs in a fresh process, on the CPU, and reports the highest resident memory
seen during the step (sampled every millisecond) minus the resident memory just before it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import threading
import time

import torch
from rich.console import Console
from rich.table import Table


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakResident:
    """The highest resident memory seen while inside, sampled every millisecond by a thread."""

    def __enter__(self):
        self.peak, self.running = _resident_mib(), True
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _resident_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def measure(way: str, length: int, vocab: int, chunk: int) -> float:
    """Growth of peak memory (MiB) over one loss forward + backward, in this process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer_client.config import TrainConfig
    from trainer_client.samples import Example
    from trainer_client.student_loss import collate, token_losses, weighted_loss_sum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=length + 8))
    config = TrainConfig(student="s", data="d", method="sft", loss_chunk_size=chunk, ce_weight=1.0)
    ids = torch.randint(vocab, (length + 1,)).tolist()
    # A teacher top-20 drawn directly (a [T, V] tensor here would raise the baseline peak).
    top_ids = torch.stack([torch.randperm(vocab)[:20] for _ in range(length)])  # [T, 20], distinct per position
    top_logprobs = torch.log_softmax(torch.randn(length, 20), -1) - 0.1
    example = Example(ids[:1], ids[1:], 1.0, top_ids.numpy(), top_logprobs.numpy())
    batch = collate([example], pad_id=0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back, so the step cannot reuse it unseen
    baseline = _resident_mib()
    with PeakResident() as peak:
        if way == "full":
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # [1, T, V]
            keep = batch.weights > 0
            loss, _ = token_losses(logits[keep], batch.labels[keep], batch.teacher_ids[keep], batch.teacher_logprobs[keep], config)
            loss.sum().backward()
        else:
            loss, _ = weighted_loss_sum(model, model, batch, config)
            loss.backward()
    return peak.peak - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("WAY", "LENGTH"), help=argparse.SUPPRESS)  # a single measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.vocab, args.chunk)))
        return

    def in_fresh_process(way: str, length: int) -> float:
        command = [sys.executable, __file__, "--one", way, str(length), "--vocab", str(args.vocab), "--chunk", str(args.chunk)]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    table = Table("sequence length", "[T, V] float32 logits", "full logits: peak growth", f"chunked ({args.chunk}): peak growth", "ratio",
                  title=f"Loss step peak memory (MiB), vocabulary {args.vocab}, logit-kd on a top-20 + CE, CPU")
    for length in args.lengths:
        full, chunked = in_fresh_process("full", length), in_fresh_process("chunked", length)
        table.add_row(str(length), f"{length * args.vocab * 4 / 2**20:.0f}", f"{full:.0f}", f"{chunked:.0f}", f"{full / max(chunked, 1):.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
