"""The evaluators: perplexity of a causal LM on held-out text, entity F1 of a token classifier on a CoNLL test file.
They share one face (prune.run.Evaluator): prepare their data before any forward pass, then measure the model at
each point of the run, under a label ('dense', 'pruned', 'refined', 'recovered')."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from calibration.capture import run_calls
from calibration.corpora import HUB_CORPORA, WIKI_SAMPLE
from calibration.windows import evaluation_windows, window_count
from eval.ner import evaluate_ner
from eval.perplexity import Perplexity, from_losses, next_token_loss
from methods import PruningError
from prune.devices import on_device
from prune.models import CAUSAL_LM, TOKEN_CLASSIFICATION
from prune.resume import tensor_digest
from prune.run import Evaluator, Run
from prune.settings import check_fields, option

NAMED_TEXTS = (WIKI_SAMPLE, *HUB_CORPORA)


@dataclass
class EvaluationSettings:
    """What the model is measured on."""

    data: str | None = option(None, "--eval-data", "Perplexity text: wiki-sample (its held-out part), wikitext2, c4, or a text file/folder. "
                              "With --calibration conll:DIR, entity F1 on DIR's test file is measured instead.", type=str,
                              cli_default=WIKI_SAMPLE)
    seqlen: int | None = option(None, "--eval-seqlen", "Tokens per evaluation window (default: --seqlen).", type=int, minimum=2)
    windows: int | None = option(None, "--eval-windows", "Evaluate at most this many windows (default: all).", type=int, minimum=1)
    batch_size: int = option(4, "--eval-batch-size", "Evaluation windows per forward pass.", minimum=1)

    def check(self) -> None:
        check_fields(self)
        if self.data is not None and self.data not in NAMED_TEXTS and not Path(self.data).expanduser().exists():
            raise PruningError(f"--eval-data: no such file or folder: {self.data}")


class PerplexityEvaluator:
    """Perplexity on non-overlapping windows of the evaluation text (seed 003's protocol)."""

    key = "perplexity"

    def __init__(self, settings: EvaluationSettings, calibration_seqlen: int) -> None:
        self.settings = settings
        self.text = settings.data
        self.seqlen = settings.seqlen or calibration_seqlen

    def prepare(self, run: Run) -> None:
        run.check_length("--eval-seqlen", self.seqlen)
        ids = run.evaluation_ids()
        if window_count(ids, self.seqlen) < 1:
            raise PruningError(f"--eval-data {self.text}: {len(ids)} tokens, less than one window of {self.seqlen} (--eval-seqlen)")
        self.windows = evaluation_windows(ids, self.seqlen, self.settings.windows)
        run.report.perplexity = {"data": self.text}

    def fingerprint(self) -> str:
        return tensor_digest([self.windows])

    def measure(self, run: Run, label: str) -> dict:
        return sequential_perplexity(run, self.windows, self.settings.batch_size, label=f"{label} perplexity").as_dict()


class EntityF1Evaluator:
    """Entity-level F1 (conlleval) of a token classifier on the test file of the `--calibration conll:DIR` folder."""

    key = "entity_f1"
    text = None

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def prepare(self, run: Run) -> None:
        self.sentences = run.conll_split("test")
        labels = list(run.model.config.id2label.values())
        unknown = {tag for sentence in self.sentences for tag in sentence.tags} - set(labels)
        if unknown:
            raise PruningError(f"the model's labels ({', '.join(labels)}) lack tags of the test file in {self.folder}: "
                               f"{', '.join(sorted(unknown))}; is it a token classifier for this data?")
        self.labels = [run.model.config.id2label[index] for index in range(len(labels))]
        run.report.entity_f1 = {"data": str(self.folder), "sentences": len(self.sentences)}

    def fingerprint(self) -> str:
        return hashlib.sha256(repr([(sentence.tokens, sentence.tags) for sentence in self.sentences]).encode()).hexdigest()

    def measure(self, run: Run, label: str) -> dict:
        with on_device(run.model, run.device, run.compute_dtype):
            scores = evaluate_ner(run.model, run.loaded.tokenizer, self.sentences, self.labels, run.device)
        return {"f1": scores.f1, "precision": scores.precision, "recall": scores.recall}


@torch.no_grad()
def sequential_perplexity(run: Run, windows: Tensor, batch_size: int, label: str = "perplexity") -> Perplexity:
    """Perplexity computed block by block, each block's weights present only while it runs: the windows' inputs to
    the first block are captured, run through each block in turn, and the model's own forward pass turns the last
    block's outputs into logits (its blocks replaced by `Replay`). Equals the whole-model forward pass."""
    batches = [{"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size)]
    calls = run.capture(batches)
    for index in tqdm(range(len(run.plan.blocks)), desc=label, unit="block", disable=not run.settings.progress, leave=False):
        with run.block(index) as block:
            run_calls(block, calls, advance=True)
    total_loss, count = 0.0, 0
    with run.without_blocks(compute=True) as stand_ins:
        for batch, call in zip(batches, calls, strict=True):
            stand_ins[-1].output = call.hidden_states
            loss, tokens = next_token_loss(run.model(input_ids=batch["input_ids"].to(run.device)).logits, batch["input_ids"])
            total_loss, count = total_loss + loss, count + tokens
    return from_losses(total_loss, count, windows)


def evaluators(run: Run) -> list[Evaluator]:
    """The evaluators that apply to this model and these settings (with a note when asked-for perplexity cannot be)."""
    settings, kind = run.settings.evaluate, run.loaded.kind
    if settings.data is None:
        return []
    folder = run.settings.calibrate.conll_folder()
    if folder is not None:
        if kind != TOKEN_CLASSIFICATION:
            return []  # the calibrate stage refuses this model
        if run.conll_split("test") is None:
            run.note(f"entity F1 skipped: {folder} holds no test file")
            return []
        return [EntityF1Evaluator(folder)]
    if kind != CAUSAL_LM:
        run.note(f"perplexity skipped: it needs a causal LM, and this model is a {kind}")
        return []
    return [PerplexityEvaluator(settings, run.settings.calibrate.seqlen)]
