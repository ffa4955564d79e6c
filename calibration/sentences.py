"""Calibration batches of whole sentences (for encoders such as a BERT token classifier): padded, with an attention mask
that keeps padded positions out of the Hessians and column norms."""

from __future__ import annotations

import random
from collections.abc import Sequence

from eval.ner import Sentence, encode_sentences, length_batches, pad_batch
from methods import PruningError


def sentence_batches(tokenizer, sentences: Sequence[Sentence], nsamples: int, *, seed: int = 0, batch_size: int = 32,
                     max_length: int = 256) -> list[dict]:
    """`nsamples` sentences drawn at random (without replacement) and padded in batches of similar length.

    Each batch is a dict of model inputs (`input_ids`, `attention_mask`, and `token_type_ids` when the tokenizer makes them).
    """
    if nsamples < 1:
        raise PruningError(f"--nsamples must be at least 1, got {nsamples}")
    if not sentences:
        raise PruningError("no calibration sentences")
    if nsamples > len(sentences):
        raise PruningError(f"--nsamples {nsamples} is more than the {len(sentences)} sentences available")
    chosen = random.Random(seed).sample(list(sentences), nsamples)
    encoded = encode_sentences(tokenizer, chosen, {"O": 0}, max_length)
    return [pad_batch(tokenizer, [encoded[index] for index in indices], with_labels=False) for indices in length_batches(encoded, batch_size)]
