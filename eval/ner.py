"""Entity-level scores of a token classifier: conlleval's chunks, precision/recall/F1, and the model's predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from calibration.conll import Sentence
from calibration.sentences import EncodedSentence, encode_sentences, length_batches, pad_batch


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities as (type, first, last) word positions, with conlleval's chunk rules (an I- after O or another type opens one)."""
    spans = set()
    start, kind = None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        opens = prefix == "B" or (prefix == "I" and label != kind)
        if kind is not None and (prefix == "O" or opens):
            spans.add((kind, start, position - 1))
            start, kind = None, None
        if opens:
            start, kind = position, label
    return spans


@dataclass(frozen=True)
class EntityScores:
    precision: float
    recall: float
    f1: float
    predicted: int
    gold: int
    correct: int


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> EntityScores:
    """Micro entity-level precision, recall and F1 over sentences: exact span and type match (conlleval)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    correct = found = expected = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        gold_spans, predicted_spans = entity_spans(gold_tags), entity_spans(predicted_tags)
        correct += len(gold_spans & predicted_spans)
        found += len(predicted_spans)
        expected += len(gold_spans)
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EntityScores(precision, recall, f1, found, expected, correct)


@torch.no_grad()
def predict_tags(model: nn.Module, tokenizer, encoded: Sequence[EncodedSentence], words: Sequence[int], label_names: Sequence[str],
                 device: torch.device, batch_size: int = 64) -> list[list[str]]:
    """The predicted tag of every word: the arg-max label of its first sub-token ('O' for words cut off by truncation).

    `words[i]` is the number of words of sentence i.
    """
    predicted: list[list[str] | None] = [None] * len(encoded)
    model.eval()
    for indices in length_batches(encoded, batch_size):
        batch = pad_batch(tokenizer, [encoded[index] for index in indices], with_labels=False)
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        best = logits.argmax(-1).cpu()
        for row, index in enumerate(indices):
            tags = [label_names[label] for label in best[row, encoded[index].first_subtokens].tolist()]
            predicted[index] = tags + ["O"] * (words[index] - len(tags))
    return predicted


def evaluate_ner(model: nn.Module, tokenizer, sentences: Sequence[Sentence], label_names: Sequence[str], device: torch.device,
                 batch_size: int = 64, max_length: int = 256) -> EntityScores:
    """Entity-level scores of a token classifier on labelled sentences."""
    label_ids = {name: index for index, name in enumerate(label_names)}
    encoded = encode_sentences(tokenizer, sentences, label_ids, max_length)
    home = next(model.parameters()).device
    model.to(device)
    try:
        predicted = predict_tags(model, tokenizer, encoded, [len(sentence.tokens) for sentence in sentences], label_names, device, batch_size)
    finally:
        model.to(home)
    return entity_f1([sentence.tags for sentence in sentences], predicted)
