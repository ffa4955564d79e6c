"""Token streams of the corpora one run uses, tokenised once, with calibration and evaluation kept apart."""

from __future__ import annotations

from torch import Tensor

from calibration.corpora import HUB_CORPORA, WIKI_SAMPLE, load_corpus
from calibration.windows import split_heldout, tokenize

HUB_EVALUATION_SPLIT = {"wikitext2": "test", "c4": "validation"}


class TextSources:
    """Calibration and evaluation token streams for one tokenizer.

    Hub corpora give calibration text from their train split and evaluation text from their test
    (or validation) split. The embedded wiki-sample, and any local corpus used for both roles, is
    split once: calibration windows come from the head, evaluation windows from the held-out tail,
    so the two never overlap.
    """

    def __init__(self, tokenizer, *, calibration: str | None, evaluation: str | None) -> None:
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.evaluation = evaluation
        self._streams: dict[tuple[str, str], Tensor] = {}

    def _stream(self, source: str, split: str) -> Tensor:
        key = (source, split)
        if key not in self._streams:
            self._streams[key] = tokenize(self.tokenizer, load_corpus(source, split=split).text)
        return self._streams[key]

    def _is_split(self, source: str) -> bool:
        return source == WIKI_SAMPLE or (self.calibration == self.evaluation and source not in HUB_CORPORA)

    def calibration_ids(self) -> Tensor:
        """Token ids calibration windows may be drawn from."""
        source = self.calibration
        if source in HUB_CORPORA:
            return self._stream(source, "train")
        ids = self._stream(source, "all")
        return split_heldout(ids)[0] if self._is_split(source) else ids

    def evaluation_ids(self) -> Tensor:
        """Token ids of the evaluation text, disjoint from the calibration text."""
        source = self.evaluation
        if source in HUB_CORPORA:
            return self._stream(source, HUB_EVALUATION_SPLIT[source])
        ids = self._stream(source, "all")
        return split_heldout(ids)[1] if self._is_split(source) else ids
