"""Device names (`auto`, `cpu`, `cuda`, `cuda:N`) checked against this machine before any model loads."""

from __future__ import annotations

import re

from potstill.usage import UsageError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


class DeviceUnavailable(UsageError):
    """The asked device does not exist here; the message is one line saying what to use instead."""


def check_device(name: str) -> str:
    """`name` when this machine has it ('auto' resolved to 'cuda' or 'cpu'); `DeviceUnavailable` otherwise."""
    import torch

    if not re.match(DEVICE_PATTERN, name):
        raise DeviceUnavailable(f"unknown device {name!r}; use {DEVICE_HELP}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return name
    if torch.version.cuda is None:
        raise DeviceUnavailable(f"--device {name}: this torch build ({torch.__version__}) has no CUDA support; use --device cpu")
    count = torch.cuda.device_count()
    index = int(name.partition(":")[2] or 0)
    if count == 0:
        raise DeviceUnavailable(f"--device {name}: no CUDA device is visible on this machine; use --device cpu")
    if index >= count:
        raise DeviceUnavailable(f"--device {name}: only {count} CUDA device(s) visible; use cuda:0 to cuda:{count - 1}")
    return name
