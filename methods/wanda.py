"""Wanda (Sun et al., 2024): prune by |W_ij| · ‖X_j‖₂, compared within each output row, no weight update."""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import COLUMN_NORMS, LayerResult, Method, PruningError, Target, mask_for_target


def scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """Wanda saliency |W_ij| · ‖X_j‖₂ for a weight (out, in) and the input norms (in,)."""
    return weight.detach().abs().to(torch.float32) * column_norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def prune(weight: Tensor, column_norms: Tensor, target: Target) -> LayerResult:
    """Prune `weight` (out, in) to `target` given ‖X_j‖₂ = sqrt(mean over tokens of x_j²) per input.

    The loss is the diagonal estimate of the mean squared output error, Σ w_ij² ‖X_j‖₂².
    """
    rows, columns = weight.shape
    if column_norms.shape != (columns,):
        raise PruningError(f"column norms shape {tuple(column_norms.shape)} does not match weight inputs {columns}")
    target.check_layer("weight", columns)
    saliency = scores(weight, column_norms)
    mask = mask_for_target(saliency, target, per_row=True)
    loss = (saliency[~mask] ** 2).sum().item()
    return LayerResult(weight=weight.detach() * mask, mask=mask, loss=loss)


METHOD = Method(name="wanda", summary="smallest |W|·‖X‖ per output row; no weight update", prune=prune, statistic=COLUMN_NORMS)
