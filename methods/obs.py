"""Exact Optimal Brain Surgeon (Hassibi & Stork, 1993), row by row: greedy removal with the exact update and H⁻¹ downdate."""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import HESSIAN, LayerResult, Method, MethodOption, PruningError, Target, exact_matmul, prune_count
from methods.hessian import DEFAULT_PERCDAMP, PERCDAMP_HELP, check_percdamp, damped_inverse, damping_notes, inverse_details

ROW_BATCH_ELEMENTS = 2**25  # rows processed together: rows x inputs x inputs (each row's own H⁻¹) stays below this
COMPACT_FRACTION = 0.25  # compact the rows' inverses once this fraction of their width is removed (each compaction moves about 1.5 blocks' worth)
DOWNDATE_BLOCK = 64  # downdates held in factored form before they are applied to each row's H⁻¹ in one matrix product


def work(rows: int, columns: int, target: Target) -> float:
    """Floating-point operations of pruning a (rows, columns) layer to `target`.

    Each block of B downdates costs 2 · rows · B · w² at the width w the rows' inverses have then (about
    (2/3) · rows · (d³ − (d − k)³) in all, against 2 · rows · k · d² without compaction), plus moving the
    inverses at each compaction.
    """
    removals = columns * (target.m - target.n) // target.m if target.is_nm else prune_count(columns, target.sparsity)
    total, width, compacted_at = 0.0, columns, 0
    for step in range(DOWNDATE_BLOCK, removals, DOWNDATE_BLOCK):
        if compacts(step, compacted_at, width):
            total += rows * width * width  # the move, counted as one operation per element
            width, compacted_at = columns - step, step
        total += 2.0 * rows * DOWNDATE_BLOCK * width * width
    return total


def compacts(step: int, compacted_at: int, width: int) -> bool:
    """Whether the rows' inverses are compacted before the downdates of `step`: once a quarter of their width is gone."""
    return step - compacted_at >= COMPACT_FRACTION * width


def check_options(target: Target, percdamp: float = DEFAULT_PERCDAMP) -> None:
    """Raise PruningError when the damping cannot work."""
    check_percdamp(percdamp)


