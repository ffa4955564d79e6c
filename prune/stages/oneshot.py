"""The one-shot stage: block by block, the calibration inputs run through the block into the statistic its method
needs, every prunable layer is pruned by the method, and the block's outputs (pruned, or dense when asked) become
the next block's inputs. The stage knows methods only through their `Method` record."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import LayerInputStatistics, input_groups, run_calls, run_in_lockstep
from eval.sparsity import nm_valid, zero_fraction
from methods import DEFAULT_METHOD, METHODS, Method, PruningError, Target, get_method
from methods.base import HESSIAN
from methods.gptq import quantized
from methods.quantize import DEFAULT_ACT_ORDER, DEFAULT_GROUP_SIZE, DEFAULT_SEARCH_SCALES, QuantGrid
from methods.statistics import ACCUMULATORS
from prune.compressed import keep_scales, kept_scales
from prune.devices import synchronize, timed
from prune.distributed import Ranks
from prune.models import (
    input_features,
    layer_weight,
    prunable_layers,
    set_layer_weight,
)
from prune.plan import LayerRules, layer_pattern, layer_plan, parsed_override
from prune.report import LayerReport, Section
from prune.run import Run, Stage
from prune.settings import StageSettings, about, check_fields, flag_of, negated, option

PROPAGATE_CHOICES = ("pruned", "dense")
ORDERS = ("one-pass", "two-pass")
QUANTIZE_CHOICES = {"int4": 4, "int8": 8}  # weights only: activations stay in the model's dtype (W4A16, W8A16)
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
LARGE_WORK_FLOP = 2e13  # above this much estimated work (minutes on a CPU), say so before starting


def method_flag(name: str) -> str:
    """The command-line flag of a method option."""
    return "--" + name.replace("_", "-")


def as_tuple(value) -> tuple[str, ...]:
    """A repeatable option's value as given to the Python API (one string, a sequence, or for overrides a map
    regex -> sparsity) as the command's tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):
        return tuple(f"{pattern}={sparsity}" for pattern, sparsity in value.items())
    return tuple(str(item) for item in value)


