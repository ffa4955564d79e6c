"""Shared types of the one-shot pruning methods: the target a layer must reach, what a method returns, and the
Method record that says everything a caller needs to know about a method (its statistic, options, checks, cost)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


class PruningError(ValueError):
    """A request that cannot be carried out (bad target, a layer that cannot hold a pattern, a singular Hessian)."""


# The calibration statistics a method can ask for (their accumulators live in methods/statistics.py).
HESSIAN = "hessian"  # H = (2/n) Σ x xᵀ over the calibration tokens of a layer's input
COLUMN_NORMS = "column_norms"  # ‖X_j‖₂ = sqrt(mean over tokens of x_j²) per input feature
FISHER = "fisher"  # built from per-sample gradients of the task loss (the method says how: Method.gradients)


@dataclass(frozen=True)
class Target:
    """What a layer must become: a fraction of zeros, or N kept weights in every M consecutive inputs of a row."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise PruningError("an N:M target needs both N and M")
        if self.is_nm:
            if not (1 <= self.n < self.m):
                raise PruningError(f"pattern {self.n}:{self.m} is invalid: need 1 <= N < M (N weights kept of every M)")
            expected = 1.0 - self.n / self.m
            if abs(self.sparsity - expected) > 1e-9:
                raise PruningError(
                    f"pattern {self.n}:{self.m} means sparsity {expected:g}, which conflicts with sparsity {self.sparsity:g}"
                )
        if not (0.0 <= self.sparsity < 1.0):
            raise PruningError(f"sparsity must be in [0, 1), got {self.sparsity:g}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def pattern(self) -> str | None:
        return f"{self.n}:{self.m}" if self.is_nm else None

    @classmethod
    def from_options(cls, sparsity: float | None = None, pattern: str | None = None) -> Target:
        """Build a target from a sparsity and/or a pattern 'N:M' (N kept of every M)."""
        if pattern is None:
            if sparsity is None:
                raise PruningError("give a sparsity (e.g. 0.5) or a pattern (e.g. 2:4)")
            return cls(float(sparsity))
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if match is None:
            raise PruningError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 1 or not (1 <= n < m):
            raise PruningError(f"pattern {n}:{m} is invalid: need 1 <= N < M (N weights kept of every M)")
        implied = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise PruningError(
                f"pattern {n}:{m} means sparsity {implied:g}, which conflicts with sparsity {float(sparsity):g}"
            )
        return cls(implied, n, m)

    def describe(self) -> str:
        return f"{self.pattern} (N:M, {self.sparsity:.0%} sparse)" if self.is_nm else f"{self.sparsity:.0%} unstructured"

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise if a layer with `in_features` inputs cannot hold this target."""
        if self.is_nm and in_features % self.m != 0:
            raise PruningError(
                f"layer {name} has {in_features} inputs, not a multiple of M={self.m}: it cannot hold pattern {self.pattern}"
            )


@dataclass
class LayerResult:
    """The outcome of pruning one layer."""

    weight: Tensor  # the updated weight, (out_features, in_features)
    mask: Tensor  # bool, True = kept
    loss: float  # the method's own estimate of the output error it caused
    details: dict = field(default_factory=dict)  # method-specific facts worth reporting (damping used, ...)
    scale: Tensor | None = None  # quantized: the scales of `weight`'s grid, (out_features, groups), as compressed-tensors stores them


@dataclass(frozen=True)
class MethodOption:
    """A keyword option of a method's prune function, with its default (the function's own) and what it means. The
    default's type is the option's: a boolean is a switch, an int a whole number, a float a number."""

    name: str
    default: bool | int | float
    help: str


@dataclass(frozen=True)
class GradientStatistic:
    """How a method built on per-sample gradients of the task loss gets each layer's statistic from them, given its
    resolved options. The caller runs the model, one backward pass per sample, and hands every layer's gradient
    (shaped like its (out, in) weight, flattened), `batch` at a time, to `add`; it may repeat this for several pruning epochs, the sparsity rising
    on the cubic schedule, the statistics rebuilt on the weights pruned so far."""

    count_option: str  # the option that holds m, the gradients per pruning epoch
    epochs_option: str  # the option that holds the number of pruning epochs
    ranking_option: str  # the option that, when true, ranks all layers' weights together instead of each layer alone
    start: Callable[..., Tensor]  # (weight, options, dtype) -> the empty statistic of a layer
    add: Callable[[Tensor, Tensor, int], None]  # (statistic, k gradients (k, entries), m): adds them in place
    batch: int  # k: gradients the caller gathers (per layer) before each `add`
    memory_bytes: Callable[..., int]  # (entries of a weight, options, dtype) -> bytes of its statistic
    saliency: Callable[[Tensor, Tensor], Tensor]  # (weight, statistic) -> each weight's score (the lowest go first)
    merge: Callable[..., None] | None = None  # (statistic, sum_across) combines the processes' statistics; None: it cannot be


def _no_notes(details: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    """A one-shot method: `prune(weight, statistic, target, **options) -> LayerResult` (the statistic is None for a
    method that needs none), and everything a caller must know to run it: the statistic it needs, its options, the
    check of their values, its work estimate and how its details read in a report."""

    name: str
    summary: str
    prune: Callable[..., LayerResult]
    statistic: str | None = None  # HESSIAN, COLUMN_NORMS, or None: no calibration data
    options: tuple[MethodOption, ...] = ()
    check: Callable[..., None] | None = None  # check(target, **options): PruningError about a value that cannot work
    work: Callable[[int, int, Target], float] | None = None  # floating-point work of a (rows, columns) layer, if it can be large
    notes: Callable[[dict], list[str]] = _no_notes  # LayerResult.details -> notes for the report
    prune_together: Callable[..., list[LayerResult]] | None = None  # several layers sharing one statistic at once
    gradients: GradientStatistic | None = None  # statistic FISHER: how it is built from task-loss gradients
    quantizes: bool = False  # rounds to a grid inside its own sweep: prune(..., grid=QuantGrid) (statistic HESSIAN)

    @property
    def statistic_merges(self) -> bool:
        """Whether the statistic it needs can be combined across the processes of a run (activation statistics can;
        one built from gradients says so itself)."""
        return self.gradients is None or self.gradients.merge is not None

    def resolved_options(self, given: dict) -> dict:
        """Every option of the method: the given values over the defaults. An option the method does not take is an error."""
        unknown = sorted(set(given) - {option.name for option in self.options})
        if unknown:
            raise PruningError(f"method {self.name} takes no option {', '.join(unknown)}")
        return {option.name: given.get(option.name, option.default) for option in self.options}

    def check_options(self, target: Target, given: dict) -> None:
        """Raise PruningError when the options (given over the defaults) cannot serve the target."""
        options = self.resolved_options(given)
        if self.check is not None:
            self.check(target, **options)

    def run(self, weight: Tensor, statistic: Tensor | None, target: Target, options: dict) -> LayerResult:
        """Prune one (out, in) weight to `target` given its statistic (None when the method needs none)."""
        return self.prune(weight, statistic, target, **options)

    def run_together(self, weights: list[Tensor], statistic: Tensor | None, target: Target, options: dict) -> list[LayerResult]:
        """Prune one weight, or several that share one statistic (layers fed the same inputs): at once when the method
        can, else one after the other. The pipeline's one way to run a method (options resolved by `resolved_options`;
        a method built on task-loss gradients takes only the cross-layer `mask`, its options having shaped the
        statistic)."""
        if self.prune_together is not None and len(weights) > 1:
            return self.prune_together(weights, statistic, target, **options)
        return [self.run(weight, statistic, target, options) for weight in weights]


def prune_count(size: int, sparsity: float) -> int:
    """Number of weights to remove from `size` to reach `sparsity` (rounded to the nearest weight)."""
    return int(round(size * sparsity))


def mask_lowest_per_row(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask that removes the same number of lowest-scored weights from every row (ties: earlier index first)."""
    rows, cols = scores.shape
    k = prune_count(cols, sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, :k], False)
    return mask


