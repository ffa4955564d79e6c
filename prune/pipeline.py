"""The pipeline: the settings of a run, and its stages in sequence.

    evaluate (dense) -> calibrate -> allocate (OWL) -> one-shot -> refine (MaskPro) -> recover (Magma, ...)
                                                       evaluate     evaluate             evaluate

Every stage first prepares (checks its inputs against the loaded model, reads its data) before any stage runs a
forward pass; then the stages run in turn, and the evaluators measure the model after each stage that changed it.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed
from torch import nn

from methods import PruningError, Target
from methods.quantize import QuantGrid
from methods.registry import method_options
from prune.compressed import check_available
from prune.devices import resolve_device
from prune.models import DTYPES, LoadedModel, load_model, prunable_layer_names, transformer_blocks
from prune.output import STORAGE, check_output_dir, complete_streamed, put_in_place, save_pruned
from prune.report import Report, Section
from prune.resume import NOT_FINGERPRINTED, ResumeState, model_fingerprint, tensor_digest
from prune.run import Run, Stage
from prune.settings import check_fields, flag_of, key_of, option, option_fields, switch_field
from prune.stages import STAGES
from prune.stages.allocate import AllocationSettings
from prune.stages.calibrate import CalibrationSettings
from prune.stages.evaluate import EVALUATOR_SECTIONS, EvaluationSettings, evaluators
from prune.stages.oneshot_settings import OneShotSettings
from prune.stages.recover import RecoverSettings
from prune.stages.refine import RefineSettings
from prune.weights import ShardWriter, StreamingError, writing

RANKS = "distributed"  # the report section of several ranks: what each did
STREAM_CHOICES = ("auto", "on", "off")
SAVE_FORMATS = ("dense", "compressed")


def stage_settings(stages: tuple[type[Stage], ...]) -> dict[str, type]:
    """Each part's settings class, under the attribute of PruneSettings that holds them. An optional stage is off
    (None) unless its switch field is set (e.g. `refine="maskpro"`, `--refine maskpro`)."""
    return {**{stage.key: stage.settings_class for stage in stages}, "evaluate": EvaluationSettings}


def switches(stages: tuple[type[Stage], ...]) -> dict[str, str]:
    """Optional stage -> the name of the field that turns it on."""
    return {key: switch.name for key, settings_class in stage_settings(stages).items() if (switch := switch_field(settings_class)) is not None}


def report_sections(stages: tuple[type[Stage], ...]) -> tuple[str, ...]:
    """Every report section a run may write (report.json holds the ones a run did not write as null)."""
    return (*EVALUATOR_SECTIONS, *dict.fromkeys(key for stage in stages for key in stage.sections), RANKS, STORAGE)


STAGE_SETTINGS = stage_settings(STAGES)  # the command's options come from these


@dataclasses.dataclass(init=False)
class PruneSettings:
    """Everything a run does: one settings object per stage, and what they share.

    Built from options named like the command's flags: `PruneSettings(method="wanda", sparsity=0.5, nsamples=64,
    eval_data="wiki-sample", refine="maskpro", refine_steps=200)`; a stage's settings object may be given whole
    instead (`refine=RefineSettings(steps=200)`). Method options go by their own names (`blocksize=64`).
    """

    oneshot: OneShotSettings
    calibrate: CalibrationSettings
    allocate: AllocationSettings
    evaluate: EvaluationSettings
    refine: RefineSettings | None
    recover: RecoverSettings | None
    seed: int = option(0, "--seed", "Seed of the calibration windows, the MaskPro draws and the recovery batches.")
    device: str = option("auto", "--device", "auto (CUDA when available), cpu or cuda; the model stays where it is, blocks run here.")
    dtype: str = option("auto", "--dtype", "The dtype the weights are loaded, kept and saved in: auto (the checkpoint's own), float32, bfloat16 or "
                        "float16. Blocks run in float32 on a CPU whatever it is.", choices=tuple(DTYPES))
    stream: str = option("auto", "--stream", "Read a safetensors checkpoint one block at a time and write each pruned block to --output at once, "
                         "so that memory holds one block, not the model: on, off, or auto (when --output is given and no stage needs the whole "
                         "model: --refine, --recover and entity F1 do).", choices=STREAM_CHOICES)
    output: str | None = option(None, "--output", "Save the pruned model (safetensors, in its own dtype), tokenizer, report.json and figures here.",
                                type=str, metavar="DIR")
    save_format: str | None = option(None, "--save-format", "How --output stores the weights: dense (safetensors any tool reads, pruned zeros "
                                     "stored as zeros) or compressed (compressed-tensors' packed integers and scales, read by transformers and "
                                     "vLLM; needs --quantize). Default: compressed with --quantize, else dense.", choices=SAVE_FORMATS)
    overwrite: bool = option(False, "--overwrite", "Replace a non-empty --output folder.")
    resume: bool = option(False, "--resume", "Continue an unfinished streamed run into --output after its last finished block (the same "
                          "settings, model and data: anything else is refused); its output equals an uninterrupted run's.")
    progress: bool = True  # progress bars (the command's --quiet turns them off)

    def __init__(self, *, stages: tuple[type[Stage], ...] = STAGES, **options: Any) -> None:
        self.stage_classes = tuple(stages)
        settings_classes, optional = stage_settings(self.stage_classes), switches(self.stage_classes)
        given: dict[str, dict] = {stage: {} for stage in settings_classes}
        whole: dict[str, Any] = {}
        shared = {field.name for field in dataclasses.fields(PruneSettings) if field.name not in STAGE_SETTINGS}
        for name in shared:
            setattr(self, name, next(field.default for field in dataclasses.fields(PruneSettings) if field.name == name))
        routes = option_routes(settings_classes)
        for key, value in options.items():
            if key in shared:
                setattr(self, key, value)
            elif key in settings_classes and isinstance(value, settings_classes[key]):
                whole[key] = value
            elif key == "method_options":
                given["oneshot"].setdefault("method_options", {}).update(value)
            elif key in routes:
                stage, name = routes[key]
                if name == "method_options":
                    given[stage].setdefault("method_options", {})[key] = value
                else:
                    given[stage][name] = value
            else:
                raise PruningError(f"unknown setting {key!r}")
        for stage, settings_class in settings_classes.items():
            if stage in whole:
                if given[stage]:
                    raise PruningError(f"{stage} settings given both whole and as options ({', '.join(given[stage])})")
                setattr(self, stage, whole[stage])
            elif stage in optional and given[stage].get(optional[stage]) is None:
                if given[stage]:
                    flags = ", ".join(flag_of(settings_class, name) for name in given[stage])
                    raise PruningError(f"{flags} appl{'ies' if len(given[stage]) == 1 else 'y'} only with "
                                       f"{flag_of(settings_class, optional[stage])}")
                setattr(self, stage, None)
            else:
                setattr(self, stage, settings_class(**given[stage]))

    def stages(self) -> dict[str, Any]:
        """The settings of each stage that runs."""
        return {stage: getattr(self, stage) for stage in stage_settings(self.stage_classes) if getattr(self, stage) is not None}

    def whole_model_needed_by(self) -> str | None:
        """The option that needs the whole model in memory at once, if any."""
        return next((reason for settings in self.stages().values() if (reason := settings.whole_model_reason(self)) is not None), None)

    def compressed(self) -> bool:
        """Whether --output is written in the compressed-tensors format."""
        return (self.save_format or ("compressed" if self.oneshot.quantize is not None else "dense")) == "compressed"

    def check_output_format(self) -> None:
        """Refuse a --save-format that cannot hold what the run makes."""
        if self.save_format == "compressed" and self.oneshot.quantize is None:
            raise PruningError("--save-format compressed stores quantized layers: compressed-tensors has no sparse format since 0.15 (which "
                               "transformers 5 needs), so an unquantized pruned model is saved dense; add --quantize int4 or int8")
        if self.output is not None and self.compressed():
            check_available()

    def streams(self) -> bool:
        """Whether the model is streamed block by block (when its checkpoint allows)."""
        if self.stream == "auto":
            return self.output is not None and self.whole_model_needed_by() is None
        return self.stream == "on"

    def check(self) -> Target:
        """Refuse any setting that cannot work, before a model is loaded; return the target."""
        check_fields(self)
        if self.stream == "on" and self.whole_model_needed_by() is not None:
            raise PruningError(f"--stream on reads one block at a time, but {self.whole_model_needed_by()} needs the whole model")
        if self.output is not None:
            check_output_dir(Path(self.output), self.overwrite)
        if self.resume and not (self.output is not None and self.streams()):
            raise PruningError("--resume continues a streamed run into its --output: it needs --output, and no --stream off, --refine, --recover "
                               "or entity F1")
        target = self.oneshot.target()
        for settings in self.stages().values():
            settings.check(target, self)
        self.check_output_format()
        resolve_device(self.device)
        return target

    def as_options(self) -> dict[str, Any]:
        """Every option of this run by its flat name (the command's flag with underscores), for the report."""
        options = {key_of(field): getattr(self, field.name) for field in option_fields(PruneSettings)}
        for settings in self.stages().values():
            options.update({key_of(field): getattr(settings, field.name) for field in option_fields(type(settings))})
        options.update(self.oneshot.method_options)
        for stage in switches(self.stage_classes):
            if getattr(self, stage) is None:
                options[stage] = None
        return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}  # as JSON holds them


def option_routes(settings_classes: dict[str, type] = STAGE_SETTINGS) -> dict[str, tuple[str, str]]:
    """Flat option name -> (stage, field). Method options route to the one-shot stage's `method_options`."""
    routes = {key_of(field): (stage, field.name) for stage, settings_class in settings_classes.items() for field in option_fields(settings_class)}
    routes.update({name: ("oneshot", "method_options") for name in method_options()})
    return routes


class Pipeline:
    """The stages one run goes through, built from checked settings (the check runs once, here)."""

    def __init__(self, settings: PruneSettings) -> None:
        target = settings.check()
        self.settings, self.target = settings, target
        self.stages: list[Stage] = [stage(getattr(settings, stage.key), target) for stage in settings.stage_classes
                                    if stage.wanted(getattr(settings, stage.key))]

    def resume_state(self, run: Run) -> ResumeState:
        """What an earlier part of this streamed run finished (with --resume), or a fresh state; an unfinished run
        that is not resumed is discarded."""
        checkpoint, ranks = run.loaded.checkpoint, run.ranks
        calibration = tensor_digest([tensor for batch in run.calibration_batches or [] for tensor in batch.values()])
        fingerprint = {
            "settings": {key: value for key, value in self.settings.as_options().items() if key not in NOT_FINGERPRINTED},
            "model": model_fingerprint(Path(run.loaded.source), list(checkpoint.files.values())),
            "calibration": ranks.gather_objects(calibration) if ranks.several else calibration,  # every rank's share
            "evaluation": [evaluator.fingerprint() for evaluator in run.evaluators],
        }
        if ranks.several:  # rank 0 keeps the state; the others follow its verdict and read its finished blocks
            verdict = None
            if ranks.writer:
                try:
                    state, note = ResumeState.start(run.output.folder, fingerprint, self.settings.resume)
                    verdict = {"folder": str(run.output.folder), "finished": state.finished, "report": state.report, "note": note}
                except PruningError as error:
                    verdict = {"error": str(error)}
            verdict = ranks.broadcast_object(verdict, 0)
            if "error" in verdict:
                raise PruningError(verdict["error"])
            if not ranks.writer:
                run.output.folder.mkdir(parents=True, exist_ok=True)
                return ResumeState(Path(verdict["folder"]), fingerprint, verdict["finished"], verdict["report"], writable=False)
        else:
            state, note = ResumeState.start(run.output.folder, fingerprint, self.settings.resume)
        if note is not None:
            run.note(note)
        if not state.finished and run.output.folder.exists():  # nothing to carry on from: no earlier shard may stand for a block of this run
            shutil.rmtree(run.output.folder)
        with writing(run.output.folder):
            run.output.folder.mkdir(parents=True, exist_ok=True)
        state.save()
        return state

    def load(self, name: str, *, cache_dir: Path | None = None) -> tuple[LoadedModel, float]:
        """Load the model as these settings want it (in their dtype; streamed or whole); with the seconds it took.
        Layer-name rules (--targets, --ignore, --sparsity-override) are checked against the model's layers first."""
        rules = self.settings.oneshot.layer_rules()
        if rules and (problem := rules.unmatched(prunable_layer_names(name, cache_dir=cache_dir))) is not None:
            raise PruningError(problem)
        started = time.perf_counter()
        loaded = load_model(name, cache_dir=cache_dir, dtype=self.settings.dtype, stream=self.settings.streams())
        return loaded, time.perf_counter() - started

    def run(self, loaded: LoadedModel, *, load_seconds: float = 0.0, calibration_batches: list[dict] | None = None) -> Report:
        """Prune `loaded.model` in place; evaluate it before and after each stage that changes it, when asked; write
        the output when the settings name one. A streamed model's pruned blocks go to the output as they are done."""
        settings = self.settings
        if settings.dtype != "auto" and loaded.dtype != DTYPES[settings.dtype]:
            loaded.model.to(DTYPES[settings.dtype])  # a model given in memory is cast as a loaded one would be
        plan = settings.oneshot.plan(loaded.model, self.target)  # built once, before any stage: every stage reads it
        run = Run(loaded, settings, resolve_device(settings.device), plan, calibration_batches=calibration_batches,
                  needs_block_inputs=any(stage.needs_block_inputs for stage in self.stages),
                  gradient_samples=next((stage.gradient_samples for stage in self.stages if stage.gradient_samples is not None), None),
                  sections=report_sections(settings.stage_classes))
        output = Path(settings.output).expanduser() if settings.output is not None else None
        written = output if run.ranks.writer else None  # only rank 0 writes the output; other ranks keep their shards apart
        staging = None
        if run.streamed:
            staging = streaming_folder(written)
            run.output = ShardWriter(staging, len(transformer_blocks(loaded.model)[1]) + 1)
        try:
            self.stages_and_evaluations(run, load_seconds)
            if written is not None and run.streamed:
                complete_streamed(loaded, run.report, run.output, self.output_grid(run))
                run.resume.done()
                check_output_dir(written, settings.overwrite)
                put_in_place(staging, written.resolve())
            elif written is not None:
                save_pruned(loaded, run.report, written, overwrite=settings.overwrite, grid=self.output_grid(run))
        except StreamingError as error:  # the output cannot be written (a full disk): what this run wrote goes
            if staging is not None and written is not None:
                raise StreamingError(error.errno, f"{error.strerror}; {discard_unwritable(staging, run)}") from None
            raise
        finally:  # an unfinished streamed run keeps rank 0's blocks for --resume
            if staging is not None and written is None:
                shutil.rmtree(staging, ignore_errors=True)
        return run.report

    def output_grid(self, run: Run) -> QuantGrid | None:
        """The grid the quantized layers are packed on in a compressed output (None: a dense output)."""
        return self.settings.oneshot.grid(run.dtype) if self.settings.compressed() else None

    def stages_and_evaluations(self, run: Run, load_seconds: float) -> None:
        run.report.seconds["load"] = load_seconds
        run.report.settings = self.settings.as_options()
        run.evaluators = evaluators(run)
        for part in (*run.evaluators, *self.stages):
            part.prepare(run)  # every input is checked and read here, before the first forward pass
        if run.streamed:
            run.resume = self.resume_state(run)
        previous = run.evaluate("dense")
        for stage in self.stages:
            with run.timed(stage.name):
                stage.execute(run)
            if stage.label is not None:
                figures = run.evaluate(stage.label)
                stage.evaluated(run, previous, figures)
                previous = figures
        run.report.seconds["total"] = sum(run.report.seconds.values())
        if run.ranks.several:
            run.report.put(RANKS, Section(ranks_section(run, self.stages), lines=ranks_lines))
        run.report.finish()


def ranks_section(run: Run, stages: list[Stage]) -> dict:
    """How many ranks ran and what each did (each stage adds its own figures per rank)."""
    mine = {"calibration_windows": sum(len(batch["input_ids"]) for batch in run.calibration_batches or []), **run.ranks.traffic,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    per_rank = [{"rank": rank, **figures} for rank, figures in enumerate(run.ranks.gather_objects(mine))]
    for stage in stages:
        for entry, figures in zip(per_rank, stage.rank_figures(run.ranks.world), strict=True):
            entry.update(figures)
    return {"ranks": run.ranks.world, "backend": torch.distributed.get_backend(), "per_rank": per_rank}


def ranks_lines(ranks: dict) -> list[str]:
    work = "; ".join(f"rank {entry['rank']}: {entry['calibration_windows']} calibration windows, {entry.get('layer_groups_pruned', 0)} layer groups "
                     f"pruned, {entry.get('bytes_summed', 0) / 2**20:.1f} MB summed, {entry.get('bytes_broadcast', 0) / 2**20:.1f} MB broadcast"
                     for entry in ranks["per_rank"])
    return [f"{ranks['ranks']} ranks ({ranks['backend']}): {work}"]


def discard_unwritable(staging: Path, run: Run) -> str:
    """After a write failure of a streamed run: keep its finished blocks for --resume (hours of work at 7B), or
    remove the staging folder when it holds none; say which."""
    finished = run.resume.finished if run.resume is not None else 0
    if not finished:
        shutil.rmtree(staging, ignore_errors=True)
        return f"removed the unfinished output {staging}"
    blocks = "1 finished block stays" if finished == 1 else f"{finished} finished blocks stay"
    return f"the {blocks} in {staging}: free some space and run again with --resume, or delete it"


def streaming_folder(output: Path | None) -> Path:
    """Where a streamed run writes its shards: beside the output (`.NAME.partial`, renamed to NAME at the end; an
    unfinished run's blocks stay there for --resume), or a temporary folder when there is no output."""
    if output is None:
        return Path(tempfile.mkdtemp(prefix="prune-stream-"))
    return output.resolve().parent / f".{output.name}.partial"


def run_pipeline(loaded: LoadedModel, settings: PruneSettings, load_seconds: float = 0.0, calibration_batches: list[dict] | None = None) -> Report:
    """Prune `loaded.model` in place as `settings` say; evaluate it before and after when asked.

    `calibration_batches` (dicts of model inputs, e.g. padded sentences with their `attention_mask`) replace the
    windows of the calibration text; padded positions are left out of every statistic.
    """
    return Pipeline(settings).run(loaded, load_seconds=load_seconds, calibration_batches=calibration_batches)


def prune_model(model: str | LoadedModel = "smollm2-135m", *, cache_dir: Path | None = None, calibration_batches: list[dict] | None = None,
                **options: Any) -> tuple[nn.Module, Report]:
    """Prune a model one-shot and return it with its report.

    `model` is an embedded name ('smollm2-135m', 'minilm-l6'), a local folder, a hub name, or a LoadedModel. The
    options are those of the `prune` command, by name (method, sparsity, pattern, calibration, nsamples, seqlen,
    eval_data, allocation, refine, recover, output, ...); see PruneSettings. `calibration_batches` replace the
    calibration text (see run_pipeline). With `output`, the pruned model is written there; a safetensors
    checkpoint is then streamed (unless `stream="off"`), and the returned model's blocks are empty (on the meta
    device): their pruned weights are in `output`.
    """
    pipeline = Pipeline(PruneSettings(**options))  # bad settings fail here, before the model is loaded
    loaded, seconds = (model, 0.0) if isinstance(model, LoadedModel) else pipeline.load(model, cache_dir=cache_dir)
    report = pipeline.run(loaded, load_seconds=seconds, calibration_batches=calibration_batches)
    return loaded.model, report
