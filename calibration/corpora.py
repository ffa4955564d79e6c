"""Text corpora for calibration and evaluation: the embedded Wikipedia sample, local files, and hub datasets."""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

WIKI_SAMPLE = "wiki-sample"
HUB_CORPORA = ("wikitext2", "c4")
TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
UNDECODABLE_SHARE = 0.05  # a file whose bytes are more than this share undecodable as UTF-8 is not text
GENSIM_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class CorpusError(ValueError):
    """A corpus that cannot be read (missing path, empty text, unreachable hub)."""


@dataclass(frozen=True)
class Corpus:
    """Documents of one source, joined for tokenisation with a blank line between them."""

    source: str
    documents: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    def split(self, fraction: float) -> tuple[Corpus, Corpus]:
        """(head, tail): the tail holds about `fraction` of the characters, cut between documents (or, for a
        single document, between its lines), so that the two parts never share text."""
        pieces = self.documents if len(self.documents) > 1 else tuple(self.documents[0].split("\n"))
        total = sum(len(piece) for piece in pieces)
        boundary, seen = len(pieces), 0
        while boundary > 1 and seen + len(pieces[boundary - 1]) <= fraction * total:
            boundary -= 1
            seen += len(pieces[boundary])
        boundary = min(boundary, len(pieces) - 1)
        if boundary < 1:
            raise CorpusError(f"corpus {self.source!r} is too small to hold out evaluation text from its calibration text")
        glue = (lambda part: part) if len(self.documents) > 1 else (lambda part: ("\n".join(part),))
        return Corpus(self.source, glue(pieces[:boundary])), Corpus(f"{self.source} (held out)", glue(pieces[boundary:]))


def clean_wiki_markup(text: str) -> str:
    """Plain prose from the output of gensim's `filter_wiki`: no quote marks, headings as lines, no empty bullets."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;\s]*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@functools.cache
def wiki_sample() -> Corpus:
    """The English Wikipedia sample shipped inside gensim's wheel (about 100 articles), cleaned to prose.

    Read and cleaned once per process (3-4 s; the file is part of an installed package and the corpus immutable),
    so a notebook or a sweep of runs in one process pays for it once."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the wiki-sample corpus needs the gensim package: pip install gensim==4.4.0")
    dump = Path(spec.submodule_search_locations[0]) / GENSIM_WIKI_DUMP
    if not dump.is_file():
        raise CorpusError(f"the wiki-sample corpus is missing from this gensim install (looked for {dump})")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    documents = []
    with bz2.open(dump, "rb") as stream:
        for _title, markup, _page in extract_pages(stream):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki_markup(filter_wiki(markup))
            if len(text) > 200:
                documents.append(text)
    return Corpus(WIKI_SAMPLE, tuple(documents))


def local_corpus(path: Path) -> Corpus:
    """A text file, or every text file of a folder (sorted by name), one document per file."""
    if not path.exists():
        raise CorpusError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    else:
        files = [path]
    documents = tuple(text for text in (read_text_file(f).strip() for f in files) if text)
    if not documents:
        raise CorpusError(f"{path} holds no text")
    return Corpus(str(path), documents)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a file (a few undecodable bytes replaced); CorpusError for a file that is not text: one that
    holds NUL bytes, or whose bytes are mostly not UTF-8."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise CorpusError(f"{path} is not a text file (it holds NUL bytes)")
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if text and undecodable > UNDECODABLE_SHARE * len(text):
        raise CorpusError(f"{path} is not a text file ({undecodable / len(text):.0%} of it is not UTF-8)")
    return text


def hub_connection_problem(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, no DNS, no connection), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot connect to {host}: {error.strerror or error}"


def hub_corpus(name: str, split: str) -> Corpus:
    """WikiText-2 (raw) or the first shard of C4 (English) through `datasets`; a clear error when offline."""
    problem = hub_connection_problem()
    if problem is not None:
        raise CorpusError(f"the hub corpus {name!r} needs the Hugging Face hub ({problem}); offline, use wiki-sample or a local file")
    try:
        import datasets

        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            # the standard protocol joins the lines of the split with blank lines
            documents = tuple(rows["text"])
        else:
            shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
            rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            documents = tuple(rows["text"][:20000])
    except Exception as error:  # datasets raises many kinds of connection and lookup errors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorpusError(
            f"could not load the hub corpus {name!r} ({first_line}); offline, use wiki-sample or a local file"
        ) from None
    return Corpus(name, documents)


def load_corpus(source: str, *, split: str = "train") -> Corpus:
    """The corpus named by `source`: 'wiki-sample', 'wikitext2', 'c4', or a local file or folder."""
    if source == WIKI_SAMPLE:
        corpus = wiki_sample()
    elif source in HUB_CORPORA:
        corpus = hub_corpus(source, split)
    else:
        corpus = local_corpus(Path(source).expanduser())
    if not any(document.strip() for document in corpus.documents):
        raise CorpusError(f"corpus {source!r} is empty")
    return corpus
