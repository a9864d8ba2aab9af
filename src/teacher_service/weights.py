"""New weights for a served model: where they come from, and whether they fit it.

A push names a safetensors file or a Hugging Face save directory on the teacher's machine, or
streams the bytes of one safetensors file (received into a temporary file, never into memory
whole and never unpickled). `check_weights` compares the tensors with the served model before
anything changes: every name must be one of the model's, every shape equal, every value finite,
and every parameter covered (tied parameters, such as an output layer sharing the embedding,
by any one of their names, as `save_pretrained` and `safetensors.torch.save_model` store them).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from teacher_service.errors import InvalidRequest, RequestTooLarge

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def weight_files(path: str) -> list[Path]:
    """The safetensors files a push by path names: the file itself, a directory's model.safetensors,
    or the shards its index lists."""
    given = Path(path)
    if given.is_file():
        return [given]
    if not given.is_dir():
        raise InvalidRequest(f"{path} does not exist on the teacher's machine", field="path")
    if (given / SINGLE_FILE).is_file():
        return [given / SINGLE_FILE]
    if (given / SHARD_INDEX).is_file():
        shards = sorted(set(json.loads((given / SHARD_INDEX).read_text())["weight_map"].values()))
        return [given / shard for shard in shards]
    raise InvalidRequest(f"{path} holds neither {SINGLE_FILE} nor {SHARD_INDEX}", field="path")


def read_weights(files: list[Path], field: str) -> dict[str, torch.Tensor]:
    """Every tensor of the files, on the CPU; a file that is not safetensors is the caller's error at `field`."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as error:
            raise InvalidRequest(f"not a readable safetensors file ({file.name}): {error}", field=field) from None
    if not tensors:
        raise InvalidRequest("the weights hold no tensor", field=field)
    return tensors


async def receive_into_file(chunks: AsyncIterator[bytes], limit: int) -> Path:
    """Write streamed bytes to a temporary file (deleted by the caller), refusing more than `limit` bytes."""
    with tempfile.NamedTemporaryFile(prefix="potstill-weights-", suffix=".safetensors", delete=False) as file:
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"the weights exceed the limit of {limit} bytes (max_weights_bytes)", field="body")
                await asyncio.to_thread(file.write, chunk)  # a slow disk must not hold the event loop
        except BaseException:
            Path(file.name).unlink(missing_ok=True)
            raise
    return Path(file.name)


def check_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that do not fit `model`, naming the first offending one (`weights.<name>`)."""
    served = model.state_dict()
    for name, tensor in tensors.items():
        field = f"weights.{name}"
        if name not in served:
            raise InvalidRequest(f"the served model ({type(model).__name__}) has no tensor of this name", field=field)
        if tensor.shape != served[name].shape:
            raise InvalidRequest(
                f"shape {list(tensor.shape)} does not match the served model's {list(served[name].shape)}"
                f"{_vocabulary_hint(model, served[name], tensor)}", field=field,
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidRequest("holds NaN or infinite values", field=field)
    missing = [aliases[0] for aliases in _parameter_aliases(model) if not any(name in tensors for name in aliases)]
    if missing:
        raise InvalidRequest(f"{len(missing)} of the served model's parameters are missing, the first {missing[0]!r}", field="weights")


def _vocabulary_hint(model: torch.nn.Module, served: torch.Tensor, sent: torch.Tensor) -> str:
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if served.shape[0] == vocab_size and sent.shape[0] != vocab_size:
        return f": a vocabulary of {sent.shape[0]} tokens, the teacher's has {vocab_size}"
    return ""


def _parameter_aliases(model: torch.nn.Module) -> list[list[str]]:
    """The model's parameters, each as the list of names sharing its storage (tied weights)."""
    by_storage: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(parameter.data_ptr(), []).append(name)
    return list(by_storage.values())


@torch.no_grad()
def copy_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite `model`'s tensors in place (cast to each one's dtype and device); checked before."""
    served = model.state_dict()  # shares storage with the parameters
    for name, tensor in tensors.items():
        served[name].copy_(tensor)
