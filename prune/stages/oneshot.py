"""The one-shot stage: block by block, the calibration inputs run through the block into the statistic its method
needs, every prunable layer is pruned by the method, and the block's outputs (pruned, or dense when asked) become
the next block's inputs. The stage knows methods only through their `Method` record."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import LayerInputStatistics, input_groups, run_calls, run_in_lockstep
from eval.sparsity import nm_valid, zero_fraction
from methods import Method, Target, get_method
from methods.base import HESSIAN
from methods.gptq import quantized
from methods.statistics import ACCUMULATORS
from prune.compressed import keep_scales, kept_scales
from prune.devices import synchronize, timed
from prune.models import layer_weight, prunable_layers, set_layer_weight
from prune.plan import plan_notes, skipped_layer
from prune.report import LayerReport, Section
from prune.run import Run, Stage
from prune.stages.oneshot_settings import HESSIAN_DTYPES, OneShotSettings, method_flag, quantization_lines

LARGE_WORK_FLOP = 2e13  # above this much estimated work (minutes on a CPU), say so before starting


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
        for note in plan_notes(run.plan, target, settings.blocks):
            run.note(note)
        grid = settings.grid(run.dtype)  # the method is wrapped to round to it once the model's dtype is known
        if grid is not None:
            run.plan.check_grid(grid, packed=run.settings.output is not None and run.settings.compressed())
            report.put("quantization", Section({"bits": grid.bits, "group_size": grid.group_size, "symmetric": True, "in_sweep": self.method.quantizes,
                                                "act_order": grid.act_order, "search_scales": grid.search_scales}, lines=quantization_lines))
            self.method = quantized(self.method, grid)  # from here on the method also rounds what it keeps
        report.method = self.method.name
        report.target = {"sparsity": target.sparsity, "pattern": target.pattern}
        report.model["blocks"] = f"{run.plan.blocks_name} ({len(run.plan.blocks)})"
        report.options = {**self.options, "order": settings.order, "propagate": settings.propagate, "hessian_dtype": settings.hessian_dtype}
        if self.statistic is None:
            run.note(f"{self.method.name} uses no calibration data")
        work = sum(self.method.work(*layer_weight(layer).shape, run.plan.target_of(name)) for name, layer in run.plan.pruned_layers().items()) \
            if self.method.work is not None else 0.0
        if work > LARGE_WORK_FLOP:
            message = f"{self.method.name} will do about {work / 1e12:.1f} TFLOP of work; on a CPU this takes a long time"
            run.note(message)
            if run.settings.progress:
                tqdm.write(message)

    def rank_figures(self, world: int) -> list[dict]:
        return [{"layer_groups_pruned": self.groups_by_rank.get(rank, 0)} for rank in range(world)]

    def execute(self, run: Run) -> None:
        calls, run.calls = (run.calls if self.needs_block_inputs else None), None
        plan, report = run.plan, run.report
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
                run.resume.finished_block(index, report.layers, report.prune_breakdown)

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
