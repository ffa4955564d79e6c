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


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, device: torch.device, *, batch_size: int = 4, progress: bool = True, label: str = "perplexity") -> Perplexity:
    """exp of the mean next-token loss over all windows (windows, seqlen); every window has the same length."""
    total_loss = 0.0
    count = 0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False):
        input_ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=input_ids).logits
        predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        loss = nn.functional.cross_entropy(predicted, input_ids[:, 1:].reshape(-1), reduction="sum")
        total_loss += loss.item()
        count += input_ids[:, 1:].numel()
    return Perplexity(math.exp(total_loss / count), windows.shape[1], windows.shape[0])
