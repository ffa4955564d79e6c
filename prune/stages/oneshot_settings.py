"""The one-shot stage's settings: the target (--sparsity / --pattern), the method and its options, the layers and blocks
it prunes, the block order, and --quantize's grid; each checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from methods import DEFAULT_METHOD, METHODS, PruningError, Target, get_method
from methods.quantize import DEFAULT_ACT_ORDER, DEFAULT_GROUP_SIZE, DEFAULT_SEARCH_SCALES, QuantGrid
from prune.distributed import Ranks
from prune.plan import LayerPlan, LayerRules, layer_pattern, layer_plan, parsed_override
from prune.settings import StageSettings, about, check_fields, flag_of, negated, option

PROPAGATE_CHOICES = ("pruned", "dense")
ORDERS = ("one-pass", "two-pass")
QUANTIZE_CHOICES = {"int4": 4, "int8": 8}  # weights only: activations stay in the model's dtype (W4A16, W8A16)
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
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

    def plan(self, model: nn.Module, target: Target) -> LayerPlan:
        """The layers of `model` these settings prune, and to what (see prune.plan.layer_plan)."""
        return layer_plan(model, target, self.layer_rules(), self.blocks, self.skip_incompatible)

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
        target = self.target() if target is None else target
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
