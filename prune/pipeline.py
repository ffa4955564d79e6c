"""The one-shot pipeline: calibrate block by block, prune each layer with the chosen method, feed the pruned outputs on."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import BlockCall, LayerInputStatistics, capture_block_inputs, run_block
from calibration.sentences import sentence_batches
from calibration.text import TextSources
from calibration.windows import evaluation_windows, sample_windows
from eval.ner import NerDataError, Sentence, conll_split_path, evaluate_ner, read_conll
from eval.perplexity import perplexity
from eval.sparsity import nm_valid, zero_fraction
from methods import Method, PruningError, Target, get_method, obs, owl, wanda
from methods.registry import COLUMN_NORMS
from methods.sparsegpt import check_options as check_sparsegpt_options
from prune.devices import resolve_device, synchronize
from prune.models import (
    CAUSAL_LM,
    TOKEN_CLASSIFICATION,
    LoadedModel,
    input_features,
    layer_weight,
    load_model,
    max_positions,
    prunable_layers,
    set_layer_weight,
    transformer_blocks,
)
from prune.recover import RecoverSettings, language_model_batches, recover
from prune.refine import RefineSettings, put_weights_under_mask, refine
from prune.report import LayerReport, Report

PROPAGATE_CHOICES = ("pruned", "dense")
ALLOCATIONS = ("uniform", "owl")
LARGE_WORK_FLOP = 2e13  # above this much estimated work (minutes on a CPU), say so before starting
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CONLL_PREFIX = "conll:"  # --calibration conll:DIR: sentences of a CoNLL train file, for a token classifier


@dataclass
class PruneSettings:
    """Everything that decides what the one-shot stage does, checked before any work starts."""

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    calibration: str = "wiki-sample"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"
    method_options: dict = field(default_factory=dict)  # e.g. blocksize, mask_blocksize, percdamp for SparseGPT
    propagate: str = "pruned"  # which outputs feed the next block: the pruned block's or the dense block's
    hessian_dtype: str = "float32"
    blocks: str | None = None  # prune only these blocks, e.g. "0-9,12" (the others stay dense); None: all
    skip_incompatible: bool = False  # leave dense the layers that cannot hold an N:M pattern, instead of refusing
    allocation: str = "uniform"  # how the target spreads over blocks: 'uniform' or 'owl'
    owl_rule: str = "lambda"  # 'lambda' (the OWL paper) or 'seed' (seed 003, section 4)
    owl_m: float = 5.0  # a Wanda score is an outlier when it exceeds owl_m times the block's mean score
    owl_lambda: float = 0.08  # the lambda rule keeps block sparsities within [S - owl_lambda, S + owl_lambda]
    eval_data: str | None = None  # perplexity text: 'wiki-sample', 'wikitext2', 'c4' or a path; None: no evaluation
    eval_seqlen: int | None = None  # default: seqlen
    eval_windows: int | None = None  # at most this many windows (default: all)
    eval_batch_size: int = 4
    refine: RefineSettings | None = None  # a MaskPro refinement of N:M masks after pruning (None: none)
    recover: RecoverSettings | None = None  # a recovery fine-tune after pruning (and refinement) (None: none)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.recover, str):  # prune_model(..., recover="magma") in a notebook
            self.recover = RecoverSettings(optimizer=self.recover, seed=self.seed, progress=self.progress)
        if isinstance(self.refine, str):  # prune_model(..., refine="maskpro")
            self.refine = RefineSettings(method=self.refine, seed=self.seed, progress=self.progress)

    def conll_folder(self) -> Path | None:
        """The folder named by `--calibration conll:DIR`, or None for text calibration."""
        return Path(self.calibration[len(CONLL_PREFIX):]).expanduser() if self.calibration.startswith(CONLL_PREFIX) else None

    def target(self) -> Target:
        return Target.from_options(self.sparsity, self.pattern)

    def resolved_method(self) -> Method:
        method = get_method(self.method)
        unknown = set(self.method_options) - set(method.options)
        if unknown:
            raise PruningError(f"method {method.name} takes no option(s) {', '.join(sorted(unknown))}")
        return method

    def check(self) -> None:
        """Raise PruningError for any setting that cannot work, before a model is loaded."""
        target = self.target()
        method = self.resolved_method()
        if method.name == "sparsegpt":
            check_sparsegpt_options(
                target, self.method_options.get("blocksize", 128), self.method_options.get("mask_blocksize", 64)
            )
        if self.method_options.get("percdamp", 0.0) < 0:
            raise PruningError("--percdamp must be >= 0")
        for label, value in (("nsamples", self.nsamples), ("seqlen", self.seqlen), ("batch-size", self.batch_size), ("eval-batch-size", self.eval_batch_size)):
            if value < 1:
                raise PruningError(f"--{label} must be at least 1, got {value}")
        if self.eval_seqlen is not None and self.eval_seqlen < 2:
            raise PruningError(f"--eval-seqlen must be at least 2, got {self.eval_seqlen}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise PruningError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        if self.allocation not in ALLOCATIONS:
            raise PruningError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "owl":
            if target.is_nm:
                raise PruningError(f"OWL allocates unstructured sparsity per block; it does not apply to pattern {target.pattern}")
            if self.owl_rule not in owl.RULES:
                raise PruningError(f"--owl-rule must be one of {', '.join(owl.RULES)}")
            if self.owl_m <= 0:
                raise PruningError(f"--owl-m must be positive, got {self.owl_m:g}")
            if self.owl_rule == owl.LAMBDA_RULE and not 0 <= self.owl_lambda <= min(target.sparsity, 1 - target.sparsity):
                raise PruningError(f"--owl-lambda must be in [0, {min(target.sparsity, 1 - target.sparsity):g}] for sparsity {target.sparsity:g}")
        if self.propagate not in PROPAGATE_CHOICES:
            raise PruningError(f"propagate must be one of {', '.join(PROPAGATE_CHOICES)}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise PruningError(f"hessian dtype must be one of {', '.join(HESSIAN_DTYPES)}")
        if self.recover is not None:
            self.recover.check()
        if self.refine is not None:
            self.refine.check(target)
        resolve_device(self.device)
        folder = self.conll_folder()
        if folder is not None and conll_split_path(folder, "train") is None:
            raise PruningError(f"--calibration {self.calibration}: {folder} holds no CoNLL train file (train.txt or eng.train)")
        for label, source in (("calibration", None if folder is not None else self.calibration), ("eval-data", self.eval_data)):
            if source is not None and source not in ("wiki-sample", "wikitext2", "c4") and not Path(source).expanduser().exists():
                raise PruningError(f"--{label}: no such file or folder: {source}")


def parse_blocks(spec: str | None, count: int) -> list[int]:
    """Block indices from a spec like '0-9,12' (None: all `count` blocks)."""
    if spec is None:
        return list(range(count))
    selected = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise PruningError(f"--blocks must look like 0-9,12, got {spec!r}")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last or last >= count:
            raise PruningError(f"--blocks {spec}: the model has blocks 0-{count - 1}")
        selected.update(range(first, last + 1))
    return sorted(selected)


def incompatible_layers(blocks: nn.ModuleList, blocks_name: str, target: Target, selected: list[int]) -> list[str]:
    """Names of the layers of the selected blocks whose input size is not a multiple of the target's M."""
    if not target.is_nm:
        return []
    return [
        f"{blocks_name}.{index}.{name}"
        for index in selected
        for name, layer in prunable_layers(blocks[index]).items()
        if input_features(layer) % target.m
    ]


