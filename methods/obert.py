"""oBERT, the Optimal BERT Surgeon (Kurtic et al., 2022; the pruning deep-dive §7): OBS on the flattened weight of a layer with
the Hessian replaced by the empirical Fisher of the task loss, F = λI + (1/m) Σ_q ∇l_q ∇l_qᵀ (seed Eq. 8), kept as
the inverses of its B x B diagonal blocks and built from m per-sample gradients by Woodbury updates (§7.4).

Pure functions on tensors: the gradients come from the caller (a task loss, a backward pass per sample). Precision:
the Woodbury steps subtract nearly equal numbers while ‖g‖²/λ dwarfs m, so float32 blocks are only as good as the
gradients are small (fine at per-sample scales of 1e-3 with λ = 1e-7; 40 % off at scale 1); float64 is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from methods.base import (
    FISHER,
    GradientStatistic,
    LayerResult,
    Method,
    MethodOption,
    PruningError,
    Target,
    mask_lowest_overall,
    mask_top_n_of_m,
)

DEFAULT_BLOCK = 50  # B: consecutive weights of the flattened layer per Fisher block (the paper's 50)
DEFAULT_GRADS = 1024  # m: per-sample gradients the Fisher is built from
DEFAULT_DAMP = 1e-7  # λ: F₀ = λI, so F₀⁻¹ = (1/λ) I
GRADIENT_BATCH = 16  # gradients per Woodbury step of the blocks (the inverse is read once per step: memory-bound)


def block_count(size: int, block_size: int) -> int:
    """Number of Fisher blocks of a flattened weight of `size` entries (the last one padded)."""
    return math.ceil(size / block_size)


def inverse_memory_bytes(size: int, block_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the block-diagonal inverse of a `size`-entry weight takes: about B x the weight itself (seed §7.4)."""
    return block_count(size, block_size) * block_size * block_size * torch.finfo(dtype).bits // 8


