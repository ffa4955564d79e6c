"""The layer plan of a run: which transformer blocks and layers the one-shot stage prunes, and to what target, from
--blocks, --targets, --ignore, --sparsity-override and the target's N:M input-size rule. Built from the model and the
settings alone, before any forward pass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from eval.sparsity import zero_fraction
from methods import PruningError, Target
from methods.quantize import QuantGrid
from prune.models import all_prunable_layers, input_features, layer_weight, prunable_layers, transformer_blocks
from prune.report import LayerReport
from prune.settings import about

REGEX_PREFIX = "re:"  # how llm-compressor recipes mark a regular expression in `targets` and `ignore`


def layer_pattern(text: str, flag: str) -> re.Pattern:
    """A regular expression searched in full layer names (model.layers.3.mlp.down_proj); a leading 're:' is dropped."""
    try:
        return re.compile(text.removeprefix(REGEX_PREFIX))
    except re.error as error:
        raise PruningError(f"{flag} {text!r} is not a regular expression: {error}") from None


def parsed_override(text: str) -> tuple[str, float]:
    """'REGEX=SPARSITY' -> (REGEX, SPARSITY), the sparsity in [0, 1)."""
    pattern, equals, value = text.rpartition("=")
    if not equals or not pattern:
        raise PruningError(f"--sparsity-override {text!r}: expected REGEX=SPARSITY")
    try:
        sparsity = float(value)
    except ValueError:
        raise PruningError(f"--sparsity-override {text!r}: {value!r} is not a number") from None
    if not 0 <= sparsity < 1:
        raise PruningError(f"--sparsity-override {text!r}: the sparsity must be in [0, 1)")
    return pattern, sparsity


@dataclass(frozen=True)
class LayerRules:
    """Which layers of the selected blocks are pruned, and to what sparsity, by name: --targets, --ignore,
    --sparsity-override (a layer that --targets does not match, or that --ignore matches, stays dense; the first
    override that matches a pruned layer replaces its block's sparsity)."""

    targets: tuple[tuple[str, re.Pattern], ...] = ()
    ignore: tuple[tuple[str, re.Pattern], ...] = ()
    overrides: tuple[tuple[str, re.Pattern, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.targets or self.ignore or self.overrides)

    def dense_reason(self, name: str) -> str | None:
        """Why the layer `name` stays dense, or None when it is pruned."""
        if self.targets and not any(pattern.search(name) for _, pattern in self.targets):
            return "not matched by --targets; left dense"
        ignored = next((text for text, pattern in self.ignore if pattern.search(name)), None)
        return None if ignored is None else f"matched --ignore {ignored!r}; left dense"

    def sparsity_of(self, name: str) -> float | None:
        """The sparsity of the first override that matches `name`, if any."""
        return next((sparsity for _, pattern, sparsity in self.overrides if pattern.search(name)), None)

    def unmatched(self, names: list[str]) -> str | None:
        """The complaint about the first rule that matches none of `names` (a misspelt regex would silently do nothing)."""
        rules = [("--targets", text, pattern) for text, pattern in self.targets] + [("--ignore", text, pattern) for text, pattern in self.ignore]
        rules += [("--sparsity-override", f"{text}={sparsity:g}", pattern) for text, pattern, sparsity in self.overrides]
        for flag, text, pattern in rules:
            if not any(pattern.search(name) for name in names):
                example = names[0] if names else "(none)"
                return f"{flag} {text!r} matches no layer of the model (its layers are named like {example})"
        return None


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


@dataclass
class LayerPlan:
    """Which layers the one-shot stage prunes, and to what (see `layer_plan`)."""

    blocks_name: str
    blocks: nn.ModuleList
    targets: list[Target | None]  # per block; None: the block stays dense
    skipped: dict[str, str] = field(default_factory=dict)  # full name -> why the layer stays dense (--targets, --ignore, N:M input size)
    overrides: dict[str, Target] = field(default_factory=dict)  # full name -> the layer's own target (--sparsity-override)
    incompatible: list[str] = field(default_factory=list)  # full names of the layers left dense for their N:M input size

    @property
    def selected(self) -> list[int]:
        return [index for index, target in enumerate(self.targets) if target is not None]

    def target_of(self, name: str) -> Target | None:
        """What the layer `name` (full name) becomes: its override, else its block's target; None when it stays dense."""
        block = self.targets[int(name[len(self.blocks_name) + 1 :].split(".")[0])]
        if block is None or name in self.skipped:
            return None
        return self.overrides.get(name, block)

    def check_grid(self, grid: QuantGrid, *, packed: bool) -> None:
        """Refuse a --quantize grid a pruned layer cannot hold, or (`packed`: a compressed output) a layer that
        compressed-tensors cannot load."""
        layers = self.pruned_layers()
        for name, layer in layers.items():
            with about("--group-size"):
                grid.check_layer(name, input_features(layer))
        transposed = next((name for name, layer in layers.items() if not isinstance(layer, nn.Linear)), None) if packed else None
        if transposed is not None:
            raise PruningError(f"--save-format compressed packs nn.Linear layers; {transposed} is a {type(layers[transposed]).__name__} "
                               "(GPT-2's transposed layer), which compressed-tensors does not load: use --save-format dense")

    def pruned_layers(self) -> dict[str, nn.Module]:
        """Full name -> layer, for every layer the one-shot stage prunes."""
        return {
            f"{self.blocks_name}.{index}.{name}": layer
            for index in self.selected
            for name, layer in prunable_layers(self.blocks[index]).items()
            if f"{self.blocks_name}.{index}.{name}" not in self.skipped
        }


def layer_plan(model: nn.Module, target: Target, rules: LayerRules, block_spec: str | None, skip_incompatible: bool) -> LayerPlan:
    """The plan of `model`: its selected blocks at `target`, the layers the rules leave dense or give their own sparsity;
    refused when a rule matches no layer or a layer cannot hold the N:M pattern (unless `skip_incompatible`)."""
    blocks_name, blocks = transformer_blocks(model)
    selected = parse_blocks(block_spec, len(blocks))
    if (problem := rules.unmatched(list(all_prunable_layers(model)))) is not None:
        raise PruningError(problem)
    in_selected = [f"{blocks_name}.{index}.{name}" for index in selected for name in prunable_layers(blocks[index])]
    skipped = {name: reason for name in in_selected if (reason := rules.dense_reason(name)) is not None}
    incompatible = [name for name in incompatible_layers(blocks, blocks_name, target, selected) if name not in skipped]
    if incompatible and not skip_incompatible:
        raise PruningError(
            f"{len(incompatible)} layer(s) cannot hold pattern {target.pattern}: {incompatible[0]} has "
            f"{input_features(model.get_submodule(incompatible[0]))} inputs, not a multiple of {target.m} "
            "(--skip-incompatible leaves such layers dense)"
        )
    skipped.update({name: f"input size not a multiple of M={target.m}; left dense" for name in incompatible})
    overrides = {name: Target(sparsity) for name in in_selected if name not in skipped and (sparsity := rules.sparsity_of(name)) is not None}
    return LayerPlan(blocks_name, blocks, [target if index in selected else None for index in range(len(blocks))], skipped, overrides,
                     incompatible)


def plan_notes(plan: LayerPlan, target: Target, block_spec: str | None) -> list[str]:
    """What the plan leaves dense or prunes differently, for the report's notes."""
    notes = []
    if by_rules := len(plan.skipped) - len(plan.incompatible):
        notes.append(f"{by_rules} layer(s) left dense by --targets / --ignore")
    if plan.overrides:
        notes.append(f"{len(plan.overrides)} layer(s) pruned to their --sparsity-override instead of their block's sparsity")
    if plan.incompatible:
        notes.append(f"{len(plan.incompatible)} layer(s) left dense: input size not a multiple of M={target.m}")
    if len(plan.selected) < len(plan.blocks):
        notes.append(f"only blocks {block_spec} pruned ({len(plan.selected)} of {len(plan.blocks)}); the others stay dense")
    return notes


def skipped_layer(name: str, layer: nn.Module, reason: str) -> LayerReport:
    weight = layer_weight(layer)
    return LayerReport(name, tuple(weight.shape), zero_fraction(weight), None, None, 0.0, [reason])