def window_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size)]


def prune_layer(name: str, layer: nn.Module, statistic, method: Method, target: Target, options: dict, device: torch.device) -> LayerReport:
    """Prune one layer in place and describe the result."""
    weight = layer_weight(layer)
    synchronize(device)
    started = time.perf_counter()
    result = method.run(weight, statistic, target, **options)
    set_layer_weight(layer, result.weight)
    synchronize(device)
    seconds = time.perf_counter() - started
    pruned = layer_weight(layer)
    notes = []
    if result.details.get("damping_retries"):
        notes.append(f"Cholesky failed; damping raised to {result.details['percdamp']:g} after {result.details['damping_retries']} retries")
    if result.details.get("dead_inputs"):
        notes.append(f"{result.details['dead_inputs']} dead inputs zeroed")
    return LayerReport(
        name=name,
        shape=tuple(pruned.shape),
        sparsity=zero_fraction(pruned),
        pattern_valid=nm_valid(pruned, target.n, target.m) and bool(torch.all(pruned[~result.mask] == 0)) if target.is_nm else None,
        loss=result.loss,
        seconds=seconds,
        notes=notes,
    )


def skipped_layer(name: str, layer: nn.Module, reason: str) -> LayerReport:
    weight = layer_weight(layer)
    return LayerReport(name, tuple(weight.shape), zero_fraction(weight), None, None, 0.0, [reason])


