"""The training losses of the three methods and the autoencoder baseline (tests/reference/original-hnd-facts.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_mse_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """HND (and autoencoder) loss: squared error summed over the batch and every element,
    not averaged, as in the original (``MSELoss(reduction='sum')``)."""
    return F.mse_loss(student_out, teacher_out, reduction="sum")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 1.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton's knowledge distillation: ``alpha·CE(z_s, y) + (1-alpha)·T²·KL(p_t ‖ p_s)`` with
    softened distributions at temperature T and KL averaged over the batch (``batchmean``)."""
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl
