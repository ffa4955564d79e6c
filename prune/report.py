"""What a pruning run did and cost: per-layer figures, stage times, perplexity, memory."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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


def no_lines(figures: dict) -> list[str]:
    return []


@dataclass
class Section:
    """One part of the report that a stage (or an evaluator, the ranks, the output) owns: its figures, written to
    report.json under its key; the summary lines they read as; the lines of the verbose table; the figure files drawn
    from them into an output folder."""

    figures: dict
    lines: Callable[[dict], list[str]] = no_lines
    details: Callable[[dict], list[str]] = no_lines
    draw: Callable[[dict, Path], None] | None = None


@dataclass
class Report:
    """What every run has (the model, the target, the layers, the time, the memory), and the sections of the stages
    that ran, by key. A section's figures read as an attribute (`report.perplexity`); one the run may write but did
    not (`keys`) reads as None, and report.json holds it as null."""

    model: dict  # {"name", "source", "kind", "blocks"}
    device: str
    method: str = ""
    target: dict = field(default_factory=dict)  # {"sparsity": s, "pattern": "N:M" or None}
    calibration: dict = field(default_factory=dict)  # {"source", "nsamples", "seqlen", "seed", "used"}
    options: dict = field(default_factory=dict)  # the method's options as run, propagation, Hessian precision
    settings: dict = field(default_factory=dict)  # every option of the run, by the name the command and the API give it
    layers: list[LayerReport] = field(default_factory=list)
    sparsity: float = 0.0  # zeros over all pruned layers
    seconds: dict = field(default_factory=dict)  # load, data, evaluate, and each stage's seconds, total
    prune_breakdown: dict = field(default_factory=dict)  # seconds in statistics passes, method sweeps, propagation passes
    peak_memory_mb: float = 0.0  # peak resident memory of the process
    peak_device_memory_mb: float | None = None  # peak CUDA memory allocated, when run on CUDA
    notes: list[str] = field(default_factory=list)
    sections: dict[str, Section] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # every section a run of this pipeline may write

    def __getattr__(self, name: str) -> dict | None:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name].figures
        if name in self.__dict__.get("keys", ()):
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def put(self, key: str, section: Section) -> dict:
        """Write (or replace) the section under `key`; return its figures, which the stage may go on filling."""
        self.sections[key] = section
        return section.figures

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
        data = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in ("sections", "keys")}
        data["layers"] = [asdict(layer) for layer in self.layers]
        data.update(dict.fromkeys(self.keys))
        data.update({key: section.figures for key, section in self.sections.items()})
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A readable per-layer table, each section's details, and the summary under it."""
        return f"{self.layer_table()}\n\n{self.summary()}"

    def layer_table(self) -> str:
        """One line per pruned layer: shape, sparsity, N:M validity, the method's loss, seconds and notes; then the
        sections' details (OWL's per-block allocation)."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  {'N:M ok':>6}  {'loss':>10}  {'seconds':>7}"]
        for layer in self.layers:
            valid = "-" if layer.pattern_valid is None else ("yes" if layer.pattern_valid else "NO")
            loss = "skipped" if layer.loss is None else f"{layer.loss:.4g}"
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            note = f"  ({'; '.join(layer.notes)})" if layer.notes else ""
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.sparsity:>8.2%}  {valid:>6}  {loss:>10}  {layer.seconds:>7.2f}{note}")
        for section in self.sections.values():
            if details := section.details(section.figures):
                lines.extend(["", *details])
        return "\n".join(lines)

    def summary(self) -> str:
        """What the run cost, in a few lines: sparsity reached, each section's lines (the evaluations before and after,
        quantization and sizes on disk, ...), time, peak memory."""
        target = self.target["pattern"] or f"{self.target['sparsity']:.0%}"
        lines = [f"method {self.method}, target {target}, sparsity reached {self.sparsity:.2%} over {len(self.layers)} layers"]
        for section in self.sections.values():
            lines.extend(section.lines(section.figures))
        stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in self.seconds.items())
        lines.append(f"time: {stages}")
        memory = f"peak memory {self.peak_memory_mb:.0f} MB"
        if self.peak_device_memory_mb is not None:
            memory += f" (CUDA {self.peak_device_memory_mb:.0f} MB)"
        lines.append(memory)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

