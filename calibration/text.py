"""Token streams of the corpora one run uses, with calibration and evaluation text kept apart."""

from __future__ import annotations

from torch import Tensor

from calibration.corpora import HUB_CORPORA, WIKI_SAMPLE, Corpus, load_corpus
from calibration.windows import HELDOUT_FRACTION, tokenize, tokenize_documents

HUB_EVALUATION_SPLIT = {"wikitext2": "test", "c4": "validation"}


class TextSources:
    """Calibration and evaluation token streams for one tokenizer.

    Hub corpora give calibration text from their train split and evaluation text from their test
    (or validation) split. The embedded wiki-sample, and any local corpus used for both roles, is
    split once, between documents: calibration windows come from the first 90 % of its text,
    evaluation windows from the held-out rest, so the two never share text. Evaluation text is
    tokenised in one pass (the perplexity protocol); calibration text in pieces, to save memory.
    """

    def __init__(self, tokenizer, *, calibration: str | None, evaluation: str | None) -> None:
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.evaluation = evaluation
        self._corpora: dict[tuple[str, str], Corpus] = {}

    def corpus(self, source: str, role: str) -> Corpus:
        """The text `source` gives for `role` ('calibration' or 'evaluation')."""
        if source in HUB_CORPORA:
            split = "train" if role == "calibration" else HUB_EVALUATION_SPLIT[source]
            key = (source, split)
            if key not in self._corpora:
                self._corpora[key] = load_corpus(source, split=split)
            return self._corpora[key]
        if (source, "all") not in self._corpora:
            self._corpora[(source, "all")] = load_corpus(source)
        whole = self._corpora[(source, "all")]
        if source == WIKI_SAMPLE or (self.calibration == self.evaluation):
            head, tail = whole.split(HELDOUT_FRACTION)
            return head if role == "calibration" else tail
        return whole

    def calibration_ids(self) -> Tensor:
        """Token ids calibration windows may be drawn from."""
        return tokenize_documents(self.tokenizer, self.corpus(self.calibration, "calibration").documents)

    def evaluation_ids(self) -> Tensor:
        """Token ids of the evaluation text, which shares no text with the calibration text."""
        return tokenize(self.tokenizer, self.corpus(self.evaluation, "evaluation").text)
