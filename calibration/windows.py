"""Token windows: calibration samples, evaluation windows, and the held-out split between them."""

from __future__ import annotations

import torch
from torch import Tensor

from calibration.corpora import CorpusError

HELDOUT_FRACTION = 0.1  # share of a corpus's tokens kept for evaluation when calibration and evaluation share it


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids (1-D, int64) of `text` as one stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_heldout(ids: Tensor, fraction: float = HELDOUT_FRACTION) -> tuple[Tensor, Tensor]:
    """Split a token stream into a calibration part (the head) and a held-out evaluation part (the tail)."""
    boundary = int(len(ids) * (1.0 - fraction))
    return ids[:boundary], ids[boundary:]


def sample_windows(ids: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """`nsamples` distinct non-overlapping windows of `seqlen` tokens, chosen at random (seeded): (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 1:
        raise CorpusError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    available = len(ids) // seqlen
    if available < nsamples:
        raise CorpusError(
            f"the calibration corpus is too short: {len(ids)} tokens give {available} windows of {seqlen} tokens, "
            f"{nsamples} requested (use a longer corpus, fewer --nsamples or a shorter --seqlen)"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples]
    return ids[: available * seqlen].reshape(available, seqlen)[chosen]


def evaluation_windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """The first `len // seqlen` (at most `max_windows`) consecutive non-overlapping windows: (windows, seqlen)."""
    available = len(ids) // seqlen
    count = available if max_windows is None else min(available, max_windows)
    if count < 1:
        raise CorpusError(f"the evaluation text is too short: {len(ids)} tokens, less than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)