def initial_inverse(size: int, block_size: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP, *, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """F₀⁻¹ = (1/λ) I as (S, B, B) diagonal blocks; entries past `size` (padding of the last block) stay decoupled."""
    if block_size < 1:
        raise PruningError(f"Fisher block size must be at least 1, got {block_size}")
    if not damp > 0:
        raise PruningError(f"Fisher damping λ must be positive, got {damp:g}")
    eye = torch.eye(block_size, device=device, dtype=dtype) / damp
    return eye.expand(block_count(size, block_size), block_size, block_size).clone()


def blocked(vector: Tensor, block_size: int) -> Tensor:
    """A flat vector as (S, B) blocks, zero-padded at the end."""
    padding = block_count(vector.numel(), block_size) * block_size - vector.numel()
    return torch.nn.functional.pad(vector.reshape(-1), (0, padding)).reshape(-1, block_size)


def add_gradient(inverse: Tensor, gradient: Tensor, count: int) -> None:
    """One Woodbury step of every block, in place (seed §7.4, block-local denominator):
    F⁻¹ ← F⁻¹ − (F⁻¹ g)(F⁻¹ g)ᵀ / (m + gᵀ F⁻¹ g), i.e. F ← F + (1/m) g gᵀ restricted to the block."""
    block_size = inverse.shape[-1]
    g = blocked(gradient.to(inverse.dtype), block_size)
    projected = torch.bmm(inverse, g.unsqueeze(-1)).squeeze(-1)  # F⁻¹ g per block, (S, B)
    denominator = count + (g * projected).sum(-1)  # m + gᵀ F⁻¹ g per block, (S,)
    inverse.baddbmm_(projected.unsqueeze(-1), (projected / denominator.unsqueeze(-1)).unsqueeze(1), alpha=-1.0)


def add_gradients(inverse: Tensor, gradients: Tensor, count: int) -> None:
    """k Woodbury steps of every block at once, in place: F ← F + (1/m) G Gᵀ for the k gradients G (k, size), by
    F⁻¹ ← F⁻¹ − F⁻¹G (m I + Gᵀ F⁻¹ G)⁻¹ Gᵀ F⁻¹ per block. In exact arithmetic the same as k calls of `add_gradient`,
    reading the (memory-bound) inverse once instead of k times."""
    block_size, k = inverse.shape[-1], gradients.shape[0]
    g = torch.stack([blocked(gradient.to(inverse.dtype), block_size) for gradient in gradients], dim=-1)  # (S, B, k)
    projected = torch.bmm(inverse, g)  # F⁻¹ G per block, (S, B, k)
    inner = torch.baddbmm(count * torch.eye(k, dtype=inverse.dtype, device=inverse.device), g.transpose(1, 2), projected)  # m I + Gᵀ F⁻¹ G
    inverse.baddbmm_(projected, torch.linalg.solve(inner, projected.transpose(1, 2)), alpha=-1.0)


def fisher_inverse(gradients: Tensor, block_size: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP) -> Tensor:
    """Block-diagonal inverse of F = λI + (1/m) Σ g gᵀ from `gradients` (m, size): (S, B, B), one Woodbury step per gradient."""
    count, size = gradients.shape
    inverse = initial_inverse(size, block_size, damp, device=gradients.device, dtype=gradients.dtype)
    for gradient in gradients:
        add_gradient(inverse, gradient, count)
    return inverse


def inverse_diagonal(inverse: Tensor, size: int) -> Tensor:
    """[F⁻¹]_jj for the first `size` entries, flat."""
    return torch.diagonal(inverse, dim1=-2, dim2=-1).reshape(-1)[:size]


def saliency(weight: Tensor, inverse: Tensor) -> Tensor:
    """ρ_j = w_j² / (2 [F⁻¹]_jj) for every weight (seed §7.5, the OBS saliency), shaped like `weight`."""
    diagonal = inverse_diagonal(inverse, weight.numel()).reshape(weight.shape)
    return weight.to(inverse.dtype).pow(2) / (2 * diagonal)


def select_mask(scores: Tensor, target: Target) -> Tensor:
    """Keep-mask from saliencies: the lowest across the whole layer (oBERT ranks a layer's weights together, not per
    row); for N:M, the N highest of every M consecutive inputs of a row."""
    if target.is_nm:
        return mask_top_n_of_m(scores, target.n, target.m)
    return mask_lowest_overall(scores, target.sparsity)


def update(weight: Tensor, inverse: Tensor, mask: Tensor) -> Tensor:
    """The remaining weights after removing those outside `mask` (seed §7.5):
    w ← w − F⁻¹ diag(F⁻¹)⁻¹ (w ⊙ (1 − M)), block by block, and the removed ones set to zero."""
    block_size = inverse.shape[-1]
    removed = blocked(weight.to(inverse.dtype) * ~mask, block_size)
    diagonal = torch.diagonal(inverse, dim1=-2, dim2=-1)
    change = torch.bmm(inverse, (removed / diagonal).unsqueeze(-1)).squeeze(-1)
    updated = weight.to(inverse.dtype) - change.reshape(-1)[: weight.numel()].reshape(weight.shape)
    return (updated * mask).to(weight.dtype)


def prune(weight: Tensor, inverse: Tensor, target: Target, *, mask: Tensor | None = None) -> LayerResult:
    """Prune `weight` (out, in) to `target` given the block-diagonal inverse Fisher of its flattened entries.

    `mask` overrides the selection (e.g. a threshold chosen across layers). The loss is oBERT's estimate of the
    loss increase, Σ over removed weights of w_j² / (2 [F⁻¹]_jj).
    """
    rows, columns = weight.shape
    if inverse.dim() != 3 or inverse.shape[1] != inverse.shape[2] or inverse.shape[0] != block_count(weight.numel(), inverse.shape[-1]):
        raise PruningError(f"Fisher inverse shape {tuple(inverse.shape)} does not fit a weight of {weight.numel()} entries")
    target.check_layer("weight", columns)
    scores = saliency(weight.detach(), inverse)
    if mask is None:
        mask = select_mask(scores, target)
    loss = scores[~mask].sum().item()
    return LayerResult(weight=update(weight.detach(), inverse, mask), mask=mask, loss=loss,
                       details={"fisher_block": inverse.shape[-1]})


def check_options(target: Target, obert_block: int = DEFAULT_BLOCK, obert_grads: int = DEFAULT_GRADS, obert_damp: float = DEFAULT_DAMP,
                  obert_epochs: int = 1, obert_global: bool = False) -> None:
    """Raise PruningError for options that cannot work."""
    for what, value in (("Fisher block size", obert_block), ("Fisher gradient count", obert_grads), ("number of pruning epochs", obert_epochs)):
        if value < 1:
            raise PruningError(f"the {what} must be at least 1, got {value}")
    if not obert_damp > 0:
        raise PruningError(f"Fisher damping λ must be positive, got {obert_damp:g}")
    if not isinstance(obert_global, bool):
        raise PruningError(f"global ranking is a switch (true: all layers together, false: each layer alone), got {obert_global!r}")
    if target.is_nm and (obert_epochs > 1 or obert_global):
        raise PruningError(f"an N:M pattern is reached in one epoch, row by row: gradual or global ranking needs an unstructured target, not {target.pattern}")


def notes(details: dict) -> list[str]:
    return [f"Fisher blocks of {details['fisher_block']}"] if "fisher_block" in details else []


GRADIENTS = GradientStatistic(
    count_option="obert_grads",
    epochs_option="obert_epochs",
    ranking_option="obert_global",
    start=lambda weight, options, dtype: initial_inverse(weight.numel(), options["obert_block"], options["obert_damp"], device=weight.device, dtype=dtype),
    add=add_gradients,
    batch=GRADIENT_BATCH,
    memory_bytes=lambda size, options, dtype: inverse_memory_bytes(size, options["obert_block"], dtype),
    saliency=saliency,
    merge=None,  # each process holds (λI + its gradients)⁻¹ built by Woodbury steps: their inverses do not add up to the run's
)

METHOD = Method(
    name="obert",
    summary="OBS with the empirical Fisher of the task loss (blocks of B weights, Woodbury updates from per-sample gradients)",
    prune=prune,
    statistic=FISHER,
    options=(
        MethodOption("obert_block", DEFAULT_BLOCK, "consecutive weights per Fisher block; the inverse Fisher takes B times the memory of the "
                     "pruned weights (estimated, and refused if it does not fit, before the run)"),
        MethodOption("obert_grads", DEFAULT_GRADS, "per-sample task-loss gradients the Fisher is built from, one calibration sample each (a "
                     "window of the text, or a labelled sentence)"),
        MethodOption("obert_damp", DEFAULT_DAMP, "λ: the Fisher starts from λI"),
        MethodOption("obert_epochs", 1, "pruning epochs: 1 is one-shot; more prune gradually (sparsity rising on the cubic schedule, the "
                     "Fisher rebuilt on the pruned weights each time); recovery then fine-tunes the kept weights"),
        MethodOption("obert_global", False, "rank the weights of all pruned layers together (oBERT's global sparsity) instead of each layer alone"),
    ),
    check=check_options,
    notes=notes,
    gradients=GRADIENTS,
)
