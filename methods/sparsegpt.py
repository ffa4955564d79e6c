"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning by lazy OBS column sweeps over the Cholesky factor of H⁻¹."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import (
    HESSIAN,
    LayerResult,
    Method,
    MethodOption,
    PruningError,
    Target,
    exact_matmul,
    mask_lowest_overall,
)
from methods.hessian import DEFAULT_PERCDAMP, PERCDAMP_HELP, check_percdamp, damped_inverse, damping_notes, inverse_details
from methods.quantize import QuantGrid, group_scales, on_grid, rounded, scales

BLOCKSIZE = 128  # lazy-update block: columns swept before the rest of the layer is updated in one matrix product
MASK_BLOCKSIZE = 64  # adaptive-mask block: columns whose mask is chosen together (the pruning deep-dive's)
INNER_BLOCK = 16  # about how many columns of a lazy block are swept by rank-one updates before one product updates the rest of it


def inner_blocksize(step: int, target: int = INNER_BLOCK) -> int:
    """Columns per inner block of a lazy block whose mask is chosen every `step` columns: a multiple of `step`, or a
    divisor of it, near `target`, so that every mask choice falls on an inner block's first column (where the
    columns it scores have received every earlier column's update)."""
    if step <= target:
        return step * (target // step)
    return max(size for size in range(1, target + 1) if step % size == 0)


def check_options(target: Target, blocksize: int = BLOCKSIZE, mask_blocksize: int = MASK_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> None:
    """Raise PruningError when the options cannot serve the target."""
    check_percdamp(percdamp)
    if blocksize < 1 or mask_blocksize < 1:
        raise PruningError(f"block sizes must be positive, got blocksize={blocksize}, mask_blocksize={mask_blocksize}")
    if blocksize % mask_blocksize != 0:
        raise PruningError(f"blocksize ({blocksize}) must be a multiple of mask_blocksize ({mask_blocksize})")
    if target.is_nm and blocksize % target.m != 0:
        raise PruningError(f"blocksize ({blocksize}) must be a multiple of M={target.m} for pattern {target.pattern}")


def prune(
    weight: Tensor,
    hessian: Tensor,
    target: Target,
    *,
    blocksize: int = BLOCKSIZE,
    mask_blocksize: int = MASK_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    grid: QuantGrid | None = None,
) -> LayerResult:
    """Prune `weight` (out, in) to `target`, updating the kept weights to compensate, given H = (2/n) X Xᵀ (in, in);
    with a `grid`, round the kept weights to it in the same sweep.

    The mask is chosen adaptively from the already-updated weights: for an unstructured target, the
    lowest w²/[U]_jj² of each block of `mask_blocksize` columns (across all rows) when the sweep reaches
    it; for N:M, the N highest of each group of M inputs of a row when the sweep reaches the group.
    """
    return prune_together([weight], hessian, target, blocksize=blocksize, mask_blocksize=mask_blocksize, percdamp=percdamp, grid=grid)[0]


def prune_together(
    weights: Sequence[Tensor],
    hessian: Tensor,
    target: Target,
    *,
    blocksize: int = BLOCKSIZE,
    mask_blocksize: int = MASK_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    grid: QuantGrid | None = None,
    masks: Sequence[Tensor] | None = None,
) -> list[LayerResult]:
    """`prune` for several layers fed the same inputs (q/k/v, gate/up): H is inverted once and their rows are swept
    together, one column loop for all; each layer's mask is still chosen from its own rows, so each result is the
    one `prune` gives that layer alone (up to float rounding). Given `masks` (bool, True = kept, one per layer), the
    sweep keeps them instead of choosing: with a `grid`, that is GPTQ on the kept weights of an already pruned layer."""
    check_options(target, blocksize, mask_blocksize, percdamp)
    for weight in weights:
        target.check_layer("weight", weight.shape[1])
        if grid is not None:
            grid.check_layer("weight", weight.shape[1])
        if hessian.shape != (weight.shape[1], weight.shape[1]):
            raise PruningError(f"Hessian shape {tuple(hessian.shape)} does not match weight inputs {weight.shape[1]}")
    device = weights[0].device
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + weight.shape[0])
    order = activation_order(hessian, target) if grid is not None and grid.act_order else None
    with exact_matmul():
        swept = hessian if order is None else hessian[order][:, order]  # H of the columns in the order they are swept
        inverse = damped_inverse(swept, percdamp, upper_cholesky=True)
        hinv = inverse.inverse.to(device=device, dtype=torch.float32)  # U, upper: H⁻¹ = UᵀU
        # the rows of all layers side by side, transposed: column j of the weights is row j here, contiguous
        work = torch.cat([weight.detach().to(torch.float32).T for weight in weights], dim=1)
        keep = None if masks is None else torch.cat([mask.T.to(device) for mask in masks], dim=1)
        restore = None
        if order is not None:
            order = order.to(device)
            restore = torch.argsort(order)  # swept position -> the layer's own column order
            work, keep = work[order], None if keep is None else keep[order]
        work[inverse.dead.to(device)] = 0
        static = None if order is None else group_scales(work[restore], grid)  # from the original columns
        keep, errors, scale_rows = sweep(work, hinv, target, blocksize, mask_blocksize, list(zip(bounds, bounds[1:], strict=False)),
                                         grid=grid, keep=keep, static_scales=static, column_order=order)
        del hinv
    if restore is not None:  # back to the layer's own column order
        work, keep = work[restore], keep[restore]
    work.mul_(keep)  # the updates leave pruned weights at zero up to rounding: make it exact
    results = []
    for weight, first, last in zip(weights, bounds, bounds[1:], strict=False):
        # the OBS loss of removing w_j is w_j² / (2 [U]_jj²) = error² / 2
        layer = work[:, first:last].T
        scale = None if grid is None else scale_rows[:, first:last].T.to(grid.scale_dtype).contiguous()
        updated = layer if grid is None else on_grid(layer, scale, grid)  # as the loader rebuilds it from levels and scales
        results.append(LayerResult(weight=updated.to(weight.dtype).contiguous(), mask=keep[:, first:last].T.contiguous(),
                                   loss=errors[first:last].sum().item() / 2, details=inverse_details(inverse), scale=scale))
    return results


def activation_order(hessian: Tensor, target: Target) -> Tensor:
    """GPTQ's activation order (Frantar et al., 2023): the input columns by decreasing diag H, the inputs of largest
    mean square first. For an N:M target whole groups of M consecutive inputs move together, by their summed diag H,
    so that each group is still M consecutive columns of the sweep."""
    unit = target.m if target.is_nm else 1
    diagonal = torch.diagonal(hessian).to(torch.float64).reshape(-1, unit).sum(dim=1)
    groups = torch.argsort(diagonal, descending=True, stable=True)
    return (groups.unsqueeze(1) * unit + torch.arange(unit, device=groups.device)).reshape(-1)


def quantize_kept(weights: Sequence[Tensor], masks: Sequence[Tensor], hessian: Tensor, grid: QuantGrid, *,
                  blocksize: int = BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> list[LayerResult]:
    """GPTQ (Frantar et al., 2023) on the kept weights of pruned layers fed the same inputs: each column rounded to
    the grid, its error spread over the later columns with the inverse-Hessian row; pruned weights stay zero."""
    return prune_together(weights, hessian, Target(0.0), blocksize=blocksize, mask_blocksize=blocksize, percdamp=percdamp, grid=grid, masks=masks)


def sweep(work: Tensor, hinv: Tensor, target: Target, blocksize: int, mask_blocksize: int, layers: list[tuple[int, int]],
          inner: int | None = None, *, grid: QuantGrid | None = None, keep: Tensor | None = None, static_scales: Tensor | None = None,
          column_order: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """SparseGPT's column sweep (Alg. 1) in place on `work` (columns, rows): the weights transposed. Returns the keep
    mask (columns, rows), each row's sum of squared errors over the sweep and, with a `grid`, the scales (groups, rows).

    Column j: every row that drops w_j gets the OBS update W[:, j:] −= (w_j / U_jj) U[j, j:]; inside a lazy block of
    `blocksize` columns the updates are applied lazily again, in inner blocks of about 16 columns: rank-one inside an
    inner block, one matrix product for the rest of the lazy block after it, and one for the columns after the lazy
    block (the same updates, in products instead of memory-bound rank-one passes over the whole lazy block). The
    mask of the columns from j on is chosen when the sweep reaches them, from the already updated weights: the N
    highest w²/U_jj² of each group of M (N:M), or the lowest of each `mask_blocksize` columns over the rows of each
    layer (`layers`: row ranges) for an unstructured target; a given `keep` mask is used as it is instead.

    With a `grid` (joint sparsification and quantization, the SparseGPT paper's §3.5; GPTQ when nothing is pruned),
    each kept weight is rounded to the grid once its mask is chosen and the error of both, (w_j − M_j quant(w_j)) /
    U_jj, is spread over the columns after j the same way; a group's scales come from its updated weights when the
    sweep reaches its first column, or are the given `static_scales` (groups, rows), fixed before the sweep. When
    `work` holds the columns permuted, `column_order[j]` is the original column of row j (its group's scale is that
    column's). `inner` overrides the inner block (`blocksize`: none)."""
    columns, rows = work.shape
    fixed = keep is not None
    keep = keep if fixed else torch.ones_like(work, dtype=torch.bool)
    squared_errors = torch.zeros(rows, device=work.device)
    step = target.m if target.is_nm else mask_blocksize
    inner = inner or inner_blocksize(step)
    width = columns if grid is None else grid.group_size or columns
    group_of = list(range(columns)) if column_order is None else column_order.tolist()  # the original column of each swept one
    scale_rows = static_scales if grid is None or static_scales is not None else scales_to_fill(work, grid, blocksize, inner)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block, hinv_block = work[start:end], hinv[start:end, start:end]
        diagonal = torch.diagonal(hinv_block)
        scale = torch.empty(end - start, rows, device=work.device)  # 1/U_jj where w_j is pruned, 0 where it is kept
        errors = torch.empty(end - start, rows, device=work.device)
        for i in range(end - start):
            if i % inner == 0 and i:  # the inner block before i is swept: update the rest of the lazy block
                block[i:].addmm_(hinv_block[i - inner : i, i:].T, errors[i - inner : i], alpha=-1.0)
            if i % step == 0 and not fixed:
                part = slice(i, min(i + step, end - start))
                kept = kept_of(block[part] ** 2 / diagonal[part].unsqueeze(1) ** 2, target, layers)
                keep[start + part.start : start + part.stop] = kept
                torch.div((~kept).to(work.dtype), diagonal[part].unsqueeze(1), out=scale[part])
            if grid is None:
                torch.mul(block[i], scale[i], out=errors[i])
            else:
                if static_scales is None and grid.group_size is not None and (start + i) % width == 0:  # its columns are all updated here
                    scale_rows[(start + i) // width] = scales(block[i : i + width].T, grid)
                group_scale = scale_rows[group_of[start + i] // width]
                target_value = rounded(block[i], group_scale, grid).mul_(group_scale).mul_(keep[start + i])  # M_j quant(w_j)
                torch.div(block[i] - target_value, diagonal[i], out=errors[i])
                block[i] = target_value
            inner_end = min(i - i % inner + inner, end - start)
            block[i + 1 : inner_end].addr_(hinv_block[i, i + 1 : inner_end], errors[i], alpha=-1.0)
        squared_errors += errors.pow(2).sum(0)
        work[end:] -= hinv[start:end, end:].T @ errors  # the lazy update of the columns after the block
    return keep, squared_errors, scale_rows


def kept_of(scores: Tensor, target: Target, layers: list[tuple[int, int]]) -> Tensor:
    """The keep-mask of the columns the sweep reaches, from their scores w²/U_jj² (columns, rows): the N highest of
    the group's M members per row (N:M), or the lowest of the columns over the rows of each layer go (unstructured)."""
    if target.is_nm:
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, scores.topk(target.n, dim=0).indices, True)
    return torch.cat([mask_lowest_overall(scores[:, first:last], target.sparsity) for first, last in layers], dim=1)


def scales_to_fill(work: Tensor, grid: QuantGrid, blocksize: int, inner: int) -> Tensor:
    """The (groups, rows) scales the sweep fills as it reaches each group (one scale per row, from the whole row, is
    taken now)."""
    check_grid(grid, blocksize, inner)
    columns, rows = work.shape
    scale_rows = torch.empty(columns // (grid.group_size or columns), rows, device=work.device)
    if grid.group_size is None:
        scale_rows[0] = scales(work.T, grid)
    return scale_rows


def check_grid(grid: QuantGrid | None, blocksize: int, inner: int) -> None:
    """A group's scales are taken when the sweep reaches its first column, from weights that must all have received
    every earlier column's update then: groups must tile the lazy blocks and start on inner-block boundaries."""
    if grid is None or grid.group_size is None:
        return
    if blocksize % grid.group_size or grid.group_size % inner:
        raise PruningError(f"group size {grid.group_size} must divide the sweep's blocksize ({blocksize}) and be a multiple of {inner}")


METHOD = Method(
    name="sparsegpt",
    summary="adaptive-mask OBS sweeps over the Cholesky factor of H⁻¹, with weight updates",
    prune=prune,
    statistic=HESSIAN,
    options=(
        MethodOption("blocksize", BLOCKSIZE, "lazy-update block: columns swept before the rest of the layer is updated"),
        MethodOption("mask_blocksize", MASK_BLOCKSIZE, "adaptive-mask block: columns whose mask is chosen together"),
        MethodOption("percdamp", DEFAULT_PERCDAMP, PERCDAMP_HELP),
    ),
    check=check_options,
    notes=damping_notes,
    prune_together=prune_together,
    quantizes=True,
)
