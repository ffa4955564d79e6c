"""The calibrate stage: the calibration batches (token windows of a text, or sentences of a CoNLL train file, or
batches the caller gives), checked before any forward pass, and the inputs of the first transformer block captured
from them for the stages that run blocks on calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.sentences import IGNORED_LABEL, sentence_batches
from calibration.windows import sample_windows, window_count
from methods import PruningError, Target
from prune.models import CAUSAL_LM, TOKEN_CLASSIFICATION
from prune.run import Run, Stage
from prune.settings import StageSettings, check_fields, option
from prune.stages.evaluate import NAMED_TEXTS

CONLL_PREFIX = "conll:"  # --calibration conll:DIR: sentences of a CoNLL train file, for a token classifier


@dataclass
class CalibrationSettings(StageSettings):
    """Where the calibration activations come from."""

    source: str = option("wiki-sample", "--calibration", "wiki-sample (Wikipedia text inside gensim), wikitext2, c4, a text file/folder, or "
                         "conll:DIR (sentences of a CoNLL train file, for a token classifier; entity F1 on DIR's test file before and after).")
    nsamples: int = option(128, "--nsamples", "Calibration windows (or sentences, with conll:DIR).", minimum=1)
    seqlen: int = option(512, "--seqlen", "Tokens per calibration window.", minimum=1)
    batch_size: int = option(4, "--batch-size", "Calibration windows per forward pass.", minimum=1)

    def conll_folder(self) -> Path | None:
        """The folder named by `conll:DIR`, or None for text calibration."""
        return Path(self.source[len(CONLL_PREFIX):]).expanduser() if self.source.startswith(CONLL_PREFIX) else None

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)
        folder = self.conll_folder()
        if folder is not None:
            if not folder.is_dir():
                raise PruningError(f"--calibration {self.source}: no such folder: {folder}")
        elif self.source not in NAMED_TEXTS and not Path(self.source).expanduser().exists():
            raise PruningError(f"--calibration: no such file or folder: {self.source}")


def window_batches(windows, batch_size: int) -> list[dict]:
    return [{"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size)]


class Calibrate(Stage):
    key, settings_class = "calibrate", CalibrationSettings
    name = "calibrate"

    def prepare(self, run: Run) -> None:
        settings, given = self.settings, run.given_batches
        run.report.calibration = {
            "source": settings.source if given is None else "given batches",
            "nsamples": settings.nsamples if given is None else sum(len(batch["input_ids"]) for batch in given),
            "seqlen": settings.seqlen if given is None and settings.conll_folder() is None else None,
            "seed": run.settings.seed,
            "used": run.needs_block_inputs,
        }
        folder = settings.conll_folder()
        if folder is not None:  # the model must suit the data whether or not a stage calibrates on it
            run.check_kind(f"--calibration {settings.source}", TOKEN_CLASSIFICATION, why="calibrates a token classifier on labelled sentences")
        if run.gradient_samples_wanted is not None:
            flag, count = run.gradient_samples_wanted
            run.gradient_samples = self.task_samples(run, flag, count)
            run.report.calibration.update(nsamples=count, seqlen=settings.seqlen if folder is None and given is None else None, used=True)
        if not run.needs_block_inputs:
            return
        if given is not None:
            if not given:
                raise PruningError("no calibration batches were given")
            run.check_length("the given calibration batches' length", max(batch["input_ids"].shape[1] for batch in given))
            run.calibration_batches = given
        elif folder is not None:
            sentences = run.conll_split("train")
            if sentences is None:
                raise PruningError(f"--calibration {settings.source}: {folder} holds no CoNLL train file (train.txt or eng.train)")
            if settings.nsamples > len(sentences):
                raise PruningError(f"--nsamples {settings.nsamples} is more than the {len(sentences)} sentences of the train file in {folder}")
            run.calibration_batches = sentence_batches(run.loaded.tokenizer, sentences, settings.nsamples, seed=run.settings.seed,
                                                       batch_size=settings.batch_size)
        else:
            run.check_length("--seqlen", settings.seqlen)
            ids = run.calibration_ids()
            available = window_count(ids, settings.seqlen)
            if available < settings.nsamples:
                raise PruningError(f"the calibration text is too short: {len(ids)} tokens give {available} windows of {settings.seqlen} tokens, "
                                   f"--nsamples {settings.nsamples} requested (use a longer corpus, fewer --nsamples or a shorter --seqlen)")
            windows = sample_windows(ids, settings.nsamples, settings.seqlen, run.settings.seed)
            run.calibration_batches = window_batches(run.ranks.share(windows), settings.batch_size)  # this rank's windows
        if run.ranks.several:
            if given is not None or folder is not None:  # batches of sentences: each rank takes its share of them
                run.calibration_batches = run.ranks.share(run.calibration_batches)
            if not run.calibration_batches:
                raise PruningError(f"the calibration data gives rank {run.ranks.rank} of {run.ranks.world} nothing to run: use more --nsamples "
                                   "(or smaller --batch-size) than there are ranks")

    def execute(self, run: Run) -> None:
        if run.needs_block_inputs:
            run.calls = run.capture()

    def task_samples(self, run: Run, flag: str, count: int) -> list[dict]:
        """`count` samples of the task, each a batch of one with its labels: windows of the calibration text with their
        language-modelling labels (a causal LM), labelled sentences of the CoNLL train file (a token classifier), or
        rows of the given batches (which a token classifier's must label)."""
        settings, given = self.settings, run.given_batches
        if given is not None:
            samples = [{key: value[row : row + 1] for key, value in batch.items()} for batch in given for row in range(len(batch["input_ids"]))]
            for sample in samples:
                if "labels" not in sample:
                    if run.loaded.kind != CAUSAL_LM:
                        raise PruningError(f"{flag}: the given calibration batches need labels to take gradients of a {run.loaded.kind}'s loss")
                    mask = sample.get("attention_mask")
                    sample["labels"] = sample["input_ids"] if mask is None else sample["input_ids"].masked_fill(mask == 0, IGNORED_LABEL)
            if len(samples) < count:
                raise PruningError(f"{flag} {count} is more than the {len(samples)} samples of the given calibration batches")
            return samples[:count]
        if settings.conll_folder() is not None:
            sentences, labels = run.labelled_sentences(flag)
            if count > len(sentences):
                raise PruningError(f"{flag} {count} is more than the {len(sentences)} sentences of the train file in {settings.conll_folder()}")
            return sentence_batches(run.loaded.tokenizer, sentences, count, seed=run.settings.seed, batch_size=1, label_names=labels)
        if run.loaded.kind != CAUSAL_LM:
            raise PruningError(f"{flag} needs labelled task data: a causal LM's calibration text, or a token classifier's --calibration conll:DIR; "
                               f"this model is a {run.loaded.kind} calibrated on text")
        run.check_length("--seqlen", settings.seqlen)
        ids = run.calibration_ids()
        available = window_count(ids, settings.seqlen)
        if available < count:
            raise PruningError(f"the calibration text is too short: {len(ids)} tokens give {available} windows of {settings.seqlen} tokens, "
                               f"{flag} {count} requested (use a longer corpus, fewer gradients or a shorter --seqlen)")
        windows = sample_windows(ids, count, settings.seqlen, run.settings.seed)
        return [{"input_ids": window[None], "labels": window[None]} for window in windows]