@dataclass
class OneShotSettings(StageSettings):
    """What each layer becomes and how."""

    method: str = option(DEFAULT_METHOD, "--method", "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items()),
                         choices=tuple(sorted(METHODS)))
    sparsity: float | None = option(None, "--sparsity", "Fraction of zeros per layer.", type=float)
    pattern: str | None = option(None, "--pattern", "Keep N of every M consecutive input weights of a row (2:4, 4:8).", type=str, metavar="N:M")
    method_options: dict = field(default_factory=dict)  # the method's options (their flags come from methods' own declarations)
    propagate: str = option("pruned", "--propagate", "Feed the next block the pruned block's outputs, or the dense block's.",
                            choices=PROPAGATE_CHOICES)
    hessian_dtype: str = option("float32", "--hessian-dtype", "Precision of the Hessian accumulation.", choices=tuple(HESSIAN_DTYPES))
    blocks: str | None = option(None, "--blocks", "Prune only these transformer blocks (the others stay dense). Default: all.", type=str,
                                metavar="0-9,12")
    skip_incompatible: bool = option(False, "--skip-incompatible", "Leave dense the layers whose input size is not a multiple of M, "
                                     "instead of refusing.")
    targets: tuple[str, ...] = option((), "--targets", "Prune only the layers whose full name (model.layers.3.mlp.down_proj) a regular "
                                      "expression matches (searched; repeatable; a leading 're:' as in llm-compressor recipes is allowed). "
                                      "Default: every Linear/Conv1D of the transformer blocks.", multiple=True, metavar="REGEX")
    ignore: tuple[str, ...] = option((), "--ignore", "Leave dense the layers whose full name a regular expression matches (repeatable; "
                                     "reported as ignored).", multiple=True, metavar="REGEX")
    sparsity_override: tuple[str, ...] = option((), "--sparsity-override", "REGEX=SPARSITY: prune the layers whose name matches to SPARSITY "
                                                "instead of their block's sparsity (uniform, or OWL's); the first matching override wins "
                                                "(repeatable; in a recipe, a map from regex to sparsity). Unstructured targets only.",
                                                multiple=True, metavar="REGEX=S")
    order: str = option("one-pass", "--order", "one-pass: each layer's statistics are collected on the inputs it sees once the layers before it "
                        "in its block are pruned, in one forward pass per block that also gives the next block's inputs (more memory: every "
                        "calibration batch's state inside the block); two-pass: statistics on the dense block, then a second pass through "
                        "the pruned block.", choices=ORDERS)
    quantize: str | None = option(None, "--quantize", "Also round the kept weights to symmetric integers (weights only: W4A16, W8A16) by the "
                                  "OBS rule (GPTQ): in SparseGPT's own sweep with --method sparsegpt (joint), after the mask for the other "
                                  "methods; with --sparsity 0, plain GPTQ.", choices=tuple(QUANTIZE_CHOICES))
    group_size: int = option(DEFAULT_GROUP_SIZE, "--group-size", "Inputs sharing one scale per output row with --quantize (0: one scale "
                             "per output channel).", minimum=0)
    act_order: bool = option(DEFAULT_ACT_ORDER, "--act-order", "With --quantize, round the columns in decreasing order of the layer Hessian's "
                             "diagonal (GPTQ's activation order), each group's scale fixed beforehand from its own columns (static "
                             "groups: the checkpoint needs no permutation); N:M groups move whole.")
    search_scales: bool = option(DEFAULT_SEARCH_SCALES, "--search-scales", "With --quantize, give each group the scale (of 80 candidates from max|w| down "
                                 "to 0.21 max|w|, as GPTQ's reference quantizer) that rounds it with the least error, instead of max|w|'s.")

    def __post_init__(self) -> None:
        self.targets, self.ignore, self.sparsity_override = map(as_tuple, (self.targets, self.ignore, self.sparsity_override))

    def layer_rules(self) -> LayerRules:
        """The --targets / --ignore / --sparsity-override rules, compiled (refused when malformed)."""
        overrides = tuple((pattern, layer_pattern(pattern, "--sparsity-override"), sparsity) for pattern, sparsity in map(parsed_override, self.sparsity_override))
        return LayerRules(tuple((text, layer_pattern(text, "--targets")) for text in self.targets),
                          tuple((text, layer_pattern(text, "--ignore")) for text in self.ignore), overrides)

    def target(self) -> Target:
        flags = [flag for flag, value in (("--sparsity", self.sparsity), ("--pattern", self.pattern)) if value is not None]
        with about(*flags or ["--sparsity", "--pattern"]):
            return Target.from_options(self.sparsity, self.pattern)

    def grid(self, scale_dtype: torch.dtype = torch.float32) -> QuantGrid | None:
        """The grid --quantize rounds to (None without it), its scales stored in `scale_dtype`."""
        if self.quantize is None:
            return None
        with about("--quantize", "--group-size"):
            return QuantGrid(QUANTIZE_CHOICES[self.quantize], self.group_size or None, scale_dtype, self.act_order, self.search_scales)

    def whole_model_reason(self, run: Any) -> str | None:
        if get_method(self.method).gradients is not None:
            return f"--method {self.method} (its gradients of the task loss)"
        return None

    def check(self, target: Target | None = None, run: Any = None) -> None:
        """Check every one-shot option against the target (which --sparsity / --pattern give, see `target`)."""
        check_fields(self)
        ranks = Ranks.current()
        if ranks.several and not get_method(self.method).statistic_merges:
            raise PruningError(f"--method {self.method} does not run on several ranks yet ({ranks.world} processes here): its statistic "
                               "cannot be combined across processes; run it in one process")
        for name in ("group_size", "act_order", "search_scales") if self.quantize is None else ():
            value, default = getattr(self, name), getattr(OneShotSettings, name)
            if value != default:
                given = negated(flag_of(self, name)) if value is False else flag_of(self, name)
                raise PruningError(f"{given} applies to --quantize")
        if self.quantize is not None and get_method(self.method).gradients is not None:
            calibrated = ", ".join(name for name, method in METHODS.items() if method.gradients is None)
            raise PruningError(f"--quantize needs the layer Hessian: --method {self.method} prunes from task-loss gradients; use a "
                               f"calibration method ({calibrated})")
        self.grid()
        if self.propagate == "dense" and self.order == "one-pass":
            raise PruningError("--propagate dense feeds the next block the dense block's outputs, which a one-pass block never computes: "
                               "use --order two-pass")
        target = target or self.target()
        if self.layer_rules().overrides and target.is_nm:
            raise PruningError(f"--sparsity-override gives layers unstructured sparsities: it cannot be combined with --pattern {target.pattern}")
        method = get_method(self.method)
        unsupported = sorted(set(self.method_options) - {option.name for option in method.options})
        if unsupported:
            raise PruningError(f"{', '.join(map(method_flag, unsupported))} does not apply to method {method.name}")
        with about(*map(method_flag, self.method_options or [option.name for option in method.options])):
            method.check_options(target, self.method_options)


