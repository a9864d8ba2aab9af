"""A learned per-prompt router over teachers (`--route gate`), after MST-Distill (a gate on the
student's representation picks the teacher each instance learns from, with a load-balancing term).

The gate is a linear layer on the student's mean-pooled final hidden states of the prompt
(detached: the gate learns, the student's features are only read), giving π [B, n] over the n
teachers. Every teacher is asked, so each prompt's candidates tell how good each teacher was for
it: r_j = the share of teacher j's samples the verifier accepts (without a verifier: their mean
exp(mean token log-prob)). The gate minimises

    -Σ_j π_j r_j  +  gate_balance · n · Σ_j f_j P_j

(expected reward, plus the Switch Transformer load-balancing term: f_j the share of prompts
routed to j, P_j the mean of π_j), one Adam step per micro-batch; the prompt is routed to
argmax π. The gate and its optimizer are kept in checkpoints (side_model.py).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer_client.config import TrainConfig
from trainer_client.samples import PromptGroup
from trainer_client.side_model import SideModel
from trainer_client.verifiers import get_verifier


class Gate:
    def __init__(self, config: TrainConfig, teacher_names: list[str]):
        self.names = teacher_names
        self.config = config
        self.verify = get_verifier(config.verifier) if config.verifier else None
        self.model = SideModel("gate", lambda width: torch.nn.Linear(width, len(teacher_names)), config.gate_lr)

    def choose(self, groups: list[PromptGroup], student) -> list[str]:
        features = student.prompt_features([g.prompt_ids for g in groups]).float()  # [B, H]
        layer = self.model.ready(features.shape[1], features.device)
        probabilities = torch.softmax(layer(features), dim=-1)  # [B, n]
        rewards = torch.tensor([self._rewards(g) for g in groups], dtype=probabilities.dtype, device=probabilities.device)
        routed = probabilities.argmax(-1)  # [B]
        share = torch.bincount(routed, minlength=len(self.names)).to(probabilities.dtype) / len(groups)  # f_j
        loss = -(probabilities * rewards).sum(-1).mean() + self.config.gate_balance * len(self.names) * (share * probabilities.mean(0)).sum()
        self.model.step(loss)
        return [self.names[i] for i in routed.tolist()]

    def _rewards(self, group: PromptGroup) -> list[float]:
        """r_j per teacher for one prompt (0 for a teacher with no samples)."""
        authors = group.by_author()
        rewards = []
        for name in self.names:
            candidates = authors.get(name, [])
            if not candidates:
                rewards.append(0.0)
            elif self.verify is not None:
                rewards.append(float(np.mean([self.verify(c.text, group.row.answer) for c in candidates])))
            else:
                rewards.append(float(np.mean([np.exp(c.mean_logprob) if c.mean_logprob is not None else 0.0 for c in candidates])))
        return rewards
