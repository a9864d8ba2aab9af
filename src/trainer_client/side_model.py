"""A small model trained beside the student with an Adam of its own: the routing gate
(router.py) and the adversarial discriminator (adversarial.py).

It is built on first use, when its input width is known, and it is a checkpoint part
(`TrainingState.parts`): a checkpoint holds its weights, its optimizer state and its width, so
`--resume` continues it where it was instead of learning it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer_client.checkpoints import load_optimizer_state, save_optimizer_state


class SideModel:
    def __init__(self, name: str, build: Callable[[int], torch.nn.Module], lr: float):
        self.name = name  # its files in a checkpoint: NAME.safetensors, NAME.json, NAME-optimizer.*
        self._build = build  # input width -> module
        self._lr = lr
        self.width: int | None = None
        self.module: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._restored: tuple[int, dict, dict] | None = None  # (width, weights, optimizer state) from a checkpoint

    def ready(self, width: int, device: torch.device) -> torch.nn.Module:
        """The module (built now for inputs of `width` on `device` if it was not yet, from the
        checkpoint's state when one was loaded: only now is the device known)."""
        if self.module is None:
            if self._restored is not None and self._restored[0] != width:
                raise ValueError(f"the checkpoint's {self.name} takes inputs of width {self._restored[0]}, not {width}")
            self.width = width
            self.module = self._build(width).to(device)
            self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self._lr)
            if self._restored is not None:
                _, weights, optimizer_state = self._restored
                self.module.load_state_dict(weights)
                self.optimizer.load_state_dict(optimizer_state)  # Adam moves its state to its parameters' device
                self._restored = None
        return self.module

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss` (which must depend on the module)."""
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    # --- checkpoints (`TrainingState.parts`) ---

    def save(self, directory: Path) -> None:
        if self.module is None:  # not used yet: nothing to keep
            return
        save_file({k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}, str(directory / f"{self.name}.safetensors"))
        save_optimizer_state(self.optimizer.state_dict(), directory, f"{self.name}-optimizer")
        (directory / f"{self.name}.json").write_text(json.dumps({"width": self.width}))

    def load(self, directory: Path) -> None:
        if not (directory / f"{self.name}.json").is_file():  # the checkpoint was made before its first use
            return
        width = json.loads((directory / f"{self.name}.json").read_text())["width"]
        self.module = self.optimizer = None
        self._restored = (width, load_file(str(directory / f"{self.name}.safetensors")),
                          load_optimizer_state(directory, f"{self.name}-optimizer"))
