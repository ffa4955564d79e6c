"""OWL, outlier-weighted layerwise sparsity (Yin et al., 2024): blocks with more outliers keep more weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods import wanda
from methods.base import COLUMN_NORMS, PruningError

PROPORTIONAL_RULE = "proportional"  # S_ℓ ∝ 1 − D_ℓ (the pruning deep-dive, section 4)
LAMBDA_RULE = "lambda"  # the OWL paper's code
CLIPPED_RULE = "lambda-clipped"  # this toolkit's earlier reading of it: clipped to S ± λ, re-centred by bisection
RULES = (LAMBDA_RULE, CLIPPED_RULE, PROPORTIONAL_RULE)
STATISTIC = COLUMN_NORMS  # outliers are counted among the Wanda scores |W|·‖X‖
DEFAULT_M = 5.0  # a score is an outlier above M x the block's mean (the OWL paper's)
DEFAULT_LAMBDA = 0.08  # block sparsities span S ± λ (the OWL paper's)


def outlier_ratio(scores: Sequence[Tensor], threshold: float) -> float:
    """D = fraction of the Wanda scores |W|·‖X‖ of a block's layers greater than `threshold` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return (flat > threshold * flat.mean()).float().mean().item()


def block_outlier_ratio(weights: Sequence[Tensor], column_norms: Sequence[Tensor], threshold: float) -> float:
    """D of a block from its layers' (out, in) weights and the ‖X_j‖₂ of their inputs."""
    return outlier_ratio([wanda.scores(weight, norms) for weight, norms in zip(weights, column_norms, strict=True)], threshold)


def check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise PruningError(f"the outlier threshold M must be positive, got {threshold:g}")


def check_lambda(sparsity: float, lam: float) -> None:
    """λ must keep S ± λ inside [0, 1]."""
    if not 0 <= lam <= min(sparsity, 1 - sparsity):
        raise PruningError(f"λ must be in [0, min(S, 1 - S)] = [0, {min(sparsity, 1 - sparsity):g}] for sparsity {sparsity:g}, got {lam:g}")


def weighted_mean(values: Tensor, weights: Tensor) -> float:
    return ((values * weights).sum() / weights.sum()).item()


def allocate_proportional(ratios: Sequence[float], parameters: Sequence[int], sparsity: float) -> list[float]:
    """The pruning deep-dive, section 4: S_ℓ = α (1 − D_ℓ), α chosen so that Σ P_ℓ S_ℓ / Σ P_ℓ = S."""
    outliers = torch.tensor(ratios, dtype=torch.float64)
    weights = torch.tensor(parameters, dtype=torch.float64)
    scale = sparsity * weights.sum() / (weights * (1 - outliers)).sum()
    allocation = scale * (1 - outliers)
    if (allocation >= 1).any():
        raise PruningError(f"OWL (proportional rule) would give a block sparsity of {allocation.max().item():.3f} >= 1; lower the target")
    return allocation.tolist()


def scaled_ratios(ratios: Sequence[float], parameters: Sequence[int], sparsity: float, lam: float) -> tuple[Tensor | None, Tensor]:
    """What both lambda rules start from: D scaled linearly to [0, 2λ] (None when λ = 0 or D does not vary: the
    allocation is then uniform), and the blocks' parameter counts as weights."""
    check_lambda(sparsity, lam)
    outliers = torch.tensor(ratios, dtype=torch.float64)
    weights = torch.tensor(parameters, dtype=torch.float64)
    spread = outliers.max() - outliers.min()
    if lam == 0 or spread == 0:
        return None, weights
    return (outliers - outliers.min()) / spread * 2 * lam, weights


def allocate_lambda(ratios: Sequence[float], parameters: Sequence[int], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """The OWL paper's code: D scaled linearly to [0, 2λ], then shifted so that its mean is 0; block ℓ keeps a
    fraction (1 − S) + (scaled_ℓ − mean) of its weights, i.e. S_ℓ = S − (scaled_ℓ − mean). No clipping: with skewed
    ratios a block can move by up to 2λ (D = [0, 0, 0, 1] gives S + λ/2 three times and S − 3λ/2). The mean is
    parameter-weighted (the code's plain mean for blocks of equal size), so the model's sparsity is S."""
    scaled, weights = scaled_ratios(ratios, parameters, sparsity, lam)
    if scaled is None:
        return [sparsity] * len(ratios)
    allocation = sparsity - (scaled - weighted_mean(scaled, weights))
    if allocation.min() < 0 or allocation.max() >= 1:
        raise PruningError(f"OWL (lambda rule) would give a block sparsity of {allocation.min().item():.3f} .. {allocation.max().item():.3f}, "
                           "outside [0, 1); lower λ")
    return allocation.tolist()


def allocate_clipped(ratios: Sequence[float], parameters: Sequence[int], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """A variant of the OWL rule: D scaled to [0, 2λ], centred, block sparsity clipped to [S − λ, S + λ], the centre
    found by bisection so that the parameter-weighted mean sparsity equals S after clipping."""
    scaled, weights = scaled_ratios(ratios, parameters, sparsity, lam)
    if scaled is None:
        return [sparsity] * len(ratios)

    def allocation(shift: float) -> Tensor:
        return (sparsity + shift - scaled).clamp(sparsity - lam, sparsity + lam)

    low, high = -2 * lam, 4 * lam  # the weighted mean of allocation(shift) grows with shift from S − λ to S + λ
    for _ in range(200):
        middle = (low + high) / 2
        if weighted_mean(allocation(middle), weights) < sparsity:
            low = middle
        else:
            high = middle
    return allocation((low + high) / 2).tolist()


def allocate(rule: str, ratios: Sequence[float], parameters: Sequence[int], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-block sparsities whose parameter-weighted mean is `sparsity`, by the OWL code's lambda rule, its clipped
    variant, or the proportional rule."""
    if rule == PROPORTIONAL_RULE:
        return allocate_proportional(ratios, parameters, sparsity)
    if rule == LAMBDA_RULE:
        return allocate_lambda(ratios, parameters, sparsity, lam)
    if rule == CLIPPED_RULE:
        return allocate_clipped(ratios, parameters, sparsity, lam)
    raise PruningError(f"unknown OWL rule {rule!r}: choose {', '.join(RULES)}")
