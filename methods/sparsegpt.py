"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning by lazy OBS column sweeps over the Cholesky factor of H⁻¹."""

from __future__ import annotations

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
    mask_top_n_of_m,
)
from methods.hessian import DEFAULT_PERCDAMP, PERCDAMP_HELP, check_percdamp, damped_inverse, damping_notes, inverse_details

BLOCKSIZE = 128  # lazy-update block: columns swept before the rest of the layer is updated in one matrix product
MASK_BLOCKSIZE = 64  # adaptive-mask block: columns whose mask is chosen together (the seed study's)


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
) -> LayerResult:
    """Prune `weight` (out, in) to `target`, updating the kept weights to compensate, given H = (2/n) X Xᵀ (in, in).

    The mask is chosen adaptively from the already-updated weights: for an unstructured target, the
    lowest w²/[U]_jj² of each block of `mask_blocksize` columns (across all rows) when the sweep reaches
    it; for N:M, the N highest of each group of M inputs of a row when the sweep reaches the group.
    """
    check_options(target, blocksize, mask_blocksize, percdamp)
    rows, columns = weight.shape
    target.check_layer("weight", columns)
    if hessian.shape != (columns, columns):
        raise PruningError(f"Hessian shape {tuple(hessian.shape)} does not match weight inputs {columns}")

    with exact_matmul():
        inverse = damped_inverse(hessian, percdamp, upper_cholesky=True)
        hinv = inverse.inverse.to(device=weight.device, dtype=torch.float32)  # U, upper: H⁻¹ = UᵀU
        work = weight.detach().to(torch.float32).clone()
        work[:, inverse.dead.to(weight.device)] = 0
        mask = torch.ones_like(work, dtype=torch.bool)
        loss = 0.0

        for start in range(0, columns, blocksize):
            end = min(start + blocksize, columns)
            block = work[:, start:end].clone()
            block_mask = torch.ones_like(block, dtype=torch.bool)
            block_errors = torch.zeros_like(block)
            hinv_block = hinv[start:end, start:end]
            hinv_diagonal = torch.diagonal(hinv_block)

            for i in range(end - start):
                if target.is_nm:
                    if i % target.m == 0:
                        group = slice(i, i + target.m)
                        scores = block[:, group] ** 2 / hinv_diagonal[group] ** 2
                        block_mask[:, group] = mask_top_n_of_m(scores, target.n, target.m)
                elif i % mask_blocksize == 0:
                    part = slice(i, min(i + mask_blocksize, end - start))
                    scores = block[:, part] ** 2 / hinv_diagonal[part] ** 2
                    block_mask[:, part] = mask_lowest_overall(scores, target.sparsity)

                removed = block[:, i].masked_fill(block_mask[:, i], 0.0)
                # OBS update of the remaining columns of the block (SparseGPT Alg. 1): W[:, i:] -= (w/d) U[i, i:]
                error = removed / hinv_block[i, i]
                block[:, i:].addr_(error, hinv_block[i, i:], alpha=-1.0)
                block_errors[:, i] = error

            block.mul_(block_mask)  # the update leaves pruned weights at zero up to rounding: make it exact
            work[:, start:end] = block
            mask[:, start:end] = block_mask
            # the OBS loss of removing w_j is w_j² / (2 [U]_jj²) = error² / 2
            loss += block_errors.pow(2).sum().item() / 2
            # lazy batch update of all columns after the block, one matrix product
            work[:, end:] -= block_errors @ hinv[start:end, end:]

    return LayerResult(weight=(work * mask).to(weight.dtype), mask=mask, loss=loss, details=inverse_details(inverse))


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
)
