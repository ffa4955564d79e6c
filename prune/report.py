"""What a pruning run did and cost: per-layer figures, stage times, perplexity, memory."""

from __future__ import annotations

import json
import resource
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    sparsity: float  # fraction of zeros after pruning
    pattern_valid: bool | None  # every N:M group holds at most N nonzeros (None for unstructured targets)
    loss: float | None  # the method's own estimate of the output error it caused (None when skipped)
    seconds: float
    notes: list[str] = field(default_factory=list)
    statistics_from: str | None = None  # the layer whose input statistics this layer shares (itself when not shared)


@dataclass
class Report:
    """Each stage of the pipeline fills its own fields."""

    model: dict  # {"name", "source", "kind", "blocks"}
    device: str
    method: str = ""
    target: dict = field(default_factory=dict)  # {"sparsity": s, "pattern": "N:M" or None}
    calibration: dict = field(default_factory=dict)  # {"source", "nsamples", "seqlen", "seed", "used"}
    options: dict = field(default_factory=dict)  # the method's options as run, propagation, Hessian precision
    settings: dict = field(default_factory=dict)  # every option of the run, by the name the command and the API give it
    layers: list[LayerReport] = field(default_factory=list)
    sparsity: float = 0.0  # zeros over all pruned layers
    seconds: dict = field(default_factory=dict)  # load, data, evaluate, calibrate, allocate, prune, refine, recover, total
    prune_breakdown: dict = field(default_factory=dict)  # seconds in statistics passes, method sweeps, propagation passes
    allocation: dict | None = None  # OWL: rule, owl_m, owl_lambda, and per block its outlier ratio, sparsity, parameters
    entity_f1: dict | None = None  # token classifiers calibrated on CoNLL: {"data", "sentences", "dense": {...}, "pruned": {...}}
    perplexity: dict | None = None  # {"dense": {...}, "pruned": {...}, "recovered": {...}} with value, seqlen, windows
    distributed: dict | None = None  # several ranks: {"ranks", "backend", "per_rank": [{"rank", "calibration_windows", "layer_groups_pruned"}]}
    tasks: dict | None = None  # lm-eval: {"tasks", "limit", "path", "unavailable", "dense": {task: {"acc", "acc_norm", ...}}, "pruned": ...}
    refine: dict | None = None  # the MaskPro refinement: steps, residual curve, changed groups, held-out losses, time split
    recover: dict | None = None  # the recovery fine-tune: optimizer, steps, loss curve, seconds, perplexity before/after
    quantization: dict | None = None  # --quantize: {"bits", "group_size", "symmetric", "in_sweep", "act_order", "search_scales"}
    storage: dict | None = None  # the output: {"format", "input_bytes", "output_bytes", "ratio", "quantized_bits_per_weight", "bits_per_weight"}
    peak_memory_mb: float = 0.0  # peak resident memory of the process
    peak_device_memory_mb: float | None = None  # peak CUDA memory allocated, when run on CUDA
    notes: list[str] = field(default_factory=list)

    def finish(self) -> None:
        """Fill in the summary figures from the layers and the process."""
        pruned = [layer for layer in self.layers if layer.loss is not None]
        weights = sum(layer.shape[0] * layer.shape[1] for layer in pruned)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in pruned)
        self.sparsity = zeros / weights if weights else 0.0
        self.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.device.startswith("cuda") and torch.cuda.is_available():
            self.peak_device_memory_mb = torch.cuda.max_memory_allocated() / 2**20

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def task_lines(self) -> list[str]:
        """One line per lm-eval task: its accuracies at each point of the run."""
        tasks = self.tasks
        limit = f", at most {tasks['limit']} examples each" if tasks["limit"] is not None else ""
        lines = [f"zero-shot tasks ({tasks['harness']}{limit}):"]
        labels = [label for label in ("dense", "pruned", "refined", "recovered") if tasks.get(label)]
        for task in tasks["tasks"]:
            rows = [(label, tasks[label].get(task, {})) for label in labels]
            parts = [f"{metric} " + ", ".join(f"{label} {row[metric]:.4f}" for label, row in rows if metric in row)
                     for metric in ("acc", "acc_norm") if any(metric in row for _, row in rows)]
            samples = next((row["samples"] for _, row in rows if row.get("samples") is not None), None)
            lines.append(f"  {task} ({samples} examples): " + "; ".join(parts))
        lines.extend(f"  {task}: not evaluated ({reason})" for task, reason in tasks["unavailable"].items())
        return lines

    def table(self) -> str:
        """A readable per-layer table with the summary under it."""
        return f"{self.layer_table()}\n\n{self.summary()}"

    def layer_table(self) -> str:
        """One line per pruned layer: shape, sparsity, N:M validity, the method's loss, seconds and notes (and OWL's
        per-block allocation)."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  {'N:M ok':>6}  {'loss':>10}  {'seconds':>7}"]
        for layer in self.layers:
            valid = "-" if layer.pattern_valid is None else ("yes" if layer.pattern_valid else "NO")
            loss = "skipped" if layer.loss is None else f"{layer.loss:.4g}"
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            note = f"  ({'; '.join(layer.notes)})" if layer.notes else ""
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.sparsity:>8.2%}  {valid:>6}  {loss:>10}  {layer.seconds:>7.2f}{note}")
        if self.allocation:
            lines.append("")
            lines.append(f"OWL allocation ({self.allocation['rule']} rule, M = {self.allocation['owl_m']:g}): block, outlier ratio, sparsity")
            lines.extend(f"  {entry['block']:>3}  {entry['outlier_ratio']:.4f}  {entry['sparsity']:.4f}" for entry in self.allocation["blocks"])
        return "\n".join(lines)

    def summary(self) -> str:
        """What the run cost, in a few lines: sparsity reached, the evaluations before and after, quantization and sizes
        on disk, time, peak memory."""
        lines = []
        target = self.target["pattern"] or f"{self.target['sparsity']:.0%}"
        lines.append(f"method {self.method}, target {target}, sparsity reached {self.sparsity:.2%} over {len(self.layers)} layers")
        if self.perplexity:
            stages = [(label, self.perplexity[label]) for label in ("dense", "pruned", "refined", "recovered") if self.perplexity.get(label)]
            figures = ", ".join(f"{label} {value['value']:.3f}" for label, value in stages)
            window = stages[0][1]
            lines.append(f"perplexity ({self.perplexity['data']}, {window['windows']} windows of {window['seqlen']} tokens): {figures}")
        if self.entity_f1 and "pruned" in self.entity_f1:
            scores = self.entity_f1
            figures = ", ".join(f"{label} {scores[label]['f1']:.4f}" for label in ("dense", "pruned", "refined", "recovered") if label in scores)
            lines.append(f"entity F1 ({scores['data']} test split, {scores['sentences']} sentences): {figures}")
        if self.tasks:
            lines.extend(self.task_lines())
        if self.distributed:
            ranks = self.distributed
            work = "; ".join(f"rank {entry['rank']}: {entry['calibration_windows']} calibration windows, {entry['layer_groups_pruned']} layer groups "
                             f"pruned, {entry.get('bytes_summed', 0) / 2**20:.1f} MB summed, {entry.get('bytes_broadcast', 0) / 2**20:.1f} MB broadcast"
                             for entry in ranks["per_rank"])
            lines.append(f"{ranks['ranks']} ranks ({ranks['backend']}): {work}")
        if self.refine:
            refined = self.refine
            curve = refined["curve"]
            heldout = refined["heldout"]["losses"]
            lines.append(
                f"refinement ({refined['method']}, {refined['steps']} steps, lr {refined['lr']:g}, C {refined['logit_scale']:g}, α {refined['alpha']:g}, "
                f"{refined['weights']} weights under the mask): residual {curve[0]['residual']:+.4f} -> {curve[-1]['residual']:+.4f}, "
                f"{refined['changed_groups']:.2%} of groups changed, held-out loss one-shot {heldout['one-shot']:.4f} / top-N {heldout['top-N']:.4f} "
                f"(kept {refined['heldout']['kept']}), {refined['seconds_per_step']:.2f} s/step "
                f"(sampling {refined['seconds_sampling'] / max(refined['seconds'], 1e-12):.0%}, forward {refined['seconds_forward'] / max(refined['seconds'], 1e-12):.0%}, "
                f"update {refined['seconds_update'] / max(refined['seconds'], 1e-12):.0%})"
            )
        if self.recover:
            recovered = self.recover
            curve = recovered["curve"]
            lines.append(
                f"recovery ({recovered['optimizer']}, {recovered['steps']} steps, lr {recovered['lr']:g}, batch {recovered['batch']} x {recovered['seqlen']} tokens): "
                f"training loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}, {recovered['seconds_per_step']:.2f} s/step "
                f"(optimizer {recovered['seconds_optimizer'] / recovered['steps']:.3f} s), pruned weights kept at zero: {'yes' if recovered['zeros_kept'] else 'NO'}"
            )
        if self.quantization:
            grid = self.quantization
            lines.append(f"quantized to int{grid['bits']} " + (f"g{grid['group_size']}" if grid["group_size"] else "per channel") + " (symmetric, "
                         + ("in the pruning sweep" if grid["in_sweep"] else "GPTQ after the mask")
                         + (", activation order" if grid.get("act_order") else "") + (", searched scales" if grid.get("search_scales") else "") + ")")
        if self.storage:
            stored = self.storage
            against = f", {stored['ratio']:.3f}x the input's {stored['input_bytes'] / 2**20:.1f} MB" if stored.get("ratio") else ""
            quantized = (f"; quantized layers {stored['quantized_bits_per_weight']:.3f} bits per weight (values + scales)"
                         if stored.get("quantized_bits_per_weight") else "")
            lines.append(f"output ({stored['format']}): {stored['output_bytes'] / 2**20:.1f} MB on disk{against}, "
                         f"{stored['bits_per_weight']:.2f} bits per weight overall{quantized}")
        stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in self.seconds.items())
        lines.append(f"time: {stages}")
        memory = f"peak memory {self.peak_memory_mb:.0f} MB"
        if self.peak_device_memory_mb is not None:
            memory += f" (CUDA {self.peak_device_memory_mb:.0f} MB)"
        lines.append(memory)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
