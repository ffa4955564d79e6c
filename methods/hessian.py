"""The layer Hessian H = (2/n) X Xᵀ made ready for second-order pruning: dead inputs, damping, inverses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from methods.base import PruningError

DAMPING_RETRIES = 4  # each retry multiplies the damping by ten
DEFAULT_PERCDAMP = 0.01  # λ = percdamp · mean(diag H), the SparseGPT paper's
PERCDAMP_HELP = "damping added to diag H before inverting it, as a fraction of mean(diag H)"


@dataclass
class DampedInverse:
    """H⁻¹ of a damped Hessian, with how much damping it took."""

    inverse: Tensor  # H⁻¹ (symmetric), or its upper Cholesky factor when requested
    dead: Tensor  # bool per input: the input never fired (H_jj == 0)
    percdamp: float  # damping finally used, relative to mean(diag H)
    retries: int  # how many times the damping had to be raised by 10x


def dead_inputs(hessian: Tensor) -> Tensor:
    """Inputs that never fired during calibration (H_jj == 0)."""
    return torch.diagonal(hessian) == 0


def check_percdamp(percdamp: float) -> None:
    """Damping must be a fraction >= 0 of mean(diag H)."""
    if not percdamp >= 0:
        raise PruningError(f"damping must be >= 0, got {percdamp:g}")


def damping_notes(details: dict) -> list[str]:
    """What `damped_inverse` had to do, as report notes (from a LayerResult's details)."""
    notes = []
    if details.get("damping_retries"):
        notes.append(f"Cholesky failed; damping raised to {details['percdamp']:g} after {details['damping_retries']} retries")
    if details.get("dead_inputs"):
        notes.append(f"{details['dead_inputs']} dead inputs zeroed")
    return notes


def inverse_details(inverse: DampedInverse) -> dict:
    """The facts of a damped inverse worth reporting, for LayerResult.details."""
    return {"percdamp": inverse.percdamp, "damping_retries": inverse.retries, "dead_inputs": int(inverse.dead.sum().item())}


def damped_inverse(hessian: Tensor, percdamp: float = DEFAULT_PERCDAMP, *, upper_cholesky: bool = False) -> DampedInverse:
    """Invert H + λI with λ = percdamp · mean(diag H), dead inputs given H_jj = 1.

    If the Cholesky factorisation fails, the damping is raised tenfold up to DAMPING_RETRIES times;
    a Hessian that still cannot be factorised raises PruningError. With `upper_cholesky`, return the
    upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), as SparseGPT uses it.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise PruningError(f"a Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise PruningError("the Hessian has non-finite entries (NaN or inf in the calibration activations)")
    check_percdamp(percdamp)
    dead = dead_inputs(hessian)
    attempt = hessian.clone()
    diagonal = torch.diagonal(attempt)
    diagonal[dead] = 1.0
    mean_diagonal = diagonal.mean().item()
    diagonal = diagonal.clone()
    damping = percdamp
    for retry in range(DAMPING_RETRIES + 1):  # at most two d x d matrices besides `hessian` at any time
        if retry:
            attempt = hessian.clone()
        torch.diagonal(attempt).copy_(diagonal).add_(damping * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(attempt)
        del attempt
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            if not upper_cholesky:
                return DampedInverse(inverse, dead, damping, retry)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0:
                return DampedInverse(upper, dead, damping, retry)
        damping = max(damping, 1e-8) * 10
    raise PruningError(
        f"the Hessian is singular: Cholesky failed even with damping {damping / 10:g} x mean(diag H) "
        f"(too few calibration tokens for this layer's {hessian.shape[0]} inputs?)"
    )