def mask_lowest_overall(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask that removes the lowest-scored weights across the whole tensor."""
    flat = scores.reshape(-1)
    k = prune_count(flat.numel(), sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    return mask.reshape(scores.shape)


def masks_lowest_across(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep-masks reaching `sparsity` over several tensors together: the lowest scores of them all go."""
    keep = mask_lowest_overall(torch.cat([score.reshape(-1) for score in scores.values()]), sparsity)
    return dict(zip(scores, (part.reshape(score.shape) for part, score in zip(keep.split([score.numel() for score in scores.values()]),
                                                                             scores.values(), strict=True)), strict=True))


def mask_top_n_of_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the n highest scores of every m consecutive entries of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], True)
    return mask.reshape(rows, cols)


def mask_for_target(scores: Tensor, target: Target, *, per_row: bool) -> Tensor:
    """Keep-mask reaching `target` from saliency scores (higher = more important)."""
    if target.is_nm:
        return mask_top_n_of_m(scores, target.n, target.m)
    if per_row:
        return mask_lowest_per_row(scores, target.sparsity)
    return mask_lowest_overall(scores, target.sparsity)


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Run the enclosed code with TF32 matrix products disabled (restored afterwards)."""
    matmul_flag = torch.backends.cuda.matmul.allow_tf32
    cudnn_flag = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_flag
        torch.backends.cudnn.allow_tf32 = cudnn_flag
