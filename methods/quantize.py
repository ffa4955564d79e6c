"""Symmetric integer weight quantization (W4A16, W8A16): the grid a layer's weights are rounded to, per output channel
or per group of `group_size` consecutive inputs, as compressed-tensors stores it (int values, one scale per group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from methods.base import PruningError

BITS = (4, 8)  # the integer widths compressed-tensors' packed format and the serving kernels take
DEFAULT_GROUP_SIZE = 128
DEFAULT_ACT_ORDER = True  # SmolLM2 int4 g64, 40 WikiText-2 windows, 3 seeds: 38.34 ± 0.35 with, 42.28 ± 1.07 without (benchmarks/README.md)
DEFAULT_SEARCH_SCALES = False
SHRINKS = 80  # scale search: candidates s · (1 − i/100) for i < 80, as GPTQ's reference quantizer (grid 100, maxshrink 0.8)
ERROR_NORM = 2.4  # the search's error Σ |q·s − w|^2.4 (that quantizer's norm)


@dataclass(frozen=True)
class QuantGrid:
    """Signed `bits`-bit integers times a scale per output row and group of `group_size` inputs (None: one scale per
    row); scales stored in `scale_dtype` (the model's), as the loader reads them back. With `act_order` the sweep
    rounds the columns in decreasing order of diag H (GPTQ's activation order) and each group's scales are fixed
    before it from the group's original columns ("static groups"), so the saved layout needs no permutation. With
    `search_scales` each group's scale is the one of `SHRINKS` shrunk candidates that rounds the group with the least
    error instead of max|w|'s."""

    bits: int
    group_size: int | None = DEFAULT_GROUP_SIZE
    scale_dtype: torch.dtype = torch.float32
    act_order: bool = DEFAULT_ACT_ORDER
    search_scales: bool = DEFAULT_SEARCH_SCALES

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise PruningError(f"{self.bits}-bit weights are not supported: choose {' or '.join(map(str, BITS))} bits")
        if self.group_size is not None and self.group_size < 1:
            raise PruningError(f"group size must be positive, got {self.group_size}")

    @property
    def lowest(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def highest(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        return (f"int{self.bits} " + (f"g{self.group_size}" if self.group_size else "per channel") + (", activation order" if self.act_order else "")
                + (", searched scales" if self.search_scales else ""))

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise if a layer with `in_features` inputs cannot be split into whole groups."""
        if self.group_size is not None and in_features % self.group_size:
            raise PruningError(f"layer {name} has {in_features} inputs, not a multiple of the group size {self.group_size}")

    def group_of(self, column: int, columns: int) -> tuple[int, int]:
        """The input columns sharing column's scale."""
        if self.group_size is None:
            return 0, columns
        first = column - column % self.group_size
        return first, first + self.group_size

    def bits_per_weight(self, stored_bytes: int) -> float:
        """Bits on disk per weight: the value plus its share of the group's scale (`stored_bytes` each)."""
        return self.bits + (8 * stored_bytes / self.group_size if self.group_size else 0.0)


def scales(weights: Tensor, grid: QuantGrid) -> Tensor:
    """One scale per row of `weights` (rows, inputs of a group): s = max|w| / ((highest − lowest) / 2), so that the
    largest magnitude maps to the grid's end (GPTQ's symmetric rule); an all-zero row gets the scale of max|w| = 1.
    With `grid.search_scales`, the candidate s · (1 − i/100), i < SHRINKS, of least Σ |q·s − w|^2.4 (clipping the
    largest weights for a finer grid for the rest). Rounded to the dtype the scales are stored in, so that the
    rounding below uses the scale the loader reads."""
    largest = weights.abs().amax(dim=-1)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    full = largest / ((grid.highest - grid.lowest) / 2)
    best = full.to(grid.scale_dtype).to(weights.dtype)
    if not grid.search_scales:
        return best
    best_error = rounding_error(weights, best, grid)
    for step in range(1, SHRINKS):
        candidate = (full * (1 - step / 100)).to(grid.scale_dtype).to(weights.dtype)
        error = rounding_error(weights, candidate, grid)
        better = error < best_error
        best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def rounding_error(weights: Tensor, scale: Tensor, grid: QuantGrid) -> Tensor:
    """Σ over each row of |q·s − w|^ERROR_NORM for one scale per row."""
    per_row = scale.unsqueeze(-1)
    return (rounded(weights, per_row, grid) * per_row - weights).abs().pow(ERROR_NORM).sum(dim=-1)


def group_scales(weight: Tensor, grid: QuantGrid) -> Tensor:
    """The scales (groups, rows) of `weight` (inputs, rows: transposed), each group's from its own columns."""
    columns, rows = weight.shape
    width = grid.group_size or columns
    return scales(weight.reshape(columns // width, width, rows).transpose(1, 2), grid)


def rounded(weights: Tensor, scale: Tensor, grid: QuantGrid) -> Tensor:
    """The integer level of each weight, q = clamp(round(w / s), lowest, highest) (round half to even), as a float tensor."""
    return torch.clamp(weights / scale, grid.lowest, grid.highest).round()


def dequantized(levels: Tensor, scale: Tensor, grid: QuantGrid) -> Tensor:
    """The weight a compressed-tensors loader rebuilds from its integer levels: q · s computed in the scales' dtype."""
    return levels.to(grid.scale_dtype) * scale.to(grid.scale_dtype)


def on_grid(weight: Tensor, scale: Tensor, grid: QuantGrid) -> Tensor:
    """`weight` (out, in) as the loader rebuilds it from its levels and `scale` (out, groups), in the scales' dtype."""
    rows, columns = weight.shape
    width = grid.group_size or columns
    expanded = scale.to(torch.float32).repeat_interleave(width, dim=1)
    return dequantized(rounded(weight.to(torch.float32), expanded, grid), expanded, grid)
