"""Quantization by the OBS rule for any one-shot method: GPTQ (Frantar et al., 2023) on the weights a method keeps.

A method that rounds inside its own sweep (`Method.quantizes`: SparseGPT's joint sparsification and quantization)
gets the grid as an option; any other is run first, then its kept weights are quantized column by column with the
inverse-Hessian error feedback, its pruned weights held at zero. Both need the layer Hessian; a method built on the
column norms gets them from its diagonal (‖X_j‖₂² = mean x_j² = H_jj / 2)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from methods.base import COLUMN_NORMS, HESSIAN, LayerResult, Method, Target
from methods.quantize import QuantGrid
from methods.sparsegpt import quantize_kept


def column_norms_of(hessian: Tensor) -> Tensor:
    """‖X_j‖₂ = sqrt(H_jj / 2), for H = (2/n) Σ x xᵀ."""
    return torch.sqrt(torch.diagonal(hessian) / 2)


def statistic_for(method: Method, hessian: Tensor) -> Tensor | None:
    """The statistic the method takes, from the layer Hessian collected for quantization."""
    return {HESSIAN: hessian, COLUMN_NORMS: column_norms_of(hessian) if method.statistic == COLUMN_NORMS else None}.get(method.statistic)


def prune_and_quantize(method: Method, weights: list[Tensor], hessian: Tensor, target: Target, options: dict,
                       grid: QuantGrid) -> list[LayerResult]:
    """The layers fed one input pruned to `target` by `method` and rounded to `grid`: in one sweep when the method
    can, else pruned, then GPTQ on the kept weights (the loss is the sum of both steps' estimates)."""
    if method.quantizes:
        return method.run_together(weights, hessian, target, {**options, "grid": grid})
    pruned = method.run_together(weights, statistic_for(method, hessian), target, options)
    quantized = quantize_kept([result.weight for result in pruned], [result.mask for result in pruned], hessian, grid)
    return [LayerResult(weight=after.weight, mask=before.mask, loss=before.loss + after.loss, details={**after.details, **before.details},
                        scale=after.scale) for before, after in zip(pruned, quantized, strict=True)]


def quantized(method: Method, grid: QuantGrid) -> Method:
    """`method` that also rounds the weights it keeps to `grid` (prune_and_quantize): the same name, options, checks
    and notes; its statistic is the layer Hessian, from which the method's own is taken."""

    def prune_together(weights: list[Tensor], hessian: Tensor, target: Target, **options) -> list[LayerResult]:
        return prune_and_quantize(method, weights, hessian, target, options, grid)

    def prune(weight: Tensor, hessian: Tensor, target: Target, **options) -> LayerResult:
        return prune_together([weight], hessian, target, **options)[0]

    return dataclasses.replace(method, summary=f"{method.summary}, then rounded to {grid.describe()}", prune=prune,
                               prune_together=prune_together, statistic=HESSIAN, gradients=None)
