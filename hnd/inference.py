"""Eval-mode prediction: logits to the top-k classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hnd.errors import HndError


@dataclass(frozen=True)
class Prediction:
    topk: list[tuple[int, float]]  # (class index, probability), most likely first
    logits: list[float]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, topk: int | None = None) -> Prediction:
    """Classify one normalized image ``x`` [1, 3, S, S] with ``model`` in eval mode; the ``topk``
    most likely classes (default 5, or every class of a model with fewer)."""
    model.eval()
    logits = model(x)[0]  # [classes]
    topk = min(5, logits.numel()) if topk is None else topk
    if not 1 <= topk <= logits.numel():
        raise HndError(f"--topk must be between 1 and {logits.numel()}, got {topk}")
    probs = logits.softmax(0)
    values, indices = probs.topk(topk)
    return Prediction([(int(i), float(p)) for i, p in zip(indices, values)], logits.tolist())
