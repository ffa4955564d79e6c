"""ALPS (Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large
Language Models", NeurIPS 2024): the layer's reconstruction problem solved by ADMM, then refined on its support.

Per layer, with H = (2/n) X Xᵀ damped by λ = 0.01 · mean(diag H) (the released code's choice; the paper's text scales
λ by the trace) and rescaled to unit diagonal (W → W S, H → S⁻¹ H S⁻¹ with S = diag(H)^½, a Jacobi preconditioner):

    min_W  tr((W − Ŵ) H (W − Ŵ)ᵀ)   subject to W's support: k nonzeros in the layer, or N of every M inputs per row,

by ADMM on the split W = D (§3.1): W ← (Ŵ H − V + ρ D)(H + ρ I)⁻¹, D ← the projection of W + V/ρ on the support
constraint (the largest magnitudes), V ← V + ρ (W − D). One eigendecomposition H = Q Λ Qᵀ serves every ρ:
(H + ρ I)⁻¹ = Q (Λ + ρ)⁻¹ Qᵀ, two products per iteration. ρ starts at 0.1 and, every 3 iterations, grows by 1.3,
1.2 or 1.1 when the support changed by at least 10 % of k, 0.5 % of k or one entry; the loop stops when the support
holds for 3 iterations, when after 30 iterations less than 0.03 % of k changed (the released code), or at the cap.
Then the weights on D's support are refined by conjugate gradients on the same objective (§3.2, 10 iterations).
The released code also lowers ρ by 5 and restarts while the support has not yet changed much; that is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import HESSIAN, LayerResult, Method, MethodOption, PruningError, Target, exact_matmul, prune_count
from methods.hessian import DEFAULT_PERCDAMP, PERCDAMP_HELP, check_percdamp, dead_inputs

DEFAULT_RHO = 0.1  # ρ₀, the paper's
UPDATE_EVERY = 3  # iterations between two looks at the support (the paper's)
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))  # (share of k that changed, at least) -> factor of ρ
SLOW_CHANGE = 3e-4  # after SLOW_AFTER iterations, a change below this share of k ends the loop (the released code)
SLOW_AFTER = 30
DEFAULT_ITERATIONS = 300  # the released code's cap
DEFAULT_PCG_ITERATIONS = 10  # the paper's


def normalized(weight: Tensor, hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Ŵ S, S⁻¹ (H + λI) S⁻¹, S, dead inputs) in float64 with S = diag(H + λI)^½, dead inputs given H_jj = 1 and
    a zero weight (they never fired: nothing depends on them)."""
    dead = dead_inputs(hessian)
    damped = hessian.to(torch.float64).clone()
    torch.diagonal(damped)[dead] = 1.0
    torch.diagonal(damped).add_(percdamp * torch.diagonal(damped).mean())
    scale = torch.diagonal(damped).sqrt()
    start = weight.detach().to(torch.float64) * scale
    start[:, dead] = 0
    return start, damped / scale.unsqueeze(0) / scale.unsqueeze(1), scale, dead


