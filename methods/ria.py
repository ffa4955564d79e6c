"""RIA, relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024): prune by

    RIA_ij = (|W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a

the weight's share of its input channel's and of its output channel's absolute weight (relative importance, eq. 1),
times the input's activation norm to the power a (eq. 2; the paper's a = 0.5); no weight update. For an
unstructured target the scores are compared across the whole layer, as the paper's released code does by default
(its `per_outneuron` off), or within each output row as Wanda's are (`ria_per_row`); an N:M target compares the M
weights of each group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import COLUMN_NORMS, LayerResult, Method, MethodOption, PruningError, Target, mask_for_target

DEFAULT_POWER = 0.5  # a of eq. 2, the paper's choice for every model


def relative_importance(weight: Tensor) -> Tensor:
    """RI_ij = |W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik| (eq. 1) for a weight (out, in); a channel of zeros adds 0."""
    magnitude = weight.detach().abs().to(torch.float32)
    column_sums = magnitude.sum(dim=0, keepdim=True)  # Σ over the outputs fed by input j
    row_sums = magnitude.sum(dim=1, keepdim=True)  # Σ over the inputs of output i
    return magnitude / column_sums.clamp_min(torch.finfo(torch.float32).tiny) + magnitude / row_sums.clamp_min(torch.finfo(torch.float32).tiny)


def scores(weight: Tensor, column_norms: Tensor, activation_power: float = DEFAULT_POWER) -> Tensor:
    """RIA_ij = RI_ij · ‖X_j‖₂^a (eq. 2) for a weight (out, in) and the input norms (in,)."""
    norms = column_norms.to(device=weight.device, dtype=torch.float32)
    return relative_importance(weight) * norms.pow(activation_power).unsqueeze(0)


def prune(weight: Tensor, column_norms: Tensor, target: Target, *, activation_power: float = DEFAULT_POWER, ria_per_row: bool = False) -> LayerResult:
    """Prune `weight` (out, in) to `target` by the lowest RIA scores of the layer (of each row with `ria_per_row`;
    N:M: the N highest of every M).

    ‖X_j‖₂ may be taken over the tokens as a mean or a sum: the two differ by one factor for all j, which no
    comparison sees. The loss reported is Wanda's diagonal estimate of the output error, Σ w_ij² ‖X_j‖₂² over the
    removed weights, so that the two methods' losses compare.
    """
    rows, columns = weight.shape
    if column_norms.shape != (columns,):
        raise PruningError(f"column norms shape {tuple(column_norms.shape)} does not match weight inputs {columns}")
    target.check_layer("weight", columns)
    check(target, activation_power, ria_per_row)
    mask = mask_for_target(scores(weight, column_norms, activation_power), target, per_row=ria_per_row)
    output_error = weight.detach().to(torch.float32) * column_norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)
    return LayerResult(weight=weight.detach() * mask, mask=mask, loss=(output_error[~mask] ** 2).sum().item())


def check(target: Target, activation_power: float = DEFAULT_POWER, ria_per_row: bool = False) -> None:
    """The exponent must be a finite number of at least 0 (0: relative importance alone, no activations); the
    comparison scope is a switch."""
    if not (0.0 <= activation_power < float("inf")):
        raise PruningError(f"the activation power a must be a finite number >= 0, got {activation_power:g}")
    if not isinstance(ria_per_row, bool):
        raise PruningError(f"ria_per_row is a switch (true: compare within each output row, false: across the layer), got {ria_per_row!r}")


METHOD = Method(
    name="ria",
    summary="lowest relative importance (|W| over its row's and column's sums) times ‖X‖^a in the layer; no weight update",
    prune=prune,
    statistic=COLUMN_NORMS,
    options=(
        MethodOption("activation_power", DEFAULT_POWER, "a: RIA's exponent of the activation norm ‖X_j‖₂^a (0: weights alone)"),
        MethodOption("ria_per_row", False, "compare RIA scores within each output row (Wanda's grouping) instead of across the whole "
                     "layer (the RIA paper's code)"),
    ),
    check=check,
)
