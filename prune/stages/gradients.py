"""The one-shot stage of a method whose statistic comes from per-sample gradients of the task loss (oBERT): every pruned
layer at once, over the whole model, instead of block by block. It shares the one-shot stage's settings, plan and
report, and is chosen instead of it by the method's statistic."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.gradients import per_sample_gradients
from eval.sparsity import nm_valid, zero_fraction
from methods import PruningError, Target, get_method
from methods.base import masks_lowest_across
from methods.schedules import cubic_sparsity
from prune.devices import available_memory, on_device, timed
from prune.models import all_prunable_layers, layer_gradient, layer_weight, set_layer_weight
from prune.plan import skipped_layer
from prune.report import LayerReport
from prune.run import Run
from prune.stages.oneshot import OneShot
from prune.stages.oneshot_settings import OneShotSettings, method_flag


class GradientPrune(OneShot):
    """Prune from task-loss gradients: the memory the statistics take is checked before any work, then each pruning
    epoch builds every layer's statistic from one backward pass per sample and prunes them all."""

    @classmethod
    def wanted(cls, settings: OneShotSettings) -> bool:
        return get_method(settings.method).gradients is not None

    def prepare(self, run: Run) -> None:
        super().prepare(run)
        self.check_gradient_memory(run)

    def execute(self, run: Run) -> None:
        run.report.prune_breakdown = {"statistics": 0.0, "method": 0.0, "propagate": 0.0}
        run.report.layers = self.prune_by_gradients(run)

    def check_gradient_memory(self, run: Run) -> None:
        """A statistic built from gradients is held for every pruned layer at once: say how much memory it takes, and
        refuse before any work when the device cannot hold it beside the model."""
        gradients = self.method.gradients
        if self.options[gradients.ranking_option] and run.settings.allocate.allocation != "uniform":
            raise PruningError(f"{method_flag(gradients.ranking_option)} ranks all layers' weights together: it cannot also follow "
                               f"--allocation {run.settings.allocate.allocation}'s per-block sparsities")
        if self.options[gradients.ranking_option] and run.plan.overrides:
            raise PruningError(f"{method_flag(gradients.ranking_option)} ranks all layers' weights together: it cannot also follow "
                               "--sparsity-override's per-layer sparsities")
        weights = sum(layer_weight(layer).numel() for layer in run.plan.pruned_layers().values())
        needed = sum(gradients.memory_bytes(layer_weight(layer).numel(), self.options, self.hessian_dtype) for layer in run.plan.pruned_layers().values())
        needed += gradients.batch * weights * 4  # the gathered float32 gradients
        message = (f"{self.method.name}'s statistics of the {len(run.plan.pruned_layers())} pruned layers take {needed / 2**30:.2f} GiB "
                   f"({needed / max(weights, 1):.0f} bytes per pruned weight)")
        available = available_memory(run.device)
        if available is not None and needed > available:
            hint = ", or --hessian-dtype float32" if self.hessian_dtype == torch.float64 else ""
            raise PruningError(f"{message}, but only {available / 2**30:.2f} GiB are free on {run.device}: prune fewer --blocks or use "
                               f"smaller blocks of the method{hint}")
        run.note(message)

    def prune_by_gradients(self, run: Run) -> list[LayerReport]:
        """Every pruned layer at once, from statistics built on per-sample gradients of the task loss of the whole
        model: for each pruning epoch, the statistics of all layers are built from one backward pass per sample, then
        each layer is pruned to that epoch's sparsity (rising on the cubic schedule to the target over the epochs;
        ranked within each layer, or across all of them), its remaining weights updated by the method."""
        gradients, plan, device, breakdown = self.method.gradients, run.plan, run.device, run.report.prune_breakdown
        layers = plan.pruned_layers()
        epochs, ranked_globally = int(self.options[gradients.epochs_option]), bool(self.options[gradients.ranking_option])
        targets = {name: plan.target_of(name) for name in layers}
        losses, seconds = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0.0)
        with on_device(run.model, device, run.compute_dtype):
            for epoch in range(1, epochs + 1):
                with timed(breakdown, "statistics", device):
                    statistics = self.gradient_statistics(run, layers, f"epoch {epoch}/{epochs}")
                scheduled = {name: target if target.is_nm else Target(cubic_sparsity(epoch, epochs, target.sparsity)) for name, target in targets.items()}
                masks: dict = {}
                if ranked_globally:
                    masks = masks_lowest_across({name: gradients.saliency(layer_weight(layer), statistics[name]) for name, layer in layers.items()},
                                                next(iter(scheduled.values())).sparsity)
                for name, layer in layers.items():
                    layer_seconds: dict = {}
                    with timed(layer_seconds, "method", device):
                        result, = self.method.run_together([layer_weight(layer)], statistics.pop(name), scheduled[name], {"mask": masks.get(name)})
                        set_layer_weight(layer, result.weight.to(layer_weight(layer).dtype))
                    seconds[name] += layer_seconds["method"]
                    breakdown["method"] += layer_seconds["method"]
                    losses[name] += result.loss
        reports = []
        for name, layer in all_prunable_layers(run.model).items():
            if name not in layers:
                reports.append(skipped_layer(name, layer, plan.skipped.get(name, "block not selected; left dense")))
                continue
            pruned, target = layer_weight(layer), targets[name]
            valid = nm_valid(pruned, target.n, target.m) if target.is_nm else None
            notes = [f"{epochs} pruning epochs" if epochs > 1 else "one pruning epoch"] + (["ranked across layers"] if ranked_globally else [])
            reports.append(LayerReport(name=name, shape=tuple(pruned.shape), sparsity=zero_fraction(pruned), pattern_valid=valid, loss=losses[name],
                                       seconds=seconds[name], notes=notes))
        return reports

    def gradient_statistics(self, run: Run, layers: dict[str, nn.Module], label: str) -> dict:
        """Each layer's statistic from one backward pass per gradient sample, its gradients handed to the method
        `batch` at a time."""
        gradients, count = self.method.gradients, len(run.gradient_samples)
        statistics = {name: gradients.start(layer_weight(layer), self.options, self.hessian_dtype) for name, layer in layers.items()}
        gathered: dict[str, list] = {name: [] for name in layers}
        samples = tqdm(run.gradient_samples, desc=f"{self.method.name} gradients, {label}", unit="sample", disable=not run.settings.progress)
        for index, _ in enumerate(per_sample_gradients(run.model, {name: layer.weight for name, layer in layers.items()}, samples, run.device)):
            for name, layer in layers.items():
                gathered[name].append(layer_gradient(layer).reshape(-1))
                if len(gathered[name]) == gradients.batch or index + 1 == count:
                    gradients.add(statistics[name], torch.stack(gathered[name]), count)
                    gathered[name].clear()
        return statistics