def block_pass(block: nn.Module, calls: list[BlockCall], statistics: LayerInputStatistics | None, *, advance: bool) -> None:
    """Run every captured call through `block`, feeding `statistics` when given.

    With `advance`, each call's hidden states are replaced by the block's output as soon as it is
    computed, so that `calls` becomes the next block's inputs while holding one activation buffer.
    """
    for position, call in enumerate(calls):
        if statistics is not None:
            statistics.begin_batch(call.token_mask)
        output = run_block(block, call)
        if advance:
            calls[position] = call.with_hidden_states(output)


def outlier_ratios(blocks: nn.ModuleList, selected: list[int], calls: list[BlockCall], threshold: float, device: torch.device, progress: bool) -> tuple[list[float], list[int]]:
    """OWL on the dense model: for each selected block, the fraction of its Wanda scores |W|·‖X‖ above
    `threshold` x their mean, and its number of prunable weights. `calls` are advanced in place (consumed)."""
    ratios, parameters = [], []
    for index in tqdm(range(max(selected) + 1), desc="OWL outlier ratios", unit="block", disable=not progress, leave=False):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        layers = prunable_layers(block) if index in selected else {}
        with LayerInputStatistics(layers, COLUMN_NORMS, device) as statistics:
            block_pass(block, calls, statistics, advance=index < max(selected))
        if index in selected:
            scores = [wanda.scores(layer_weight(layer), statistics.statistics(name)) for name, layer in layers.items() if statistics.statistics(name) is not None]
            ratios.append(owl.outlier_ratio(scores, threshold))
            parameters.append(sum(layer_weight(layer).numel() for layer in layers.values()))
        block.to(home)
    return ratios, parameters


