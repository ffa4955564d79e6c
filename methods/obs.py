"""Exact Optimal Brain Surgeon (Hassibi & Stork, 1993), row by row: greedy removal with the exact update and H⁻¹ downdate."""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import HESSIAN, LayerResult, Method, MethodOption, PruningError, Target, exact_matmul, prune_count
from methods.hessian import DEFAULT_PERCDAMP, PERCDAMP_HELP, check_percdamp, damped_inverse, damping_notes, inverse_details

ROW_BATCH_ELEMENTS = 2**25  # rows processed together: rows x inputs x inputs (each row's own H⁻¹) stays below this
DOWNDATE_BLOCK = 64  # downdates held in factored form before they are applied to each row's H⁻¹ in one matrix product


def work(rows: int, columns: int, target: Target) -> float:
    """Floating-point operations of pruning a (rows, columns) layer to `target`: about 2 · rows · k · d².

    Each of a row's k removals costs one rank-one downdate of its d x d inverse (2 d² operations), applied
    in blocks as matrix products.
    """
    removals = columns * (target.m - target.n) // target.m if target.is_nm else prune_count(columns, target.sparsity)
    return 2.0 * rows * removals * columns * columns


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
            block_loss = _prune_rows(work_weight[start:stop], mask[start:stop], hinv, removals, target)
            loss += block_loss
    return LayerResult(weight=(work_weight * mask).to(weight.dtype), mask=mask, loss=loss, details=inverse_details(inverse))


def _prune_rows(weight: Tensor, mask: Tensor, hinv: Tensor, removals: int, target: Target, block: int = DOWNDATE_BLOCK) -> float:
    """Greedy OBS on a batch of rows, in place on `weight` (R, d) and `mask` (R, d); returns the summed OBS loss."""
    count, columns = weight.shape
    if removals == 0:
        return 0.0
    index = torch.arange(count, device=weight.device)
    inverses = hinv.expand(count, columns, columns).clone()  # each row's H⁻¹, but for the pending downdates
    pending = torch.empty(count, block, columns, device=weight.device, dtype=weight.dtype)  # their factors v_s
    diagonal = torch.diagonal(hinv).expand(count, columns).clone()  # diag of each row's current H⁻¹
    blocked = torch.zeros(count, columns, device=weight.device, dtype=torch.bool)  # removed, or in a full N:M group
    if target.is_nm:
        group_removed = torch.zeros(count, columns // target.m, device=weight.device, dtype=torch.long)
    loss = torch.zeros((), device=weight.device, dtype=weight.dtype)
    for step in range(removals):
        held = step % block
        if held == 0 and step > 0:
            inverses.baddbmm_(pending.transpose(1, 2), pending, alpha=-1.0)  # H⁻¹ ← H⁻¹ − Σ_s v_s v_sᵀ
        scores = (weight**2 / diagonal).masked_fill(blocked, float("inf"))
        chosen = scores.argmin(dim=1)
        current_row = inverses[index, chosen]  # row j of the current inverse: H⁻¹[j, :] − Σ_pending v_s[j] v_s
        if held:
            recent = pending[:, :held, :]
            current_row -= torch.bmm(recent.gather(2, chosen.view(-1, 1, 1).expand(-1, held, 1)).transpose(1, 2), recent).squeeze(1)
        pivot = current_row[index, chosen]  # [H⁻¹]_jj
        removed = weight[index, chosen]
        loss += (removed**2 / pivot).sum() / 2
        weight -= (removed / pivot).unsqueeze(1) * current_row  # Eq. 3
        weight[index, chosen] = 0.0
        factor = current_row / pivot.sqrt().unsqueeze(1)
        pending[:, held, :] = factor
        diagonal -= factor**2
        blocked[index, chosen] = True
        mask[index, chosen] = False
        if target.is_nm:
            groups = chosen // target.m
            group_removed[index, groups] += 1
            full = group_removed[index, groups] == target.m - target.n
            if full.any():
                rows_full = index[full]
                starts = groups[full] * target.m
                for offset in range(target.m):
                    blocked[rows_full, starts + offset] = True
    return loss.item()


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
