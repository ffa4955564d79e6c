"""Token windows: calibration samples, evaluation windows, and the held-out split between them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from calibration.corpora import CorpusError

HELDOUT_FRACTION = 0.1  # share of a corpus's tokens kept for evaluation when calibration and evaluation share it


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids (1-D, int64) of `text` as one stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_documents(tokenizer, documents: tuple[str, ...], piece_characters: int = 200_000) -> Tensor:
    """Token ids of documents joined by blank lines, tokenised a few hundred kB at a time.

    Tokenising megabytes in one call holds hundreds of MB of intermediate encodings; pieces keep that
    small, at the cost of a handful of tokens at piece boundaries. Evaluation text uses `tokenize`.
    """
    pieces, current, size = [], [], 0
    for document in documents:
        current.append(document)
        size += len(document)
        if size >= piece_characters:
            pieces.append("\n\n".join(current) + "\n\n")
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return torch.cat([tokenize(tokenizer, piece) for piece in pieces]) if pieces else torch.zeros(0, dtype=torch.long)


def window_count(ids: Tensor, seqlen: int) -> int:
    """How many non-overlapping windows of `seqlen` tokens the stream holds."""
    return len(ids) // seqlen


def sample_windows(ids: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """`nsamples` distinct non-overlapping windows of `seqlen` tokens, chosen at random (seeded): (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 1:
        raise CorpusError(f"the number and length of windows must be positive, got {nsamples} and {seqlen}")
    available = window_count(ids, seqlen)
    if available < nsamples:
        raise CorpusError(f"the text is too short: {len(ids)} tokens give {available} windows of {seqlen} tokens, {nsamples} requested")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples]
    return ids[: available * seqlen].reshape(available, seqlen)[chosen]


def evaluation_windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """The first `len // seqlen` (at most `max_windows`) consecutive non-overlapping windows: (windows, seqlen)."""
    available = window_count(ids, seqlen)
    count = available if max_windows is None else min(available, max_windows)
    if count < 1:
        raise CorpusError(f"the evaluation text is too short: {len(ids)} tokens, less than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


def language_model_batches(ids: Tensor, seqlen: int, batch: int, seed: int) -> Iterator[dict]:
    """Endless batches of non-overlapping windows of `ids` with their language-modelling labels, reshuffled (seeded)
    each time all were seen."""
    available = window_count(ids, seqlen)
    if available < batch:
        raise CorpusError(f"the text is too short: {len(ids)} tokens give {available} windows of {seqlen} tokens, a batch needs {batch}")
    windows = ids[: available * seqlen].reshape(available, seqlen)

    def batches() -> Iterator[dict]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(available, generator=generator)
            for start in range(0, available - batch + 1, batch):
                chosen = windows[order[start : start + batch]]
                yield {"input_ids": chosen, "labels": chosen}

    return batches()