def support(values: Tensor, target: Target, layers: Sequence[tuple[int, int]]) -> Tensor:
    """The keep-mask of the projection on the support constraint: the largest |values| of each layer (rows
    `layers`), k = (1 − sparsity) of its entries, or the N largest of every M consecutive inputs of a row."""
    rows, columns = values.shape
    if target.is_nm:
        groups = values.abs().reshape(rows, columns // target.m, target.m)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(target.n, dim=2).indices, True)
        return kept.reshape(rows, columns)
    keep = torch.zeros_like(values, dtype=torch.bool)
    for first, last in layers:
        flat = values[first:last].abs().reshape(-1)
        kept = flat.numel() - prune_count(flat.numel(), target.sparsity)
        keep[first:last].view(-1)[flat.topk(kept, sorted=False).indices] = True  # unsorted: the set only, 2.5x faster
    return keep


def admm(start: Tensor, hessian: Tensor, target: Target, layers: Sequence[tuple[int, int]], rho: float,
         iterations: int) -> tuple[Tensor, Tensor, int, float]:
    """ADMM on W = D from Ŵ = `start` (rows, inputs) for the normalised `hessian`: the last D, its keep-mask, the
    iterations run and the last ρ."""
    eigenvalues, basis = (part.to(hessian.dtype) for part in torch.linalg.eigh(hessian.to(torch.float64)))  # in float64, as the released code
    towards = start @ hessian  # Ŵ H
    keep = support(start, target, layers)
    split, dual = start * keep, torch.zeros_like(start)
    kept = keep.sum().item()
    before, done = keep, 0
    for done in range(1, iterations + 1):
        weight = ((towards - dual + rho * split) @ basis) / (eigenvalues + rho) @ basis.T  # (Ŵ H − V + ρ D)(H + ρ I)⁻¹
        moved = weight + dual / rho
        keep = support(moved, target, layers)
        split = moved * keep
        dual += rho * (weight - split)
        if done % UPDATE_EVERY == 0:
            changed = (keep != before).sum().item()
            if changed == 0 or (done >= SLOW_AFTER and changed < SLOW_CHANGE * kept):
                break
            rho *= next(factor for share, factor in RHO_STEPS if changed >= share * kept)
            before = keep
    return split, keep, done, rho


def refine_on_support(start: Tensor, hessian: Tensor, keep: Tensor, initial: Tensor, iterations: int) -> Tensor:
    """Conjugate gradients on min tr((W − Ŵ) H (W − Ŵ)ᵀ) over the weights `keep` allows, each row its own system
    H_SS w_S = (H ŵ)_S, from `initial`; H is already diag-normalised (the Jacobi preconditioner)."""
    right = (start @ hessian) * keep
    weight = initial * keep
    residual = right - (weight @ hessian) * keep
    direction = residual.clone()
    norm = (residual * residual).sum(dim=1, keepdim=True)
    for _ in range(iterations):
        product = (direction @ hessian) * keep
        curvature = (direction * product).sum(dim=1, keepdim=True)
        step = norm / torch.where(curvature > 0, curvature, torch.ones_like(curvature))
        weight += step * direction
        residual -= step * product
        new_norm = (residual * residual).sum(dim=1, keepdim=True)
        direction = residual + new_norm / torch.where(norm > 0, norm, torch.ones_like(norm)) * direction
        norm = new_norm
    return weight


def check_options(target: Target, alps_rho: float = DEFAULT_RHO, alps_iterations: int = DEFAULT_ITERATIONS,
                  alps_pcg_iterations: int = DEFAULT_PCG_ITERATIONS, percdamp: float = DEFAULT_PERCDAMP) -> None:
    """ρ must be positive; the iteration counts at least 1 (ADMM) and 0 (conjugate gradients)."""
    check_percdamp(percdamp)
    if not alps_rho > 0:
        raise PruningError(f"ρ must be positive, got {alps_rho:g}")
    if alps_iterations < 1 or alps_pcg_iterations < 0:
        raise PruningError(f"ALPS needs at least 1 ADMM iteration and 0 or more CG iterations, got {alps_iterations} and {alps_pcg_iterations}")


def prune_together(weights: Sequence[Tensor], hessian: Tensor, target: Target, *, alps_rho: float = DEFAULT_RHO,
                   alps_iterations: int = DEFAULT_ITERATIONS, alps_pcg_iterations: int = DEFAULT_PCG_ITERATIONS,
                   percdamp: float = DEFAULT_PERCDAMP) -> list[LayerResult]:
    """`prune` for layers fed the same inputs: one eigendecomposition and one ADMM loop over their stacked rows, each
    layer keeping k of its own weights."""
    check_options(target, alps_rho, alps_iterations, alps_pcg_iterations, percdamp)
    for weight in weights:
        target.check_layer("weight", weight.shape[1])
        if hessian.shape != (weight.shape[1], weight.shape[1]):
            raise PruningError(f"Hessian shape {tuple(hessian.shape)} does not match weight inputs {weight.shape[1]}")
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + weight.shape[0])
    layers = list(zip(bounds, bounds[1:], strict=False))
    with exact_matmul():
        start, scaled, scale, dead = normalized(torch.cat([weight.detach() for weight in weights]), hessian, percdamp)
        compute = torch.float64 if weights[0].dtype == torch.float64 else torch.float32  # the loop in float32 unless given float64
        start, scaled = start.to(compute), scaled.to(compute)
        split, keep, done, last_rho = admm(start, scaled, target, layers, alps_rho, alps_iterations)
        refined = refine_on_support(start, scaled, keep, split, alps_pcg_iterations).to(torch.float64) * keep / scale  # CG from D, on D's support
    results = []
    undamped = hessian.to(torch.float64)
    for weight, (first, last) in zip(weights, layers, strict=True):
        change = refined[first:last] - weight.detach().to(torch.float64)
        loss = ((change @ undamped) * change).sum().item() / 2  # ½ tr(ΔW H ΔWᵀ): the output error (SparseGPT's scale)
        results.append(LayerResult(weight=refined[first:last].to(weight.dtype).contiguous(), mask=keep[first:last].contiguous(), loss=loss,
                                   details={"iterations": done, "rho": last_rho, "dead_inputs": int(dead.sum().item())}))
    return results


def prune(weight: Tensor, hessian: Tensor, target: Target, *, alps_rho: float = DEFAULT_RHO, alps_iterations: int = DEFAULT_ITERATIONS,
          alps_pcg_iterations: int = DEFAULT_PCG_ITERATIONS, percdamp: float = DEFAULT_PERCDAMP) -> LayerResult:
    """Prune `weight` (out, in) to `target` given H = (2/n) X Xᵀ (in, in): ADMM for the support, then conjugate
    gradients for the weights on it (module docstring)."""
    return prune_together([weight], hessian, target, alps_rho=alps_rho, alps_iterations=alps_iterations,
                          alps_pcg_iterations=alps_pcg_iterations, percdamp=percdamp)[0]


def notes(details: dict) -> list[str]:
    return [f"ADMM {details['iterations']} iterations, final ρ {details['rho']:.3g}"] + (
        [f"{details['dead_inputs']} dead inputs zeroed"] if details.get("dead_inputs") else [])


METHOD = Method(
    name="alps",
    summary="ADMM on the layer's reconstruction with a growing penalty, then conjugate gradients on the support (ALPS)",
    prune=prune,
    statistic=HESSIAN,
    options=(
        MethodOption("alps_rho", DEFAULT_RHO, "ALPS: the ADMM penalty ρ it starts from (the paper's 0.1)"),
        MethodOption("alps_iterations", DEFAULT_ITERATIONS, "ALPS: at most this many ADMM iterations per layer (the released code's 300)"),
        MethodOption("alps_pcg_iterations", DEFAULT_PCG_ITERATIONS, "ALPS: conjugate-gradient iterations on the final support (the paper's 10)"),
        MethodOption("percdamp", DEFAULT_PERCDAMP, PERCDAMP_HELP),
    ),
    check=check_options,
    notes=notes,
    prune_together=prune_together,
)
