"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning by lazy OBS column sweeps over the Cholesky factor of H⁻¹."""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import LayerResult, PruningError, Target, exact_matmul, mask_lowest_overall, mask_top_n_of_m
from methods.hessian import damped_inverse


def check_options(target: Target, blocksize: int, mask_blocksize: int) -> None:
    """Raise PruningError when the block sizes cannot serve the target."""
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
    blocksize: int = 128,
    mask_blocksize: int = 64,
    percdamp: float = 0.01,
) -> LayerResult:
    """Prune `weight` (out, in) to `target`, updating the kept weights to compensate, given H = (2/n) X Xᵀ (in, in).

    The mask is chosen adaptively from the already-updated weights: for an unstructured target, the
    lowest w²/[U]_jj² of each block of `mask_blocksize` columns (across all rows) when the sweep reaches
    it; for N:M, the N highest of each group of M inputs of a row when the sweep reaches the group.
    """
    check_options(target, blocksize, mask_blocksize)
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

    pruned = (work * mask).to(weight.dtype)
    return LayerResult(
        weight=pruned,
        mask=mask,
        loss=loss,
        details={
            "percdamp": inverse.percdamp,
            "damping_retries": inverse.retries,
            "dead_inputs": int(inverse.dead.sum().item()),
        },
    )
