"""Movement pruning (Sanh et al., 2020; the pruning deep-dive §6): a score S per weight, trained with the straight-through
gradient ∂L/∂S_ij := ∂L/∂M_ij = (∂L/∂y_i) W_ij x_j while the layer computes y = (W ⊙ M) x.

Hard: M keeps the top (1 − s) of S in a layer, s following the cubic schedule. Soft: M = 1[S > τ], the sparsity
pushed by the penalty λ_mvp Σ σ(S). Pure functions and two autograd functions; the training loop is the caller's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import PruningError, prune_count
from methods.schedules import cubic_sparsity

__all__ = ["cubic_sparsity", "hard_mask", "masked_weight", "soft_mask", "soft_penalty"]


class _TopKMask(torch.autograd.Function):
    """1 for the highest scores of the tensor (all but round(size · sparsity)), 0 elsewhere; the gradient passes
    straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, sparsity: float) -> Tensor:
        flat = scores.reshape(-1)
        mask = torch.ones_like(flat)
        removed = prune_count(flat.numel(), sparsity)
        if removed:
            mask[torch.topk(flat, removed, largest=False, sorted=False).indices] = 0
        return mask.reshape(scores.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ThresholdMask(torch.autograd.Function):
    """1[S > τ]; the gradient passes straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def hard_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Hard movement mask: keep the top (1 − `sparsity`) of a layer's scores (straight-through)."""
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity:g}")
    return _TopKMask.apply(scores, sparsity)


def soft_mask(scores: Tensor, threshold: float) -> Tensor:
    """Soft movement mask: keep the weights whose score exceeds τ (straight-through)."""
    return _ThresholdMask.apply(scores, threshold)


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """W ⊙ M: what the layer computes with, so that ∂L/∂M_ij = (∂L/∂y_i) W_ij x_j summed over tokens."""
    return weight * mask


def soft_penalty(scores: list[Tensor], strength: float) -> Tensor:
    """λ_mvp Σ_l Σ_ij σ(S^l_ij): drives the scores down, and so the soft variant's sparsity up."""
    return strength * sum(torch.sigmoid(layer).sum() for layer in scores)
