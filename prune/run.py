"""What one pipeline run shares between its stages: the model, the device, the data read for it, the plan of which
layers are pruned to what, the captured block inputs, and the report that every stage writes its section of."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from calibration.capture import BlockCall, capture_block_inputs
from calibration.conll import NerDataError, Sentence, conll_split_path, read_conll
from calibration.text import TextSources
from methods import PruningError, Target
from prune.compressed import layer_scales
from prune.devices import cast_while_running, compute_dtype, on_device, timed
from prune.distributed import Ranks
from prune.models import LoadedModel, max_positions
from prune.plan import LayerPlan
from prune.report import Report
from prune.resume import ResumeState
from prune.weights import Checkpoint, ShardWriter, materialise, parameter_names, release

if TYPE_CHECKING:
    from prune.pipeline import PruneSettings


class Evaluator(Protocol):
    """One way of measuring the model (perplexity, entity F1): its report section holds what is measured and, under
    each label ('dense', 'pruned', ...), the figures measured at that point."""

    key: str  # the Report field it fills
    text: str | None  # the corpus it measures on, if any (the calibration text is kept apart from it)

    def prepare(self, run: Run) -> None:
        """Read and check the evaluation data; write the section's description. No forward pass."""

    def measure(self, run: Run, label: str) -> dict:
        """The figures of the model as it is now (`label` names that point of the run for progress bars)."""

    def fingerprint(self) -> str:
        """A digest of the data it measures on (a resumed run must measure on the same)."""


