"""Perplexity of a causal LM on non-overlapping token windows (the protocol of the SparseGPT/Wanda papers)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    value: float
    seqlen: int
    windows: int

    def as_dict(self) -> dict:
        return {"value": self.value, "seqlen": self.seqlen, "windows": self.windows}


def next_token_loss(logits: Tensor, input_ids: Tensor) -> tuple[float, int]:
    """The summed cross-entropy of predicting each token from the ones before it, and how many tokens were predicted.
    One window at a time: a window's logits but the last are a contiguous slice, so no copy of the batch's logits
    (a vocabulary-wide tensor per token) is made, and the log-softmax holds one window's worth."""
    total = 0.0
    for window_logits, window_ids in zip(logits, input_ids, strict=True):
        total += nn.functional.cross_entropy(window_logits[:-1].float(), window_ids[1:].to(logits.device), reduction="sum").item()
    return total, input_ids[:, 1:].numel()


def from_losses(total_loss: float, count: int, windows: Tensor) -> Perplexity:
    return Perplexity(math.exp(total_loss / count), windows.shape[1], windows.shape[0])


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, device: torch.device, *, batch_size: int = 4, progress: bool = True, label: str = "perplexity") -> Perplexity:
    """exp of the mean next-token loss over all windows (windows, seqlen); every window has the same length."""
    total_loss, count = 0.0, 0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False):
        input_ids = windows[start : start + batch_size].to(device)
        loss, tokens = next_token_loss(model(input_ids=input_ids).logits, input_ids)
        total_loss, count = total_loss + loss, count + tokens
    return from_losses(total_loss, count, windows)