def quantization_lines(grid: dict) -> list[str]:
    return [f"quantized to int{grid['bits']} " + (f"g{grid['group_size']}" if grid["group_size"] else "per channel") + " (symmetric, "
            + ("in the pruning sweep" if grid["in_sweep"] else "GPTQ after the mask")
            + (", activation order" if grid.get("act_order") else "") + (", searched scales" if grid.get("search_scales") else "") + ")"]


def refuse_after_quantization(flag: str, run: Any) -> None:
    """Refuse a stage that trains the weights after --quantize put them on its grid."""
    if run is not None and run.oneshot.quantize is not None:
        raise PruningError(f"--quantize rounds the weights in the one-shot sweep; {flag} trains them afterwards, off the grid: run it "
                           "without --quantize")


def skipped_layer(name: str, layer: nn.Module, reason: str) -> LayerReport:
    weight = layer_weight(layer)
    return LayerReport(name, tuple(weight.shape), zero_fraction(weight), None, None, 0.0, [reason])


class OneShot(Stage):
    key, settings_class = "oneshot", OneShotSettings
    name = "prune"
    sections = ("quantization",)
    label = "pruned"

    @classmethod
    def wanted(cls, settings: OneShotSettings) -> bool:
        """Methods whose statistic comes from the calibration inputs, block by block (see GradientPrune for the others)."""
        return get_method(settings.method).gradients is None

    def __init__(self, settings: OneShotSettings, target: Target) -> None:
        super().__init__(settings, target)
        self.method: Method = get_method(settings.method)
        self.options = self.method.resolved_options(settings.method_options)
        self.hessian_dtype = HESSIAN_DTYPES[settings.hessian_dtype]
        gradients = self.method.gradients
        self.statistic = HESSIAN if settings.quantize is not None else self.method.statistic  # what the blocks' inputs are made into
        self.needs_block_inputs = self.statistic is not None and gradients is None
        self.gradient_samples = None if gradients is None else (method_flag(gradients.count_option), int(self.options[gradients.count_option]))
        self.groups: dict[str, list[str]] | None = None  # one-pass: the layers fed each input, found on the first block
        self.groups_pruned = 0  # groups of layers pruned so far (with several ranks, group i is pruned by rank i % ranks)
        self.groups_by_rank: dict[int, int] = {}

    def prepare(self, run: Run) -> None:
        settings, target, report = self.settings, self.target, run.report
        run.plan = layer_plan(run.model, target, settings.layer_rules(), settings.blocks, settings.skip_incompatible)
        blocks_name, blocks, skipped, incompatible = run.plan.blocks_name, run.plan.blocks, run.plan.skipped, run.plan.incompatible
        overrides, selected = run.plan.overrides, run.plan.selected
        by_rules = len(skipped) - len(incompatible)
        if by_rules:
            run.note(f"{by_rules} layer(s) left dense by --targets / --ignore")
        if overrides:
            run.note(f"{len(overrides)} layer(s) pruned to their --sparsity-override instead of their block's sparsity")
        grid = settings.grid(run.dtype)  # the method is wrapped to round to it once the model's dtype is known
        if grid is not None:
            for name, layer in run.plan.pruned_layers().items():
                with about("--group-size"):
                    grid.check_layer(name, input_features(layer))
            if run.settings.output is not None and run.settings.compressed():
                transposed = next((name for name, layer in run.plan.pruned_layers().items() if not isinstance(layer, nn.Linear)), None)
                if transposed is not None:
                    raise PruningError(f"--save-format compressed packs nn.Linear layers; {transposed} is a {type(run.model.get_submodule(transposed)).__name__} "
                                       "(GPT-2's transposed layer), which compressed-tensors does not load: use --save-format dense")
            report.put("quantization", Section({"bits": grid.bits, "group_size": grid.group_size, "symmetric": True, "in_sweep": self.method.quantizes,
                                                "act_order": grid.act_order, "search_scales": grid.search_scales}, lines=quantization_lines))
            self.method = quantized(self.method, grid)  # from here on the method also rounds what it keeps
        report.method = self.method.name
        report.target = {"sparsity": target.sparsity, "pattern": target.pattern}
        report.model["blocks"] = f"{blocks_name} ({len(blocks)})"
        report.options = {**self.options, "order": settings.order, "propagate": settings.propagate, "hessian_dtype": settings.hessian_dtype}
        if self.statistic is None:
            run.note(f"{self.method.name} uses no calibration data")
        if self.method.work is not None:
            work = sum(self.method.work(*layer_weight(layer).shape, run.plan.target_of(name)) for name, layer in run.plan.pruned_layers().items())
            if work > LARGE_WORK_FLOP:
                message = f"{self.method.name} will do about {work / 1e12:.1f} TFLOP of work; on a CPU this takes a long time"
                run.note(message)
                if run.settings.progress:
                    tqdm.write(message)
        if incompatible:
            run.note(f"{len(incompatible)} layer(s) left dense: input size not a multiple of M={target.m}")
        if len(selected) < len(blocks):
            run.note(f"only blocks {settings.blocks} pruned ({len(selected)} of {len(blocks)}); the others stay dense")

    def rank_figures(self, world: int) -> list[dict]:
        return [{"layer_groups_pruned": self.groups_by_rank.get(rank, 0)} for rank in range(world)]

    def execute(self, run: Run) -> None:
        calls, run.calls = (run.calls if self.needs_block_inputs else None), None
        plan = run.plan
        report = run.report
        report.layers, report.prune_breakdown = [], {"statistics": 0.0, "method": 0.0, "propagate": 0.0}
        chosen = [target for target in plan.targets if target is not None]
        description = f"{self.method.name} {chosen[0].describe()}" if len(set(chosen)) == 1 else f"{self.method.name} OWL"
        start = self.resumed(run, calls)
        bar = tqdm(list(enumerate(plan.blocks))[start:], desc=description, unit="block", disable=not run.settings.progress)
        for index, block in bar:
            layers = self.process_block(run, index, block, calls)
            report.layers.extend(layers)
            losses = [layer.loss for layer in layers if layer.loss is not None]
            if losses:
                bar.set_postfix(loss=f"{sum(losses):.3g}")
            if run.resume is not None:  # the block's shard is written: it is finished
                run.resume.finished = index + 1
                run.resume.report.update(layers=[dataclasses.asdict(layer) for layer in report.layers], prune_breakdown=report.prune_breakdown)
                run.resume.save()

    def resumed(self, run: Run, calls: list | None) -> int:
        """With the finished blocks of an earlier part of a resumed run: take their report entries, read them from
        their shards, and run the calibration inputs through them again (through the dense originals with
        `--propagate dense`) so that `calls` are the next block's inputs, as they were. Returns the next block."""
        start = run.resume.finished if run.resume is not None else 0
        if not start:
            return 0
        plan, report = run.plan, run.report
        report.layers = [LayerReport(**{**entry, "shape": tuple(entry["shape"])}) for entry in run.resume.report["layers"]]
        report.prune_breakdown = dict(run.resume.report["prune_breakdown"])
        for index in range(start):
            if plan.targets[index] is not None:
                run.block_sources[index] = run.block_shard(index)
            if calls is not None and index < max(plan.selected):
                with run.block(index, original=self.settings.propagate == "dense") as block, timed(report.prune_breakdown, "propagate", run.device):
                    run_calls(block, calls, advance=True)
        return start

    def process_block(self, run: Run, index: int, block: nn.Module, calls: list | None) -> list[LayerReport]:
        """Prune one block to its target (or leave it dense) and, while later blocks are pruned, turn `calls` into the
        next block's inputs."""
        plan, device, breakdown = run.plan, run.device, run.report.prune_breakdown
        target = plan.targets[index]
        propagate = calls is not None and index < max(plan.selected)
        if target is None:
            with run.block(index) as block:
                reports = [skipped_layer(f"{plan.blocks_name}.{index}.{name}", layer, "block not selected; left dense")
                           for name, layer in prunable_layers(block).items()]
                if propagate:
                    with timed(breakdown, "propagate", device):
                        run_calls(block, calls, advance=True)
            return reports
        with run.block(index, changed=True) as block:
            layers = prunable_layers(block)
            if calls is not None and self.settings.order == "one-pass":
                reports = self.one_pass(run, index, block, layers, calls)
            else:
                reports = self.two_passes(run, index, block, layers, calls, propagate)
        return [reports.get(name) or skipped_layer(f"{plan.blocks_name}.{index}.{name}", layer, "never called during calibration; left dense")
                for name, layer in layers.items()]

    def two_passes(self, run: Run, index: int, block: nn.Module, layers: dict[str, nn.Module], calls: list | None, propagate: bool) -> dict[str, LayerReport]:
        """Statistics of every layer on the dense block's inputs (one pass), every layer pruned, then (a second pass) the
        pruned block's outputs become the next block's inputs (the dense block's with --propagate dense)."""
        device, breakdown, reports = run.device, run.report.prune_breakdown, {}
        if calls is None:  # a method without statistics
            with timed(breakdown, "method", device):
                for name in layers:
                    self.prune_group(run, index, layers, name, [name], None, reports)
            return reports
        advanced = propagate and self.settings.propagate == "dense"  # whether the statistics pass also advances `calls`
        with timed(breakdown, "statistics", device), LayerInputStatistics(layers, self.statistic, device, self.hessian_dtype) as statistics:
            run_calls(block, calls, statistics, advance=advanced)
            statistics.merge(run.ranks.sum_)
        with timed(breakdown, "method", device):
            for leader, members in statistics.groups().items():
                self.prune_group(run, index, layers, leader, members, statistics.statistics(leader), reports)
                for name in members:
                    statistics.done(name)  # this input's last layer is pruned: its statistic is freed before the next sweep
        del statistics
        if propagate and not advanced:
            with timed(breakdown, "propagate", device):
                run_calls(block, calls, advance=True)
        return reports

    def one_pass(self, run: Run, index: int, block: nn.Module, layers: dict[str, nn.Module], calls: list) -> dict[str, LayerReport]:
        """One forward pass through the block, all calls in lock step: each group of layers fed the same input is
        pruned as soon as every call's input to it is accumulated, so later layers' statistics are collected on the
        outputs of the already pruned ones, and the pass ends with the pruned block's outputs in `calls`."""
        device, breakdown, reports = run.device, run.report.prune_breakdown, {}
        if self.groups is None:  # the same for every block (they are alike): found once, on one call
            self.groups = input_groups(block, layers, calls[0])
        method_seconds: dict = {}

        def complete(leader: str, accumulator) -> None:
            accumulator.merge(run.ranks.sum_)  # every rank's calls: the statistic of all calibration windows
            statistic = accumulator.result()
            with timed(method_seconds, "method", device):
                self.prune_group(run, index, layers, leader, self.groups[leader], statistic, reports)

        started = time.perf_counter()
        run_in_lockstep(block, calls, {leader: layers[leader] for leader in self.groups},
                        lambda features: ACCUMULATORS[self.statistic](features, device, self.hessian_dtype), complete)
        synchronize(device)
        breakdown["method"] += method_seconds.get("method", 0.0)
        breakdown["statistics"] += time.perf_counter() - started - method_seconds.get("method", 0.0)
        return reports

    def prune_group(self, run: Run, index: int, layers: dict[str, nn.Module], leader: str, members: list[str], statistic,
                    reports: dict[str, LayerReport]) -> None:
        """Prune the layers fed one input (q/k/v, gate/up) from their one statistic, each to its target in the plan;
        the layers the plan leaves dense stay so. Their reports go into `reports`."""
        plan = run.plan
        full = {name: f"{plan.blocks_name}.{index}.{name}" for name in members}
        by_target: dict[Target, list[str]] = {}
        for name in members:
            if full[name] in plan.skipped:
                reports[name] = skipped_layer(full[name], layers[name], plan.skipped[full[name]])
            else:
                by_target.setdefault(plan.target_of(full[name]), []).append(name)
        for layer_target, pruned in by_target.items():  # layers with a --sparsity-override are pruned apart from the others
            results = self.prune_layers(run, {name: layers[name] for name in pruned}, full, statistic, layer_target)
            for name, report in zip(pruned, results, strict=True):
                report.statistics_from = f"{plan.blocks_name}.{index}.{leader}" if statistic is not None else None
                reports[name] = report

    def prune_layers(self, run: Run, layers: dict[str, nn.Module], full: dict[str, str], statistic, target: Target) -> list[LayerReport]:
        """Prune layers that share one statistic in place (together, when the method can) and describe the results.
        The method computes in float32; its result is written back in the dtype the model is stored in at once, so
        that the next block sees the outputs of the model as it will be saved. Layers pruned together share the
        time, by their number of rows."""
        ranks = run.ranks
        owner = ranks.owner(self.groups_pruned)  # with several ranks, groups are handed out in turn
        self.groups_pruned += 1

        def work() -> tuple[list[LayerReport], list]:
            reports = self.pruned_here(layers, full, statistic, target, run.device, run.dtype)
            return reports, [kept_scales(layer) for layer in layers.values()]

        # every rank gets the owner's pruned weights, their scales when quantized, and their report entries
        reports, scales = ranks.on_owner(owner, work, [layer.weight.data for layer in layers.values()])
        if ranks.several:
            for layer, scale in zip(layers.values(), scales, strict=True):
                if scale is not None:
                    keep_scales(layer, scale)
            self.groups_by_rank[owner] = self.groups_by_rank.get(owner, 0) + 1
        return reports

    def pruned_here(self, layers: dict[str, nn.Module], full: dict[str, str], statistic, target: Target, device: torch.device,
                    stored: torch.dtype) -> list[LayerReport]:
        """Prune the layers in this process (see prune_layers)."""
        synchronize(device)
        started = time.perf_counter()
        weights = [layer_weight(layer) for layer in layers.values()]
        results = self.method.run_together(weights, statistic, target, self.options)
        for layer, result in zip(layers.values(), results, strict=True):
            set_layer_weight(layer, result.weight.to(stored))
            if result.scale is not None:
                keep_scales(layer, result.scale)
        synchronize(device)
        seconds = time.perf_counter() - started
        rows = sum(result.weight.shape[0] for result in results)
        reports = []
        for (name, layer), result in zip(layers.items(), results, strict=True):
            pruned = layer_weight(layer)
            valid = nm_valid(pruned, target.n, target.m) and bool(torch.all(pruned[~result.mask] == 0)) if target.is_nm else None
            notes = self.method.notes(result.details)
            if len(layers) > 1 and self.method.prune_together is not None:
                notes.append("swept together with " + ", ".join(other.rsplit(".", 1)[-1] for other in layers if other != name))
            reports.append(LayerReport(name=full[name], shape=tuple(pruned.shape), sparsity=zero_fraction(pruned), pattern_valid=valid,
                                       loss=result.loss, seconds=seconds * pruned.shape[0] / rows, notes=notes))
        return reports
