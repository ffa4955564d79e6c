"""The evaluators: perplexity of a causal LM on held-out text, entity F1 of a token classifier on a CoNLL test file,
zero-shot accuracy on lm-evaluation-harness tasks.
They share one face (prune.run.Evaluator): prepare their data before any forward pass, then measure the model at
each point of the run, under a label ('dense', 'pruned', 'refined', 'recovered')."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from calibration.capture import run_calls
from calibration.corpora import HUB_CORPORA, WIKI_SAMPLE, hub_connection_problem
from calibration.windows import evaluation_windows, window_count
from eval.ner import evaluate_ner
from eval.perplexity import Perplexity, from_losses, next_token_loss
from eval.tasks import TaskError, evaluate_tasks, resolve_tasks
from methods import PruningError, Target
from prune.devices import on_device
from prune.models import CAUSAL_LM, TOKEN_CLASSIFICATION
from prune.report import Section
from prune.resume import tensor_digest
from prune.run import Evaluator, Run
from prune.settings import StageSettings, check_fields, option

NAMED_TEXTS = (WIKI_SAMPLE, *HUB_CORPORA)


@dataclass
class EvaluationSettings(StageSettings):
    """What the model is measured on."""

    data: str | None = option(None, "--eval-data", "Perplexity text: wiki-sample (its held-out part), wikitext2, c4, or a text file/folder. "
                              "With --calibration conll:DIR, entity F1 on DIR's test file is measured instead.", type=str,
                              cli_default=WIKI_SAMPLE)
    seqlen: int | None = option(None, "--eval-seqlen", "Tokens per evaluation window (default: --seqlen).", type=int, minimum=2)
    windows: int | None = option(None, "--eval-windows", "Evaluate at most this many windows (default: all).", type=int, minimum=1)
    batch_size: int = option(4, "--eval-batch-size", "Evaluation windows (perplexity) or requests (--eval-tasks) per forward pass.", minimum=1)
    tasks: tuple[str, ...] = option((), "--eval-tasks", "Zero-shot tasks of lm-evaluation-harness (comma-separated or repeated, e.g. "
                                    "arc_easy,hellaswag): accuracy before and after each stage, beside --eval-data's figures (and also "
                                    "with --no-eval).", multiple=True, metavar="TASKS")
    tasks_path: str | None = option(None, "--eval-tasks-path", "A folder of lm-eval task definitions (YAML; lm-eval's include path): local "
                                    "tasks with local data run offline.", type=str, metavar="DIR")
    limit: int | None = option(None, "--eval-limit", "At most this many examples per task (default: all).", type=int, minimum=1)

    def __post_init__(self) -> None:
        given = (self.tasks,) if isinstance(self.tasks, str) else self.tasks or ()
        self.tasks = tuple(name.strip() for item in given for name in str(item).split(",") if name.strip())

    def whole_model_reason(self, run: Any) -> str | None:
        if run.calibrate.conll_folder() is not None and self.data is not None:
            return "entity F1 (--calibration conll:DIR)"
        if self.tasks:
            return "--eval-tasks (lm-eval runs the whole model)"
        return None

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)
        if self.data is not None and self.data not in NAMED_TEXTS and not Path(self.data).expanduser().exists():
            raise PruningError(f"--eval-data: no such file or folder: {self.data}")
        for flag, value in (("--eval-tasks-path", self.tasks_path), ("--eval-limit", self.limit)):
            if value is not None and not self.tasks:
                raise PruningError(f"{flag} applies only with --eval-tasks")
        if self.tasks_path is not None and not Path(self.tasks_path).expanduser().is_dir():
            raise PruningError(f"--eval-tasks-path: no such folder: {self.tasks_path}")


class PerplexityEvaluator:
    """Perplexity on non-overlapping windows of the evaluation text (the pruning deep-dive's protocol)."""

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
        run.report.put(self.key, Section({"data": self.text}, lines=perplexity_lines))

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
        run.report.put(self.key, Section({"data": str(self.folder), "sentences": len(self.sentences)}, lines=entity_f1_lines))

    def fingerprint(self) -> str:
        return hashlib.sha256(repr([(sentence.tokens, sentence.tags) for sentence in self.sentences]).encode()).hexdigest()

    def measure(self, run: Run, label: str) -> dict:
        with on_device(run.model, run.device, run.compute_dtype):
            scores = evaluate_ner(run.model, run.loaded.tokenizer, self.sentences, self.labels, run.device)
        return {"f1": scores.f1, "precision": scores.precision, "recall": scores.recall}


class TasksEvaluator:
    """Zero-shot accuracy on lm-evaluation-harness tasks, of the model held in memory (lm-eval's HFLM wraps it)."""

    key = "tasks"
    text = None

    def __init__(self, settings: EvaluationSettings) -> None:
        self.settings = settings
        self.path = Path(settings.tasks_path).expanduser() if settings.tasks_path is not None else None

    def prepare(self, run: Run) -> None:
        if run.loaded.kind != CAUSAL_LM:
            raise PruningError(f"--eval-tasks runs lm-eval's language-model tasks: it needs a causal LM, and this model is a {run.loaded.kind}")
        tokenizer = run.loaded.tokenizer
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            raise PruningError("--eval-tasks: lm-eval needs a tokenizer with a BOS or EOS token (its prefix for a scored continuation), and "
                               "this model's has neither")
        try:
            self.suite = resolve_tasks(list(self.settings.tasks), self.path, hub_connection_problem)
        except TaskError as error:
            hint = " (--eval-tasks-path adds a folder of task definitions)" if self.path is None and str(error).startswith("unknown") else ""
            raise PruningError(f"--eval-tasks: {error}{hint}") from None
        for name, reason in self.suite.unavailable.items():
            message = f"--eval-tasks {name} is not evaluated: {reason}"
            run.note(message)
            if run.ranks.writer:
                print(f"prune: warning: {message}", file=sys.stderr)
        run.report.put(self.key, Section({"harness": "lm-evaluation-harness, zero-shot", "tasks": list(self.suite.names), "limit": self.settings.limit,
                                          "path": str(self.path) if self.path is not None else None, "unavailable": dict(self.suite.unavailable)},
                                         lines=task_lines))

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.suite.names, self.settings.limit, str(self.path))).encode()).hexdigest()

    def measure(self, run: Run, label: str) -> dict:
        figures = None
        if run.ranks.writer:  # lm-eval scores a model object in one process: rank 0 does, and tells the others
            with on_device(run.model, run.device, run.compute_dtype):
                figures = evaluate_tasks(run.model, run.loaded.tokenizer, self.suite, limit=self.settings.limit,
                                         batch_size=self.settings.batch_size, seed=run.settings.seed)
        return run.ranks.broadcast_object(figures, 0)


