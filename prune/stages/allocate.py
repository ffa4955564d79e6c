"""The allocate stage: OWL layerwise sparsity. On the dense model, each selected block's outlier ratio D (the share of
its Wanda scores |W|·‖X‖ above M x their mean) sets its sparsity, so that blocks with more outliers keep more weights
and the parameter-weighted mean sparsity is the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from calibration.capture import LayerInputStatistics, run_calls
from methods import PruningError, Target, owl
from prune.models import layer_weight, prunable_layers
from prune.plots import plot_allocation
from prune.report import Section
from prune.run import Run, Stage
from prune.settings import StageSettings, about, check_fields, option

ALLOCATIONS = ("uniform", "owl")


@dataclass
class AllocationSettings(StageSettings):
    """How the target sparsity spreads over the blocks."""

    allocation: str = option("uniform", "--allocation", "Spread the sparsity uniformly, or by OWL outlier ratios (unstructured targets only).",
                             choices=ALLOCATIONS)
    owl_rule: str = option(owl.LAMBDA_RULE, "--owl-rule", "lambda: the OWL paper's code (ratios scaled to [0, 2λ], centred on their mean, "
                           "not clipped); lambda-clipped: the same clipped to S ± λ and re-centred; proportional: block sparsity ∝ 1 − D (the pruning deep-dive's rule).",
                           choices=owl.RULES, renamed={"seed": owl.PROPORTIONAL_RULE})
    owl_m: float = option(owl.DEFAULT_M, "--owl-m", "OWL outlier threshold M: a score is an outlier above M x the block's mean.", positive=True)
    owl_lambda: float = option(owl.DEFAULT_LAMBDA, "--owl-lambda", "OWL λ: the ratios span 2λ of sparsity (lambda rules; clipped to S ± λ by "
                               "lambda-clipped).")

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)
        if self.allocation != "owl" or target is None:
            return
        if target.is_nm:
            raise PruningError(f"--allocation owl allocates unstructured sparsity per block; it does not apply to pattern {target.pattern}")
        if self.owl_rule in (owl.LAMBDA_RULE, owl.CLIPPED_RULE):
            with about("--owl-lambda"):
                owl.check_lambda(target.sparsity, self.owl_lambda)


def allocation_lines(allocation: dict) -> list[str]:
    lines = [f"OWL allocation ({allocation['rule']} rule, M = {allocation['owl_m']:g}): block, outlier ratio, sparsity"]
    lines.extend(f"  {entry['block']:>3}  {entry['outlier_ratio']:.4f}  {entry['sparsity']:.4f}" for entry in allocation["blocks"])
    return lines


class Allocate(Stage):
    key, settings_class = "allocate", AllocationSettings
    name = "allocate"
    sections = ("allocation",)
    needs_block_inputs = True

    @classmethod
    def wanted(cls, settings: AllocationSettings) -> bool:
        return settings.allocation == "owl"

    def execute(self, run: Run) -> None:
        plan, settings = run.plan, self.settings
        saved = run.resume.report.get("allocation") if run.resume is not None else None
        if saved is not None:  # a resumed run: the earlier part measured the dense model's outliers
            self.report(run, saved)
            for entry in saved["blocks"]:
                plan.targets[entry["block"]] = Target(entry["sparsity"])
            return
        ratios, parameters = self.outlier_ratios(run)
        run.calls = run.capture()  # the pass above consumed the captured inputs; capturing again costs only the embeddings
        sparsities = owl.allocate(settings.owl_rule, ratios, parameters, self.target.sparsity, settings.owl_lambda)
        for index, sparsity in zip(plan.selected, sparsities, strict=True):
            plan.targets[index] = Target(sparsity)
        allocation = self.report(run, {
            "rule": settings.owl_rule,
            "owl_m": settings.owl_m,
            "owl_lambda": settings.owl_lambda if settings.owl_rule != owl.PROPORTIONAL_RULE else None,
            "blocks": [
                {"block": index, "outlier_ratio": ratio, "sparsity": sparsity, "parameters": count}
                for index, ratio, sparsity, count in zip(plan.selected, ratios, sparsities, parameters, strict=True)
            ],
        })
        if run.resume is not None:
            run.resume.report["allocation"] = allocation
            run.resume.save()

    def report(self, run: Run, allocation: dict) -> dict:
        """Write the allocation's section: its per-block table in the verbose report, allocation.png in the output."""
        sparsity = self.target.sparsity
        return run.report.put("allocation", Section(allocation, details=allocation_lines,
                                                    draw=lambda figures, folder: plot_allocation(figures, sparsity, folder / "allocation.png")))

    def outlier_ratios(self, run: Run) -> tuple[list[float], list[int]]:
        """For each selected block of the dense model, D and its number of prunable weights. Consumes `run.calls`."""
        plan, selected = run.plan, run.plan.selected
        ratios, parameters = [], []
        for index in tqdm(range(max(selected) + 1), desc="OWL outlier ratios", unit="block", disable=not run.settings.progress, leave=False):
            layers = prunable_layers(plan.blocks[index]) if index in selected else {}
            with run.block(index) as block, LayerInputStatistics(layers, owl.STATISTIC, run.device) as statistics:
                run_calls(block, run.calls, statistics, advance=index < max(selected))
                statistics.merge(run.ranks.sum_)  # every rank's calls: the outliers of all calibration windows
                if index in selected:  # while the block's weights are there (streamed, they are dropped afterwards)
                    called = [name for name in layers if statistics.statistics(name) is not None]
                    ratios.append(owl.block_outlier_ratio([layer_weight(layers[name]) for name in called],
                                                          [statistics.statistics(name) for name in called], self.settings.owl_m))
                    parameters.append(sum(layer_weight(layer).numel() for layer in layers.values()))
        return ratios, parameters
