"""ALPS (Meng et al., NeurIPS 2024) against a plain float64 transcription of its loop (no eigendecomposition shortcut),
least squares on a fixed support, and SparseGPT's layer objective."""

from __future__ import annotations

import pytest
import torch

from methods import PruningError, Target, alps, sparsegpt
from tests.conftest import random_problem


def transcription(weight: torch.Tensor, hessian: torch.Tensor, target: Target, rho: float = 0.1, iterations: int = 300,
                  cg_iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The paper's ADMM and CG, written out: λ = 0.01 mean(diag H) on the diagonal, everything rescaled by
    S = diag(H + λI)^½; W = (ŴH − V + ρD)(H + ρI)⁻¹ by a linear solve, D = the largest |W + V/ρ| (k of the layer, or
    N of each M), V += ρ(W − D); every 3 iterations ρ × 1.3 / 1.2 / 1.1 for a support change ≥ 10 % / ≥ 0.5 % of k /
    ≥ 1 entry; stop on no change, or after 30 iterations on a change below 0.03 % of k; then CG from D on its support,
    row by row. Returns (W, keep, iterations)."""
    rows, columns = weight.shape
    damped = hessian.double() + 0.01 * torch.diagonal(hessian.double()).mean() * torch.eye(columns, dtype=torch.float64)
    scale = torch.diagonal(damped).sqrt()
    h = damped / torch.outer(scale, scale)
    start = weight.double() * scale
    k = rows * columns - round(rows * columns * target.sparsity)

    def project(values: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(rows, columns, dtype=torch.bool)
        if target.is_nm:
            for i in range(rows):
                for g in range(0, columns, target.m):
                    order = sorted(range(g, g + target.m), key=lambda j: -abs(values[i, j].item()))
                    keep[i, order[: target.n]] = True
        else:
            order = sorted(((i, j) for i in range(rows) for j in range(columns)), key=lambda e: -abs(values[e].item()))
            for entry in order[:k]:
                keep[entry] = True
        return keep

    keep = project(start)
    d, v, previous = start * keep, torch.zeros_like(start), keep
    for t in range(1, iterations + 1):
        w = torch.linalg.solve(h + rho * torch.eye(columns, dtype=torch.float64), (start @ h - v + rho * d).T).T
        keep = project(w + v / rho)
        d = (w + v / rho) * keep
        v = v + rho * (w - d)
        if t % 3 == 0:
            changed = (keep != previous).sum().item()
            if changed == 0 or (t >= 30 and changed < 3e-4 * k):
                break
            rho *= 1.3 if changed >= 0.1 * k else 1.2 if changed >= 0.005 * k else 1.1
            previous = keep
    result = d.clone()
    for i in range(rows):  # textbook CG on H_SS x = (H ŵ)_S for each row
        s = keep[i].nonzero().flatten()
        a, b, x = h[s][:, s], (h @ start[i])[s], d[i, s].clone()
        r = b - a @ x
        p = r.clone()
        for _ in range(cg_iterations):
            if r @ r == 0:
                break
            alpha = (r @ r) / (p @ a @ p)
            x, r_new = x + alpha * p, r - alpha * (a @ p)
            p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
        result[i, s] = x
    return result / scale, keep, t


@pytest.mark.parametrize("target", [Target(0.7), Target(0.5), Target.from_options(pattern="2:4")])
def test_alps_equals_the_transcription_of_its_loop(target) -> None:
    weight, _, hessian = random_problem(8, 32, 200, seed=3)
    result = alps.prune(weight, hessian, target)
    expected, keep, iterations = transcription(weight, hessian, target)
    assert iterations > 6  # ρ was raised several times: its schedule decides the result
    assert result.details["iterations"] == iterations
    assert torch.equal(result.mask, keep)
    torch.testing.assert_close(result.weight.double(), expected, rtol=1e-6, atol=1e-8)
    assert torch.all(result.weight[~result.mask] == 0)


def test_conjugate_gradients_on_a_fixed_support_give_the_least_squares_rows() -> None:
    """Enough CG iterations reach the optimum of min ‖X(w − ŵ)‖² over the kept inputs, which lstsq gives."""
    weight, inputs, hessian = random_problem(6, 24, 300, seed=4)
    keep = torch.rand(6, 24, generator=torch.Generator().manual_seed(5)) < 0.4
    refined = alps.refine_on_support(weight, hessian, keep, weight * keep, iterations=24)
    for row in range(6):
        kept = keep[row].nonzero().flatten()
        expected = torch.linalg.lstsq(inputs[:, kept], (inputs @ weight[row]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(refined[row, kept], expected, rtol=1e-6, atol=1e-8)
        assert torch.all(refined[row, ~keep[row]] == 0)


@pytest.mark.parametrize("target", [Target(0.7), Target.from_options(pattern="2:4")])
def test_alps_reconstructs_better_than_sparsegpt_on_most_correlated_problems(target) -> None:
    """The layer objective tr(ΔW H ΔWᵀ) of ALPS below SparseGPT's on at least 8 of 10 random problems with
    correlated inputs (measured: 10 of 10 at 70 % and at 2:4 when this test was written)."""
    wins = 0
    for seed in range(10):
        weight, _, hessian = random_problem(16, 64, 400, seed=seed)
        objective = {}
        for name, result in (("alps", alps.prune(weight.float(), hessian.float(), target)),
                             ("sparsegpt", sparsegpt.prune(weight.float(), hessian.float(), target))):
            change = result.weight.double() - weight
            objective[name] = ((change @ hessian) * change).sum().item()
        wins += objective["alps"] < objective["sparsegpt"]
    assert wins >= 8


def test_bad_options_are_refused() -> None:
    for options, message in (({"alps_rho": 0.0}, "ρ must be positive"), ({"alps_iterations": 0}, "at least 1 ADMM"),
                             ({"percdamp": -1.0}, "damping")):
        with pytest.raises(PruningError, match=message):
            alps.METHOD.check_options(Target(0.5), options)