EVALUATOR_SECTIONS = tuple(evaluator.key for evaluator in (PerplexityEvaluator, EntityF1Evaluator, TasksEvaluator))


def measured(figures: dict, *, besides: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """An evaluator's figures at each point of the run ('dense', 'pruned', ...), in the order they were measured: the
    entries of its section that are dicts, but for those named in `besides`."""
    return [(label, value) for label, value in figures.items() if isinstance(value, dict) and label not in besides]


def perplexity_lines(figures: dict) -> list[str]:
    points = measured(figures)
    if not points:
        return []
    window = points[0][1]
    values = ", ".join(f"{label} {value['value']:.3f}" for label, value in points)
    return [f"perplexity ({figures['data']}, {window['windows']} windows of {window['seqlen']} tokens): {values}"]


def entity_f1_lines(figures: dict) -> list[str]:
    points = measured(figures)
    if len(points) < 2:
        return []
    values = ", ".join(f"{label} {value['f1']:.4f}" for label, value in points)
    return [f"entity F1 ({figures['data']} test split, {figures['sentences']} sentences): {values}"]


def task_lines(tasks: dict) -> list[str]:
    """One line per lm-eval task: its accuracies at each point of the run."""
    limit = f", at most {tasks['limit']} examples each" if tasks["limit"] is not None else ""
    lines = [f"zero-shot tasks ({tasks['harness']}{limit}):"]
    points = [(label, value) for label, value in measured(tasks, besides=("unavailable",)) if value]
    for task in tasks["tasks"]:
        rows = [(label, value.get(task, {})) for label, value in points]
        parts = [f"{metric} " + ", ".join(f"{label} {row[metric]:.4f}" for label, row in rows if metric in row)
                 for metric in ("acc", "acc_norm") if any(metric in row for _, row in rows)]
        samples = next((row["samples"] for _, row in rows if row.get("samples") is not None), None)
        lines.append(f"  {task} ({samples} examples): " + "; ".join(parts))
    lines.extend(f"  {task}: not evaluated ({reason})" for task, reason in tasks["unavailable"].items())
    return lines


@torch.no_grad()
def sequential_perplexity(run: Run, windows: Tensor, batch_size: int, label: str = "perplexity") -> Perplexity:
    """Perplexity computed block by block, each block's weights present only while it runs: the windows' inputs to
    the first block are captured, run through each block in turn, and the model's own forward pass turns the last
    block's outputs into logits (its blocks replaced by `Replay`). Equals the whole-model forward pass. With several
    ranks, each runs its share of the windows and the losses are summed over the ranks."""
    mine = windows[run.ranks.rank :: run.ranks.world]
    batches = [{"input_ids": mine[start : start + batch_size]} for start in range(0, len(mine), batch_size)]
    total_loss, count = 0.0, 0
    if batches:
        calls = run.capture(batches)
        for index in tqdm(range(len(run.plan.blocks)), desc=label, unit="block", disable=not run.settings.progress, leave=False):
            with run.block(index) as block:
                run_calls(block, calls, advance=True)
        with run.without_blocks(compute=True) as stand_ins:
            for batch, call in zip(batches, calls, strict=True):
                stand_ins[-1].output = call.hidden_states
                loss, tokens = next_token_loss(run.model(input_ids=batch["input_ids"].to(run.device)).logits, batch["input_ids"])
                total_loss, count = total_loss + loss, count + tokens
    if run.ranks.several:
        totals = run.ranks.sum_(torch.tensor([total_loss, count], dtype=torch.float64, device=run.device))
        total_loss, count = totals[0].item(), int(totals[1].item())
    return from_losses(total_loss, count, windows)


def evaluators(run: Run) -> list[Evaluator]:
    """The evaluators that apply to this model and these settings (with a note when asked-for perplexity cannot be)."""
    settings = run.settings.evaluate
    return [*data_evaluators(run), *([TasksEvaluator(settings)] if settings.tasks else [])]


def data_evaluators(run: Run) -> list[Evaluator]:
    """Perplexity or entity F1 on --eval-data, when they apply."""
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