def prune_blocks(
    blocks: nn.ModuleList,
    blocks_name: str,
    calls: list[BlockCall] | None,
    method: Method,
    targets: list[Target | None],
    settings: PruneSettings,
    device: torch.device,
    skip: set[str],
) -> tuple[list[LayerReport], dict]:
    """Prune block i to targets[i], in turn (None: leave it dense); `calls` are the captured inputs of the first block
    (None: no calibration)."""
    layers_report: list[LayerReport] = []
    breakdown = {"statistics": 0.0, "method": 0.0, "propagate": 0.0}
    hessian_dtype = HESSIAN_DTYPES[settings.hessian_dtype]
    chosen = [target for target in targets if target is not None]
    description = f"{method.name} {chosen[0].describe()}" if len(set(chosen)) == 1 else f"{method.name} OWL"
    last = max(index for index, target in enumerate(targets) if target is not None)
    bar = tqdm(list(enumerate(blocks)), desc=description, unit="block", disable=not settings.progress)
    for index, block in bar:
        target = targets[index]
        if target is None:
            layers_report.extend(skipped_layer(f"{blocks_name}.{index}.{name}", layer, "block not selected; left dense") for name, layer in prunable_layers(block).items())
            if calls is not None and index < last:
                started = time.perf_counter()
                home = next(block.parameters()).device
                block.to(device)
                block_pass(block, calls, None, advance=True)
                block.to(home)
                breakdown["propagate"] += time.perf_counter() - started
            continue
        home = next(block.parameters()).device
        block.to(device)
        layers = prunable_layers(block)
        statistics = None
        advanced = False  # whether `calls` already hold this block's outputs
        if method.statistics is not None:
            started = time.perf_counter()
            with LayerInputStatistics(layers, method.statistics, device, hessian_dtype) as statistics:
                advanced = settings.propagate == "dense" and index < last
                block_pass(block, calls, statistics, advance=advanced)
            synchronize(device)
            breakdown["statistics"] += time.perf_counter() - started

        started = time.perf_counter()
        block_losses = []
        for name, layer in layers.items():
            full_name = f"{blocks_name}.{index}.{name}"
            statistic = statistics.statistics(name) if statistics is not None else None
            if full_name in skip:
                report = skipped_layer(full_name, layer, f"input size not a multiple of M={target.m}; left dense")
            elif statistics is not None and statistic is None:
                report = skipped_layer(full_name, layer, "never called during calibration; left dense")
            else:
                report = prune_layer(full_name, layer, statistic, method, target, settings.method_options, device)
                if statistics is not None:
                    report.statistics_from = f"{blocks_name}.{index}.{statistics.leader[name]}"
                block_losses.append(report.loss)
            layers_report.append(report)
        del statistics
        breakdown["method"] += time.perf_counter() - started

        if calls is not None and index < last and not advanced:
            started = time.perf_counter()
            block_pass(block, calls, None, advance=True)
            synchronize(device)
            breakdown["propagate"] += time.perf_counter() - started
        block.to(home)
        if block_losses:
            bar.set_postfix(loss=f"{sum(block_losses):.3g}")
    return layers_report, breakdown


def dense_snapshot(blocks: nn.ModuleList, blocks_name: str, selected: list[int], skip: set[str]) -> dict[str, torch.Tensor]:
    """A CPU copy of the (out, in) weight of every layer that the one-shot stage will prune."""
    snapshot = {}
    for index in selected:
        for name, layer in prunable_layers(blocks[index]).items():
            full_name = f"{blocks_name}.{index}.{name}"
            if full_name not in skip:
                snapshot[full_name] = layer_weight(layer).detach().to("cpu", copy=True)
    return snapshot


def check_refined_layers(report: Report, model: nn.Module, target: Target) -> None:
    """After refinement every refined layer must still hold the pattern; update the per-layer sparsity and validity."""
    for layer_report in report.layers:
        if layer_report.loss is None:
            continue
        weight = layer_weight(model.get_submodule(layer_report.name))
        layer_report.sparsity = zero_fraction(weight)
        layer_report.pattern_valid = nm_valid(weight, target.n, target.m)
        if not layer_report.pattern_valid:
            raise PruningError(f"internal error: {layer_report.name} lost its {target.pattern} pattern during refinement")


def estimated_work(blocks: list[nn.Module], method: Method, target: Target) -> float | None:
    """Floating-point work of methods whose cost grows fast with the layer size (exact OBS), else None."""
    if method.name != "obs":
        return None
    return sum(obs.work(*layer_weight(layer).shape, target) for block in blocks for layer in prunable_layers(block).values())


def conll_calibration(loaded: LoadedModel, settings: PruneSettings) -> tuple[list[dict], list[Sentence] | None]:
    """Calibration batches of `settings.nsamples` sentences of the CoNLL train file named by `--calibration conll:DIR`,
    and the test sentences to score entity F1 on (None without evaluation or without a test file)."""
    if loaded.kind != TOKEN_CLASSIFICATION:
        raise PruningError(f"--calibration {CONLL_PREFIX}DIR calibrates a token classifier on labelled sentences; this model is a {loaded.kind}")
    folder = settings.conll_folder()
    try:
        train = read_conll(conll_split_path(folder, "train"))
        test_path = conll_split_path(folder, "test")
        test = read_conll(test_path) if test_path is not None and settings.eval_data is not None else None
    except NerDataError as error:
        raise PruningError(str(error)) from None
    batches = sentence_batches(loaded.tokenizer, train, settings.nsamples, seed=settings.seed, batch_size=settings.batch_size)
    if test is not None:
        unknown = {tag for sentence in test for tag in sentence.tags} - set(loaded.model.config.id2label.values())
        if unknown:
            raise PruningError(f"the model's labels ({', '.join(loaded.model.config.id2label.values())}) lack tags of {test_path}: "
                               f"{', '.join(sorted(unknown))}; is it a token classifier for this data?")
    return batches, test


