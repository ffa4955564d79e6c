"""Sentences as model inputs: sub-token ids with labels on each word's first sub-token, padded batches, and the
calibration and training batches of a token classifier (padded positions are kept out of every statistic)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DataCollatorForTokenClassification

from calibration.conll import NerDataError, Sentence

IGNORED_LABEL = -100  # the label transformers' losses skip


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per sub-token labels: a word's label on its first sub-token, IGNORED_LABEL on the others and on special tokens."""
    labels = []
    previous = None
    for word in word_ids:
        labels.append(IGNORED_LABEL if word is None or word == previous else word_labels[word])
        previous = word
    return labels


@dataclass
class EncodedSentence:
    """One sentence as model inputs: sub-token ids, the aligned labels, and which word each sub-token starts."""

    features: dict[str, list[int]]  # input_ids, attention_mask (and token_type_ids when the tokenizer makes them), labels
    first_subtokens: list[int]  # position of each word's first sub-token (words cut off by truncation are absent)


def encode_sentences(tokenizer, sentences: Sequence[Sentence], label_ids: dict[str, int], max_length: int = 256) -> list[EncodedSentence]:
    """Tokenise sentences split into words (a fast tokenizer is needed for word ids); labels on first sub-tokens.

    Tags unknown to `label_ids` (a test set with a type the training set lacks) are labelled 'O'.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise NerDataError("NER needs a fast tokenizer (one that maps sub-tokens back to words)")
    encoded = tokenizer([list(sentence.tokens) for sentence in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    result = []
    for index, sentence in enumerate(sentences):
        word_ids = encoded.word_ids(index)
        labels = align_labels(word_ids, [label_ids.get(tag, label_ids["O"]) for tag in sentence.tags])
        features = {key: list(values[index]) for key, values in encoded.items()}
        features["labels"] = labels
        first = [position for position, label in enumerate(labels) if label != IGNORED_LABEL]
        result.append(EncodedSentence(features, first))
    return result


def pad_batch(tokenizer, sentences: Sequence[EncodedSentence], *, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """Sentences padded to the longest one: input ids with the tokenizer's pad id, attention mask 0 and labels -100 on padding."""
    collator = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORED_LABEL, return_tensors="pt")
    batch = collator([dict(sentence.features) for sentence in sentences])
    if not with_labels:
        batch.pop("labels")
    return dict(batch)


def length_batches(sentences: Sequence[EncodedSentence], batch_size: int) -> list[list[int]]:
    """Indices of sentences in batches of similar length (longest first), so that little is padded."""
    order = sorted(range(len(sentences)), key=lambda index: -len(sentences[index].features["input_ids"]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sentence_batches(tokenizer, sentences: Sequence[Sentence], nsamples: int, *, seed: int = 0, batch_size: int = 32,
                     max_length: int = 256, label_names: Sequence[str] | None = None) -> list[dict]:
    """`nsamples` sentences drawn at random (without replacement) and padded in batches of similar length, without
    labels unless `label_names` (the model's, by label id) are given.

    Each batch is a dict of model inputs (`input_ids`, `attention_mask`, and `token_type_ids` when the tokenizer makes
    them, and `labels`).
    """
    if not 1 <= nsamples <= len(sentences):
        raise NerDataError(f"cannot draw {nsamples} of {len(sentences)} sentences")
    chosen = random.Random(seed).sample(list(sentences), nsamples)
    label_ids = {"O": 0} if label_names is None else {name: index for index, name in enumerate(label_names)}
    encoded = encode_sentences(tokenizer, chosen, label_ids, max_length)
    return [pad_batch(tokenizer, [encoded[index] for index in indices], with_labels=label_names is not None)
            for indices in length_batches(encoded, batch_size)]


def labelled_batches(tokenizer, sentences: Sequence[Sentence], label_names: Sequence[str], batch_size: int, *, seed: int = 0,
                     max_length: int = 256) -> Iterator[dict]:
    """Endless padded batches of labelled sentences (a token classifier's training data), reshuffled (seeded) after
    each pass; a last incomplete batch of a pass is dropped."""
    if len(sentences) < batch_size:
        raise NerDataError(f"{len(sentences)} sentences cannot fill a batch of {batch_size}")
    encoded = encode_sentences(tokenizer, sentences, {name: index for index, name in enumerate(label_names)}, max_length)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pad_batch(tokenizer, [encoded[index] for index in order[start : start + batch_size]])
