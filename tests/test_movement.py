"""Movement pruning's mathematics (methods/movement.py) against seed 003 §6 written out by hand."""

from __future__ import annotations

import pytest
import torch

from methods import PruningError, movement


def test_the_score_gradient_is_the_straight_through_one_of_section_6_1() -> None:
    """y = (W ⊙ M) x, L = Σ r ⊙ y: ∂L/∂S_ij = Σ_tokens r_i W_ij x_j, for kept and removed weights alike."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    inputs = torch.randn(11, 7, generator=generator, dtype=torch.float64)
    upstream = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    for make_mask in (lambda s: movement.hard_mask(s, 0.6), lambda s: movement.soft_mask(s, 0.1)):
        scores = torch.randn(5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
        mask = make_mask(scores)
        outputs = inputs @ movement.masked_weight(weight, mask).T
        (upstream * outputs).sum().backward()
        expected = torch.einsum("ti,ij,tj->ij", upstream, weight, inputs)
        torch.testing.assert_close(scores.grad, expected)


def test_hard_mask_keeps_the_highest_scores_of_the_layer() -> None:
    scores = torch.randn(6, 10)
    mask = movement.hard_mask(scores, 0.7)
    assert mask.sum() == 18  # round(60 · 0.7) = 42 removed
    assert scores[mask == 1].min() > scores[mask == 0].max()
    assert movement.hard_mask(scores, 0.0).all()


def test_soft_mask_is_the_threshold() -> None:
    scores = torch.tensor([[-1.0, 0.2, 0.3], [0.25, 5.0, 0.0]])
    assert movement.soft_mask(scores, 0.25).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_soft_penalty_and_its_gradient() -> None:
    scores = [torch.randn(3, 4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    penalty = movement.soft_penalty(scores, 0.5)
    expected = 0.5 * sum((1 / (1 + torch.exp(-s.detach()))).sum() for s in scores)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()
    for s in scores:
        sigma = 1 / (1 + torch.exp(-s.detach()))
        torch.testing.assert_close(s.grad, 0.5 * sigma * (1 - sigma))


def test_cubic_schedule_by_hand() -> None:
    # 100 steps, 10 warm-up, 20 cool-down: the cubic runs over steps 10..80
    assert movement.cubic_sparsity(0, 100, 0.8, warmup=10, cooldown=20) == 0.0
    assert movement.cubic_sparsity(10, 100, 0.8, warmup=10, cooldown=20) == 0.0
    assert movement.cubic_sparsity(45, 100, 0.8, warmup=10, cooldown=20) == pytest.approx(0.8 * (1 - 0.5**3))
    assert movement.cubic_sparsity(80, 100, 0.8, warmup=10, cooldown=20) == pytest.approx(0.8)
    assert movement.cubic_sparsity(99, 100, 0.8, warmup=10, cooldown=20) == pytest.approx(0.8)
    assert movement.cubic_sparsity(50, 100, 0.9, initial=0.5) == pytest.approx(0.9 - 0.4 * 0.5**3)


def test_bad_schedules_and_sparsities_are_refused() -> None:
    with pytest.raises(PruningError, match="between warm-up and cool-down"):
        movement.cubic_sparsity(0, 10, 0.5, warmup=6, cooldown=4)
    with pytest.raises(PruningError, match="sparsity"):
        movement.hard_mask(torch.randn(3, 3), 1.0)