def prune(weight: Tensor, hessian: Tensor, target: Target, *, percdamp: float = DEFAULT_PERCDAMP) -> LayerResult:
    """Prune each row of `weight` (out, in) to `target` by exact greedy OBS, given H = (2/n) X Xᵀ (in, in).

    Per row, repeatedly: remove the weight with the smallest w_j² / [H⁻¹]_jj, update the remaining
    weights by w ← w − (w_j / [H⁻¹]_jj) H⁻¹[j, :] (the pruning deep-dive, Eq. 3), and downdate H⁻¹ by the rank-one
    Schur step H⁻¹ ← H⁻¹ − H⁻¹[:, j] H⁻¹[j, :] / [H⁻¹]_jj, until the row holds its quota. For N:M, a
    group stops losing weights once it holds N. Each row keeps its own H⁻¹; the downdates v_s v_sᵀ are
    held in factored form for up to `DOWNDATE_BLOCK` steps (the needed row of H⁻¹ is then
    H⁻¹[j, :] − Σ_s v_s[j] v_s) and applied together as one rank-B matrix product, and many rows are
    processed at once as batched tensor operations.
    """
    rows, columns = weight.shape
    target.check_layer("weight", columns)
    if hessian.shape != (columns, columns):
        raise PruningError(f"Hessian shape {tuple(hessian.shape)} does not match weight inputs {columns}")
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    device = weight.device
    with exact_matmul():
        inverse = damped_inverse(hessian, percdamp)
        hinv = inverse.inverse.to(device=device, dtype=dtype)
        work_weight = weight.detach().to(dtype).clone()
        work_weight[:, inverse.dead.to(device)] = 0
        removals = columns * (target.m - target.n) // target.m if target.is_nm else prune_count(columns, target.sparsity)
        row_batch = max(1, ROW_BATCH_ELEMENTS // (columns * columns))
        mask = torch.ones_like(work_weight, dtype=torch.bool)
        loss = 0.0
        for start in range(0, rows, row_batch):
            stop = min(start + row_batch, rows)
            block_loss = _prune_rows(work_weight[start:stop], mask[start:stop], hinv, removals, target, DOWNDATE_BLOCK)
            loss += block_loss
    return LayerResult(weight=(work_weight * mask).to(weight.dtype), mask=mask, loss=loss, details=inverse_details(inverse))


def _prune_rows(weight: Tensor, mask: Tensor, hinv: Tensor, removals: int, target: Target, block: int = DOWNDATE_BLOCK) -> float:
    """Greedy OBS on a batch of rows, in place on `weight` (R, d) and `mask` (R, d); returns the summed OBS loss.

    The Schur downdate zeroes row and column j of H⁻¹, so a removed weight drops out of every later step: after each
    block of downdates, every row has removed the same number of weights, and the rows' inverses are compacted to the
    weights still present before the block is applied, once a quarter of their width is gone (`compacts`).
    """
    count, columns = weight.shape
    if removals == 0:
        return 0.0
    index = torch.arange(count, device=weight.device)
    present = torch.arange(columns, device=weight.device).expand(count, columns).clone()  # column of each compact position
    values = weight.clone()  # the rows' weights at their present columns
    inverses = hinv.expand(count, columns, columns).clone()  # each row's H⁻¹ on its present columns, but for the pending downdates
    pending = torch.empty(count, block, columns, device=weight.device, dtype=weight.dtype)  # their factors v_s
    diagonal = torch.diagonal(hinv).expand(count, columns).clone()  # diag of each row's current H⁻¹
    removed = torch.zeros(count, columns, device=weight.device, dtype=torch.bool)  # removed since the last compaction
    group_removed = torch.zeros(count, columns // target.m if target.is_nm else 0, device=weight.device, dtype=torch.long)
    loss = torch.zeros((), device=weight.device, dtype=weight.dtype)
    compacted_at = 0
    for step in range(removals):
        held = step % block
        if held == 0 and step > 0:
            if compacts(step, compacted_at, values.shape[1]):
                present, values, diagonal, pending, inverses = _compacted(~removed, present, values, diagonal, pending, inverses)
                removed, compacted_at = torch.zeros_like(values, dtype=torch.bool), step
            inverses.baddbmm_(pending.transpose(1, 2), pending, alpha=-1.0)  # H⁻¹ ← H⁻¹ − Σ_s v_s v_sᵀ
        blocked = removed | _in_full_groups(group_removed, present, target) if target.is_nm else removed
        chosen = (values**2 / diagonal).masked_fill(blocked, float("inf")).argmin(dim=1)
        current_row = inverses[index, chosen]  # row j of the current inverse: H⁻¹[j, :] − Σ_pending v_s[j] v_s
        if held:
            recent = pending[:, :held, :]
            current_row -= torch.bmm(recent.gather(2, chosen.view(-1, 1, 1).expand(-1, held, 1)).transpose(1, 2), recent).squeeze(1)
        pivot = current_row[index, chosen]  # [H⁻¹]_jj
        dropped = values[index, chosen]
        loss += (dropped**2 / pivot).sum() / 2
        values -= (dropped / pivot).unsqueeze(1) * current_row  # Eq. 3
        values[index, chosen] = 0.0
        factor = current_row / pivot.sqrt().unsqueeze(1)
        pending[:, held, :] = factor
        diagonal -= factor**2
        removed[index, chosen] = True
        if target.is_nm:
            group_removed[index, present[index, chosen] // target.m] += 1
    mask.zero_().scatter_(1, present, ~removed)
    weight.zero_().scatter_(1, present, values.masked_fill(removed, 0.0))
    return loss.item()


def _in_full_groups(group_removed: Tensor, present: Tensor, target: Target) -> Tensor:
    """Which compact positions lie in an N:M group that has already lost its M − N weights."""
    return (group_removed == target.m - target.n).gather(1, present // target.m)


def _compacted(keep: Tensor, present: Tensor, values: Tensor, diagonal: Tensor, pending: Tensor, inverses: Tensor) -> tuple[Tensor, ...]:
    """The per-row state restricted to the positions in `keep` (R, d), which holds the same count in every row."""
    count = keep.shape[0]
    positions = keep.nonzero()[:, 1].view(count, -1)  # row-major, so each row's kept positions in order
    width = positions.shape[1]
    compact_inverses = inverses.new_empty(count, width, width)
    for row in range(count):  # two index_selects per row move the memory faster than two batched gathers
        torch.index_select(inverses[row].index_select(0, positions[row]), 1, positions[row], out=compact_inverses[row])
    return (
        present.gather(1, positions),
        values.gather(1, positions),
        diagonal.gather(1, positions),
        pending.gather(2, positions.unsqueeze(1).expand(count, pending.shape[1], width)),
        compact_inverses,
    )


METHOD = Method(
    name="obs",
    summary="exact greedy Optimal Brain Surgeon per row; cost about 2 x rows x k x d², meant for small models or high sparsity",
    prune=prune,
    statistic=HESSIAN,
    options=(MethodOption("percdamp", DEFAULT_PERCDAMP, PERCDAMP_HELP),),
    check=check_options,
    work=work,
    notes=damping_notes,
)