def entity_scores(model: nn.Module, tokenizer, sentences: list[Sentence], device: torch.device) -> dict:
    labels = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    scores = evaluate_ner(model, tokenizer, sentences, labels, device)
    return {"f1": scores.f1, "precision": scores.precision, "recall": scores.recall}


def evaluate(model: nn.Module, ids: torch.Tensor, settings: PruneSettings, device: torch.device, label: str) -> dict:
    windows = evaluation_windows(ids, settings.eval_seqlen or settings.seqlen, settings.eval_windows)
    home = next(model.parameters()).device
    model.to(device)
    try:
        return perplexity(model, windows, device, batch_size=settings.eval_batch_size, progress=settings.progress, label=label).as_dict()
    finally:
        model.to(home)


def run_pipeline(loaded: LoadedModel, settings: PruneSettings, load_seconds: float = 0.0, calibration_batches: list[dict] | None = None) -> Report:
    """Prune `loaded.model` in place as `settings` say; evaluate it before and after when asked.

    `calibration_batches` (dicts of model inputs, e.g. padded sentences with their `attention_mask`) replace the
    windows of `settings.calibration`; padded positions are left out of every statistic.
    """
    settings.check()
    target = settings.target()
    method = settings.resolved_method()
    device = resolve_device(settings.device)
    model = loaded.model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    blocks_name, blocks = transformer_blocks(model)
    selected = parse_blocks(settings.blocks, len(blocks))
    incompatible = incompatible_layers(blocks, blocks_name, target, selected)
    if incompatible and not settings.skip_incompatible:
        raise PruningError(
            f"{len(incompatible)} layer(s) cannot hold pattern {target.pattern}: {incompatible[0]} has "
            f"{input_features(model.get_submodule(incompatible[0]))} inputs, not a multiple of {target.m} "
            "(--skip-incompatible leaves such layers dense)"
        )
    limit = max_positions(model)
    if settings.recover is not None and loaded.kind != CAUSAL_LM:
        raise PruningError(
            f"--recover trains a causal LM on the calibration text; this model is a {loaded.kind}, which needs labelled "
            "task data: call prune.recover.recover() with its own batches"
        )
    if settings.refine is not None and loaded.kind != CAUSAL_LM:
        raise PruningError(
            f"--refine measures the language-modelling loss on the calibration text; this model is a {loaded.kind}: "
            "call prune.refine.refine() with a loss of its own task"
        )
    recover_seqlen = settings.recover.seqlen if settings.recover is not None else None
    refine_seqlen = settings.refine.seqlen if settings.refine is not None else None
    if calibration_batches is not None:
        calibration_seqlen = max((batch["input_ids"].shape[1] for batch in calibration_batches), default=None)
    else:
        calibration_seqlen = settings.seqlen if settings.conll_folder() is None else None  # sentences are cut at the tokenizer's limit
    for label, length in (("seqlen", calibration_seqlen), ("eval-seqlen", settings.eval_seqlen), ("recover-seqlen", recover_seqlen),
                          ("refine-seqlen", refine_seqlen)):
        if limit is not None and length is not None and length > limit:
            raise PruningError(f"--{label} {length} is longer than the model's {limit} positions")

    evaluate_perplexity = settings.eval_data is not None and loaded.kind == CAUSAL_LM
    needs_calibration = method.statistics is not None or settings.allocation == "owl"
    report = Report(
        method=method.name,
        target={"sparsity": target.sparsity, "pattern": target.pattern},
        model={"name": loaded.name, "source": loaded.source, "kind": loaded.kind, "blocks": f"{blocks_name} ({len(blocks)})"},
        calibration={
            "source": settings.calibration if calibration_batches is None else "given batches",
            "nsamples": settings.nsamples if calibration_batches is None else sum(len(batch["input_ids"]) for batch in calibration_batches),
            "seqlen": settings.seqlen if calibration_batches is None else None,
            "seed": settings.seed,
            "used": needs_calibration,
        },
        device=str(device),
        options={**settings.method_options, "propagate": settings.propagate, "hessian_dtype": settings.hessian_dtype},
    )
    report.seconds["load"] = load_seconds
    if not needs_calibration:
        report.notes.append(f"{method.name} uses no calibration data")
    work = estimated_work([blocks[index] for index in selected], method, target)
    if work is not None and work > LARGE_WORK_FLOP:
        message = f"{method.name} will do about {work / 1e12:.1f} TFLOP of work (2 x rows x k x d² per layer); on a CPU this takes a long time"
        report.notes.append(message)
        if settings.progress:
            tqdm.write(message)
    if incompatible:
        report.notes.append(f"{len(incompatible)} layer(s) left dense: input size not a multiple of M={target.m}")
    if len(selected) < len(blocks):
        report.notes.append(f"only blocks {settings.blocks} pruned ({len(selected)} of {len(blocks)}); the others stay dense")
    if settings.eval_data is not None and not evaluate_perplexity and settings.conll_folder() is None:
        report.notes.append(f"perplexity skipped: it needs a causal LM, and this model is a {loaded.kind}")

    ner_test = None
    if calibration_batches is None and settings.conll_folder() is not None:
        sentences, ner_test = conll_calibration(loaded, settings)
        calibration_batches = sentences if needs_calibration else None
    if calibration_batches is not None and not calibration_batches:
        raise PruningError("no calibration batches were given")
    needs_text = (needs_calibration and calibration_batches is None) or settings.recover is not None or settings.refine is not None
    sources = TextSources(
        loaded.tokenizer,
        calibration=settings.calibration if needs_text else None,
        evaluation=settings.eval_data if evaluate_perplexity else None,
    )
    started = time.perf_counter()
    evaluation_ids = sources.evaluation_ids() if evaluate_perplexity else None
    calibration_ids = sources.calibration_ids() if needs_text else None
    report.seconds["data"] = time.perf_counter() - started

    if evaluate_perplexity:
        started = time.perf_counter()
        report.perplexity = {"data": settings.eval_data, "dense": evaluate(model, evaluation_ids, settings, device, "dense perplexity")}
        report.seconds["evaluate"] = time.perf_counter() - started

    if ner_test is not None:
        started = time.perf_counter()
        report.entity_f1 = {"data": str(settings.conll_folder()), "sentences": len(ner_test),
                            "dense": entity_scores(model, loaded.tokenizer, ner_test, device)}
        report.seconds["evaluate"] = report.seconds.get("evaluate", 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    calls = None
    if needs_calibration:
        if calibration_batches is not None:
            batches = calibration_batches
        else:
            windows = sample_windows(calibration_ids, settings.nsamples, settings.seqlen, settings.seed)
            batches = window_batches(windows, settings.batch_size)
        calls = capture_block_inputs(model, blocks[0], batches, device)
    targets: list[Target | None] = [target if index in selected else None for index in range(len(blocks))]
    if settings.allocation == "owl":
        ratios, parameters = outlier_ratios(blocks, selected, calls, settings.owl_m, device, settings.progress)
        # the OWL pass consumed the captured inputs; capturing again costs only the embeddings, and keeps one buffer
        calls = capture_block_inputs(model, blocks[0], batches, device)
        sparsities = owl.allocate(settings.owl_rule, ratios, parameters, target.sparsity, settings.owl_lambda)
        for index, sparsity in zip(selected, sparsities, strict=True):
            targets[index] = Target(sparsity)
        report.allocation = {
            "rule": settings.owl_rule,
            "owl_m": settings.owl_m,
            "owl_lambda": settings.owl_lambda if settings.owl_rule == owl.LAMBDA_RULE else None,
            "blocks": [
                {"block": index, "outlier_ratio": ratio, "sparsity": sparsity, "parameters": count}
                for index, ratio, sparsity, count in zip(selected, ratios, sparsities, parameters, strict=True)
            ],
        }
    report.seconds["calibrate"] = time.perf_counter() - started

    # the refinement needs the dense weights under the masks it tries (one copy of the prunable weights, on the CPU)
    dense_weights = dense_snapshot(blocks, blocks_name, selected, set(incompatible)) if settings.refine is not None else None
    started = time.perf_counter()
    method_calls = calls if method.statistics is not None else None
    del calls
    report.layers, report.prune_breakdown = prune_blocks(blocks, blocks_name, method_calls, method, targets, settings, device, set(incompatible))
    del method_calls
    report.seconds["prune"] = time.perf_counter() - started

    def measure_perplexity(label: str) -> float:
        """Evaluate the model as it is now, record it as perplexity[label], and return the value."""
        started = time.perf_counter()
        report.perplexity[label] = evaluate(model, evaluation_ids, settings, device, f"{label} perplexity")
        report.seconds["evaluate"] += time.perf_counter() - started
        return report.perplexity[label]["value"]

    if evaluate_perplexity:
        measure_perplexity("pruned")
    if ner_test is not None:
        started = time.perf_counter()
        report.entity_f1["pruned"] = entity_scores(model, loaded.tokenizer, ner_test, device)
        report.seconds["evaluate"] = report.seconds.get("evaluate", 0.0) + time.perf_counter() - started

    if settings.refine is not None:
        started = time.perf_counter()
        refined = {layer.name: model.get_submodule(layer.name) for layer in report.layers if layer.loss is not None}
        initial = put_weights_under_mask(refined, dense_weights, settings.refine.weights)
        del dense_weights
        windows = sample_windows(calibration_ids, settings.refine.windows + settings.refine.holdout, settings.refine.seqlen, settings.seed + 1)
        result = refine(model, refined, initial, target, windows[: settings.refine.windows], windows[settings.refine.windows :], settings.refine, device)
        del initial
        report.seconds["refine"] = time.perf_counter() - started
        if evaluate_perplexity:
            result.perplexity_before = report.perplexity["pruned"]["value"]
            result.perplexity_after = measure_perplexity("refined")
        report.refine = result.as_dict()
        check_refined_layers(report, model, target)

    if settings.recover is not None:
        started = time.perf_counter()
        batches = language_model_batches(calibration_ids, settings.recover.seqlen, settings.recover.batch, settings.recover.seed)
        result = recover(model, batches, settings.recover, device)
        report.seconds["recover"] = time.perf_counter() - started
        if evaluate_perplexity:
            result.perplexity_before = report.perplexity["refined" if settings.refine is not None else "pruned"]["value"]
            result.perplexity_after = measure_perplexity("recovered")
        report.recover = result.as_dict()
        if not result.zeros_kept:
            raise PruningError("internal error: pruned weights moved during recovery")
    report.seconds["total"] = sum(report.seconds.values())
    report.finish()
    return report


def prune_model(
    model: str | LoadedModel = "smollm2-135m",
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str | None = None,
    calibration: str = "wiki-sample",
    cache_dir: Path | None = None,
    calibration_batches: list[dict] | None = None,
    **settings,
) -> tuple[nn.Module, Report]:
    """Prune a model one-shot and return it with its report.

    `model` is an embedded name ('smollm2-135m', 'minilm-l6'), a local folder, a hub name, or a
    LoadedModel. Other keywords are the fields of PruneSettings (nsamples, seqlen, seed, device,
    method_options, eval_data, ...). `calibration_batches` replace the calibration text (see run_pipeline).
    """
    options = PruneSettings(method=method, sparsity=sparsity, pattern=pattern, calibration=calibration, **settings)
    options.check()
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, cache_dir=cache_dir)
    report = run_pipeline(loaded, options, load_seconds=time.perf_counter() - started, calibration_batches=calibration_batches)
    return loaded.model, report
