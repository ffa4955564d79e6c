"""RIA (Zhang et al., ICLR 2024) against a plain transcription of its equations 1 and 2, loop by loop, in float64."""

from __future__ import annotations

import pytest
import torch

from methods import PruningError, Target, get_method
from methods.ria import prune, relative_importance, scores


def paper_scores(weight: torch.Tensor, activations: torch.Tensor, power: float) -> torch.Tensor:
    """RIA_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · (‖X_j‖₂)^a, with ‖X_j‖₂ over the tokens (rows of X)."""
    rows, columns = weight.shape
    w = weight.double()
    result = torch.zeros(rows, columns, dtype=torch.float64)
    for i in range(rows):
        for j in range(columns):
            column_sum = sum(abs(w[k, j]) for k in range(rows))
            row_sum = sum(abs(w[i, k]) for k in range(columns))
            norm = sum(activations[t, j].double() ** 2 for t in range(activations.shape[0])) ** 0.5
            result[i, j] = (abs(w[i, j]) / column_sum + abs(w[i, j]) / row_sum) * norm**power
    return result


def paper_mask(score: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    """Keep the highest scores of the layer or of each row (unstructured), or the N highest of each M (N:M), by sorting."""
    rows, columns = score.shape
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    if not target.is_nm and not per_row:
        entries = sorted(((i, j) for i in range(rows) for j in range(columns)), key=lambda entry: -score[entry].item())
        for i, j in entries[: rows * columns - round(rows * columns * target.sparsity)]:
            mask[i, j] = True
        return mask
    for i in range(rows):
        if target.is_nm:
            for start in range(0, columns, target.m):
                group = sorted(range(start, start + target.m), key=lambda j: -score[i, j].item())
                mask[i, group[: target.n]] = True
        else:
            keep = columns - round(columns * target.sparsity)
            mask[i, sorted(range(columns), key=lambda j: -score[i, j].item())[:keep]] = True
    return mask


@pytest.mark.parametrize("power", [0.5, 0.0, 1.0])
def test_scores_are_the_papers_equations(power) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=generator) * torch.rand(1, 8, generator=generator) * 3  # channels of unequal size
    activations = torch.randn(20, 8, generator=generator) * torch.linspace(0.1, 4, 8)
    mean_norms = activations.pow(2).mean(dim=0).sqrt()  # what the calibration gives: a mean over tokens, not a sum
    expected = paper_scores(weight, activations, power)
    actual = scores(weight, mean_norms, power).double()
    ratio = actual / expected  # a mean instead of a sum: one factor n^(-a/2) for every weight, which no ranking sees
    torch.testing.assert_close(ratio, torch.full_like(ratio, 20 ** (-power / 2)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("target", [Target(0.5), Target(0.25), Target.from_options(pattern="2:4"), Target.from_options(pattern="4:8")])
def test_the_mask_keeps_the_highest_scores_and_nothing_else_changes(target, per_row) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=generator) * torch.rand(16, 1, generator=generator)
    activations = torch.randn(40, 32, generator=generator) * torch.rand(32, generator=generator) * 5
    result = prune(weight, activations.pow(2).mean(dim=0).sqrt(), target, ria_per_row=per_row)
    expected = paper_mask(paper_scores(weight, activations, 0.5), target, per_row)
    rows_kept = expected.sum(dim=1)
    if not target.is_nm:  # the two scopes differ: across the layer, rows of small weights lose more than half
        assert (rows_kept.min() == rows_kept.max()) == per_row
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, weight * expected)  # RIA removes weights, it does not update the others
    removed = weight * activations.pow(2).mean(dim=0).sqrt()
    assert result.loss == pytest.approx((removed[~expected] ** 2).sum().item(), rel=1e-5)


def test_relative_importance_of_a_small_layer_by_hand() -> None:
    """Each weight's share of its column's absolute sum plus its share of its row's (eq. 1)."""
    weight = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
    expected = torch.tensor([[4 / 5 + 4 / 6, 2 / 5 + 2 / 6], [1 / 4 + 1 / 5, 3 / 5 + 3 / 4]])
    torch.testing.assert_close(relative_importance(weight), expected)
    assert torch.equal(relative_importance(torch.zeros(2, 3)), torch.zeros(2, 3))  # a dead layer: no division by zero


def test_the_registered_method_runs_through_its_record_and_refuses_a_negative_power() -> None:
    method = get_method("ria")
    weight, norms = torch.randn(4, 8), torch.rand(8)
    options = method.resolved_options({})
    assert options == {"activation_power": 0.5, "ria_per_row": False}
    assert torch.equal(method.run(weight, norms, Target(0.5), options).mask, prune(weight, norms, Target(0.5)).mask)
    with pytest.raises(PruningError, match="activation power"):
        method.check_options(Target(0.5), {"activation_power": -1.0})
    with pytest.raises(PruningError, match="switch"):
        method.check_options(Target(0.5), {"ria_per_row": 1})