class Replay(nn.Module):
    """Stands in for a transformer block in the model's own forward pass: it returns its input, or, once given an
    `output`, that (the hidden states the real blocks produced when they were run one at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Tensor | None = None

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states if self.output is None else self.output


class Stage:
    """One step of the pipeline, made from its settings (`settings_class`, held by PruneSettings under `key`) and
    the run's target. `prepare` checks every input against the loaded model and reads what the stage needs, with
    no forward pass (so that bad input fails before any work); `execute` does the work and writes the stage's
    report section. `label` names the model after a stage that changes it ('pruned', ...): the evaluators measure
    it then, and `evaluated` lets the stage record the figures before and after it."""

    key: str = ""  # the attribute of PruneSettings holding its settings
    settings_class: type = object
    name: str = ""  # its entry in report.seconds
    label: str | None = None
    sections: tuple[str, ...] = ()  # the keys of the report sections it may write
    needs_block_inputs: bool = False  # whether it runs the captured block inputs through the blocks
    gradient_samples: tuple[str, int] | None = None  # (the option that asks, how many): task-loss samples it takes gradients on

    def __init__(self, settings, target: Target) -> None:
        self.settings, self.target = settings, target

    @classmethod
    def wanted(cls, settings) -> bool:
        """Whether the stage runs with these settings (an optional stage's settings are None when it is off)."""
        return settings is not None

    def prepare(self, run: Run) -> None:
        pass

    def execute(self, run: Run) -> None:
        raise NotImplementedError

    def evaluated(self, run: Run, before: dict, after: dict) -> None:
        pass

    def rank_figures(self, world: int) -> list[dict]:
        """Several ranks: what each of the `world` ranks did in this stage, for the report's ranks section."""
        return [{} for _ in range(world)]


class Run:
    """The state of one run. Stages read what earlier stages (in the order of the pipeline) put here."""

    def __init__(self, loaded: LoadedModel, settings: PruneSettings, device: torch.device, plan: LayerPlan | None = None, *,
                 calibration_batches: list[dict] | None = None, needs_block_inputs: bool = False,
                 gradient_samples: tuple[str, int] | None = None, sections: tuple[str, ...] = ()) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.settings = settings
        self.device = device
        self.ranks = Ranks.current()  # the processes pruning this model together (one, outside a process group)
        self.dtype = loaded.dtype  # the weights are stored in this dtype, and written back in it
        self.compute_dtype = compute_dtype(device, self.dtype)  # blocks run in this one
        self.needs_block_inputs = needs_block_inputs
        self.given_batches = calibration_batches  # model inputs given by the caller instead of calibration text
        self.calibration_batches: list[dict] | None = None  # set by the calibrate stage
        self.gradient_samples_wanted = gradient_samples  # (flag, count) when a stage takes task-loss gradients
        self.gradient_samples: list[dict] | None = None  # set by the calibrate stage: model inputs with labels, one sample each
        self.plan = plan  # which layers are pruned to what: built before any stage (the allocation stage sets its blocks' targets)
        self.calls: list[BlockCall] | None = None  # the first block's captured inputs, when a stage needs them
        self.evaluators: list[Evaluator] = []
        self.output: ShardWriter | None = None  # streamed: where pruned blocks are written as soon as they are done
        self.block_sources: dict[int, Checkpoint] = {}  # streamed: blocks read from the output instead of the checkpoint
        self.resume: ResumeState | None = None  # streamed: the finished part of the run, saved as it grows
        self.report = Report(model={"name": loaded.name, "source": loaded.source, "kind": loaded.kind, "dtype": str(self.dtype).removeprefix("torch."),
                                    "streamed": loaded.checkpoint is not None}, device=str(device), keys=sections)
        self.report.notes.extend(loaded.notes)
        self._text: TextSources | None = None
        self._ids: dict[str, Tensor] = {}
        self._conll: dict[str, list[Sentence]] = {}

    # the data a run reads: each read once, its time counted under report.seconds["data"]

    def text(self) -> TextSources:
        if self._text is None:
            evaluation = next((evaluator.text for evaluator in self.evaluators if evaluator.text is not None), None)
            self._text = TextSources(self.loaded.tokenizer, calibration=self.settings.calibrate.source, evaluation=evaluation)
        return self._text

    def calibration_ids(self) -> Tensor:
        """Token ids of the calibration text (`--calibration`), which shares no text with the evaluation text."""
        if "calibration" not in self._ids:
            with self.timed("data"):
                self._ids["calibration"] = self.text().calibration_ids()
        return self._ids["calibration"]

    def evaluation_ids(self) -> Tensor:
        if "evaluation" not in self._ids:
            with self.timed("data"):
                self._ids["evaluation"] = self.text().evaluation_ids()
        return self._ids["evaluation"]

    def conll_split(self, split: str) -> list[Sentence] | None:
        """The sentences of one split of the `--calibration conll:DIR` folder (None when the folder has no such file)."""
        if split not in self._conll:
            path = conll_split_path(self.settings.calibrate.conll_folder(), split)
            if path is None:
                return None
            with self.timed("data"):
                try:
                    self._conll[split] = read_conll(path)
                except NerDataError as error:
                    raise PruningError(str(error)) from None
        return self._conll[split]

    def labelled_sentences(self, flag: str) -> tuple[list[Sentence], list[str]]:
        """The train sentences of `--calibration conll:DIR` and the model's label names, for `flag`'s task training:
        refused when there is no train file or its tags are not all labels of the model."""
        folder = self.settings.calibrate.conll_folder()
        sentences = self.conll_split("train")
        if sentences is None:
            raise PruningError(f"{flag}: {folder} holds no CoNLL train file (train.txt or eng.train) to train on")
        labels = [self.model.config.id2label[index] for index in range(len(self.model.config.id2label))]
        unknown = {tag for sentence in sentences for tag in sentence.tags} - set(labels)
        if unknown:
            raise PruningError(f"{flag}: the model's labels ({', '.join(labels)}) lack tags of the train file in {folder}: {', '.join(sorted(unknown))}")
        return sentences, labels

    # checks shared by the stages

    def check_length(self, flag: str, length: int | None) -> None:
        """Refuse a sequence length the model's position embeddings cannot hold."""
        limit = max_positions(self.model)
        if limit is not None and length is not None and length > limit:
            raise PruningError(f"{flag} {length} is longer than the model's {limit} positions")

    def check_kind(self, flag: str, *kinds: str, why: str) -> None:
        if self.loaded.kind not in kinds:
            raise PruningError(f"{flag} {why}; this model is a {self.loaded.kind}")

    # work

    @property
    def streamed(self) -> bool:
        """Whether the blocks' weights are read from the shards one block at a time (else the model is in memory)."""
        return self.loaded.checkpoint is not None

    @contextlib.contextmanager
    def block(self, index: int, *, changed: bool = False, original: bool = False) -> Iterator[nn.Module]:
        """Block `index` on the device, for the enclosed work: its weights in the stored dtype, each layer cast to the
        compute dtype only while it runs (so that a half-precision block never has a whole float32 copy).

        In memory it is moved there and back. Streamed, its weights are read from where they are (the checkpoint, or
        the output once the block was pruned; with `original`, the checkpoint always) and dropped afterwards; a
        `changed` block is first written to its output shard.
        """
        block = self.plan.blocks[index]
        if not self.streamed:
            with on_device(block, self.device), cast_while_running(block, self.device, self.compute_dtype):
                yield block
            return
        prefix = f"{self.plan.blocks_name}.{index}."
        source = self.loaded.checkpoint if original else self.block_sources.get(index, self.loaded.checkpoint)
        materialise(block, source.read(parameter_names(block, prefix), self.dtype), self.device, prefix)
        try:
            with cast_while_running(block, self.device, self.compute_dtype):
                yield block
            if changed:
                tensors = {prefix + name: parameter.detach().to("cpu") for name, parameter in block.named_parameters()}
                tensors.update({prefix + name: scale for name, scale in layer_scales(block).items()})  # a quantized layer's grid
                path = self.output.write(index, tensors)
                self.block_sources[index] = Checkpoint(dict.fromkeys(tensors, path))
        finally:
            release(block, self.dtype)

    @contextlib.contextmanager
    def without_blocks(self, *, compute: bool = False) -> Iterator[list[Replay]]:
        """The model with its transformer blocks replaced by `Replay` stand-ins for the enclosed work: the model's own
        forward pass then computes what comes before and after the blocks exactly as it would around the real ones.
        With `compute`, each module outside the blocks (embeddings, final norm, head) runs on the device in the
        compute dtype, cast only while it runs, so that no second copy of them all is ever held."""
        blocks = self.plan.blocks
        originals = list(blocks)
        stand_ins = [Replay() for _ in originals]
        try:
            for index, stand_in in enumerate(stand_ins):
                blocks[index] = stand_in
            with cast_while_running(self.model, self.device, self.compute_dtype) if compute else contextlib.nullcontext():
                yield stand_ins
        finally:
            for index, original in enumerate(originals):
                blocks[index] = original

    def capture(self, batches: list[dict] | None = None) -> list[BlockCall]:
        """Run the batches (the calibration batches by default) up to the first block and keep everything it is called
        with, cast to the compute dtype. What comes before the blocks runs where and as the model is stored."""
        with self.without_blocks() as stand_ins:
            return capture_block_inputs(self.model, stand_ins[0], batches or self.calibration_batches, self.device, self.compute_dtype)

    def evaluate(self, label: str) -> dict:
        """Measure the model as it is now with every evaluator; record and return the figures by evaluator. The dense
        figures of a resumed run are those its earlier part measured."""
        saved = self.resume.report.get("evaluations", {}) if self.resume is not None else {}
        figures = saved.get(label) or {}
        with self.timed("evaluate"):
            for evaluator in self.evaluators:
                if evaluator.key not in figures:
                    figures[evaluator.key] = evaluator.measure(self, label)
                getattr(self.report, evaluator.key)[label] = figures[evaluator.key]
        if self.resume is not None and label == "dense":
            self.resume.report.setdefault("evaluations", {})[label] = figures
            self.resume.save()
        return figures

    def block_shard(self, index: int) -> Checkpoint:
        """Streamed: the shard of a block an earlier part of the run finished, as a source to read it from (in the
        folder of the resume state: rank 0's, on several ranks)."""
        path = self.resume.folder / self.output.shard_name(index)
        prefix = f"{self.plan.blocks_name}.{index}."
        return Checkpoint(dict.fromkeys(parameter_names(self.plan.blocks[index], prefix), path))

    def timed(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Add the seconds spent inside (the device's work included) to report.seconds[key]."""
        return timed(self.report.seconds, key, self.device)

    def note(self, message: str) -> None:
        self.report.notes.append(message)
