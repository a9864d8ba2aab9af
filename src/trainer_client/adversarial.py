"""The adversarial term of R-MSD (`--adversarial-weight`): a discriminator on the student's pooled
hidden states tells teacher samples from the student's own, and the student gets the
non-saturating GAN loss (Goodfellow et al. 2014) on its own samples.

Per micro-batch, with h = the student's final hidden states mean-pooled over a sequence's
completion positions ([B, H]), T the teacher samples that count (weight > 0) and S the student's
own samples (`Example.own`):
- the discriminator D (a 2-layer MLP, its own Adam) takes one step on
  BCE(D(h_T), 1) + BCE(D(h_S), 0), on detached features (the student is not moved by it);
- the student's term is mean_S -log sigmoid(D(h_S)), through h_S: the student is pushed to
  represent its own completions the way it represents the teachers'.
Logged: `adversarial/discriminator_accuracy` (D's accuracy on T and on S, averaged: 0.5 is chance).
D and its optimizer are kept in checkpoints (side_model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_client.side_model import SideModel
from trainer_client.student_loss import Batch

DISCRIMINATOR_LR = 1e-2


def pooled_completions(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of the final hidden states [B, T, H] over each sequence's completion positions -> [B, H]."""
    mask = batch.target_mask.to(hidden.dtype)[..., None]  # [B, T - 1, 1]
    return (hidden[:, :-1] * mask).sum(1) / mask.sum(1).clamp(min=1)


def _discriminator(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))


class AdversarialTerm:
    def __init__(self, stats):
        self.stats = stats
        self.model = SideModel("discriminator", _discriminator, DISCRIMINATOR_LR)

    def __call__(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The student's non-saturating term (scalar, 0 when the batch lacks either kind of sample)."""
        pooled = pooled_completions(hidden, batch).float()  # [B, H]
        counted = batch.weights.sum(1) > 0
        teacher, own = pooled[counted & ~batch.own], pooled[batch.own]
        if not len(teacher) or not len(own):
            return hidden.new_zeros(())
        discriminator = self.model.ready(pooled.shape[1], pooled.device)
        self._train_discriminator(discriminator, teacher.detach(), own.detach())
        return F.softplus(-discriminator(own)).mean()  # -log sigmoid(D(h_S))

    def _train_discriminator(self, discriminator: torch.nn.Module, teacher: torch.Tensor, own: torch.Tensor) -> None:
        with torch.enable_grad():
            real, fake = discriminator(teacher)[:, 0], discriminator(own)[:, 0]
            loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            self.model.step(loss)
        # Balanced: the mean of its accuracy on each kind (the kinds are rarely equally many).
        self.stats.add("adversarial/discriminator_accuracy", ((real > 0).float().mean() + (fake <= 0).float().mean()).item() / 2)
