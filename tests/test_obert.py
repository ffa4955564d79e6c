"""oBERT's mathematics (methods/obert.py) against the dense formulas of the pruning deep-dive §7.4-7.5, written out here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import PruningError, Target, obert
from methods.base import masks_lowest_across


def gradients_for(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Correlated per-sample gradients (count, size), float64."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64) / size**0.5
    return torch.randn(count, size, generator=generator, dtype=torch.float64) @ (torch.eye(size, dtype=torch.float64) + mixing)


def explicit_block_inverses(gradients: torch.Tensor, block_size: int, damp: float) -> list[torch.Tensor]:
    """inv(λI + (1/m) Σ g_b g_bᵀ) for each block b of consecutive entries (the last one shorter), by torch.linalg.inv."""
    count, size = gradients.shape
    inverses = []
    for start in range(0, size, block_size):
        g = gradients[:, start : start + block_size]
        inverses.append(torch.linalg.inv(damp * torch.eye(g.shape[1], dtype=g.dtype) + g.T @ g / count))
    return inverses


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 40), block_size=st.integers(1, 12), count=st.integers(1, 30), damp=st.sampled_from([1e-2, 0.1, 1.0]),
       seed=st.integers(0, 1000))
def test_woodbury_blocks_equal_the_explicit_inverse_of_each_fisher_block(size: int, block_size: int, count: int, damp: float, seed: int) -> None:
    gradients = gradients_for(count, size, seed)
    inverse = obert.fisher_inverse(gradients, block_size, damp)
    assert inverse.shape == (obert.block_count(size, block_size), block_size, block_size)
    for index, expected in enumerate(explicit_block_inverses(gradients, block_size, damp)):
        width = expected.shape[0]
        torch.testing.assert_close(inverse[index, :width, :width], expected, rtol=1e-8, atol=1e-8 / damp)
    padding = inverse.shape[0] * block_size - size  # padded entries stay (1/λ) I and decoupled
    if padding:
        torch.testing.assert_close(inverse[-1, -padding:, -padding:], torch.eye(padding, dtype=torch.float64) / damp)
        assert inverse[-1, : block_size - padding, block_size - padding :].abs().max() == 0


@pytest.mark.parametrize(("size", "block_size", "k"), [(30, 7, 1), (30, 7, 4), (48, 16, 10), (12, 12, 20)])
def test_rank_k_steps_equal_the_one_gradient_steps(size: int, block_size: int, k: int) -> None:
    gradients = gradients_for(40, size, seed=k)
    one_by_one = obert.fisher_inverse(gradients, block_size, 0.05)
    batched = obert.initial_inverse(size, block_size, 0.05, dtype=torch.float64)
    for start in range(0, 40, k):
        obert.add_gradients(batched, gradients[start : start + k], 40)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-9, atol=1e-9)


def test_the_default_damping_in_float64_and_in_float32_at_the_scale_of_real_gradients() -> None:
    """λ = 1e-7 (F₀⁻¹ = 10⁷ I): float64 matches the explicit inverse even for gradients of order 1; float32 loses
    digits once ‖g‖²/λ dwarfs m (43 % off at order 1, measured), but not at per-sample gradient scales of 1e-3."""
    gradients = gradients_for(256, 100, seed=3)
    expected = torch.cat([torch.diagonal(block) for block in explicit_block_inverses(gradients, 50, obert.DEFAULT_DAMP)])
    torch.testing.assert_close(obert.inverse_diagonal(obert.fisher_inverse(gradients, 50), 100), expected, rtol=1e-8, atol=0)
    small = gradients * 1e-3
    expected = torch.cat([torch.diagonal(block) for block in explicit_block_inverses(small, 50, obert.DEFAULT_DAMP)])
    single = obert.fisher_inverse(small.float(), 50)
    torch.testing.assert_close(obert.inverse_diagonal(single, 100).double(), expected, rtol=1e-4, atol=0)


def test_saliency_is_w_squared_over_twice_the_inverse_diagonal() -> None:
    weight = torch.randn(3, 8, dtype=torch.float64)
    inverse = obert.fisher_inverse(gradients_for(20, 24), 5, 0.1)
    full = torch.block_diag(*inverse)[:24, :24]
    expected = torch.stack([weight.reshape(-1)[j] ** 2 / (2 * full[j, j]) for j in range(24)]).reshape(3, 8)
    torch.testing.assert_close(obert.saliency(weight, inverse), expected)


@pytest.mark.parametrize(("size", "block_size"), [(24, 6), (30, 7), (16, 16)])
def test_update_equals_the_dense_formula_of_section_7_5(size: int, block_size: int) -> None:
    """w' = (w − F⁻¹ diag(F⁻¹)⁻¹ (w ⊙ (1 − M))) ⊙ M with F⁻¹ the explicit block-diagonal matrix."""
    generator = torch.Generator().manual_seed(size)
    rows = 2 if size % 2 == 0 else 1
    weight = torch.randn(size, generator=generator, dtype=torch.float64).reshape(rows, size // rows)
    inverse = obert.fisher_inverse(gradients_for(40, size, seed=1), block_size, 0.05)
    full = torch.block_diag(*explicit_block_inverses(gradients_for(40, size, seed=1), block_size, 0.05))
    mask = torch.rand(weight.shape, generator=generator) > 0.5
    w = weight.reshape(-1)
    removed = w * ~mask.reshape(-1)
    expected = (w - full @ (removed / torch.diagonal(full))) * mask.reshape(-1)
    torch.testing.assert_close(obert.update(weight, inverse, mask).reshape(-1), expected)


def test_one_removal_per_block_is_the_exact_obs_step() -> None:
    """With one weight removed from a block the diagonal approximation is exact: the update is OBS's
    δ = −(w_j / [F⁻¹]_jj) F⁻¹ e_j and the loss increase ½ δᵀ F δ equals the saliency w_j² / (2 [F⁻¹]_jj)."""
    size, block_size = 12, 12
    gradients = gradients_for(30, size, seed=5)
    fisher = 0.1 * torch.eye(size, dtype=torch.float64) + gradients.T @ gradients / 30
    inverse = obert.fisher_inverse(gradients, block_size, 0.1)
    weight = torch.randn(1, size, dtype=torch.float64)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[0, 4] = False
    result = obert.prune(weight, inverse, Target(1 / 12), mask=mask)
    delta = (result.weight - weight).reshape(-1)
    hinv = torch.linalg.inv(fisher)
    torch.testing.assert_close(delta, -(weight[0, 4] / hinv[4, 4]) * hinv[:, 4])
    assert result.loss == pytest.approx((0.5 * delta @ fisher @ delta).item(), rel=1e-9)


def test_masks_follow_the_saliency_over_the_whole_layer_and_n_of_m() -> None:
    weight = torch.randn(6, 16, dtype=torch.float64)
    inverse = obert.fisher_inverse(gradients_for(50, 96, seed=2), 8, 0.1)
    scores = obert.saliency(weight, inverse)
    unstructured = obert.prune(weight, inverse, Target(0.75))
    assert (~unstructured.mask).sum() == 72
    assert scores[~unstructured.mask].max() <= scores[unstructured.mask].min()  # ranked over the layer, not per row
    assert unstructured.loss == pytest.approx(scores[~unstructured.mask].sum().item())
    assert (unstructured.weight[~unstructured.mask] == 0).all()
    nm = obert.prune(weight, inverse, Target.from_options(pattern="2:4"))
    groups = nm.mask.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept, dropped = scores.reshape(6, 4, 4)[groups].reshape(6, 4, 2), scores.reshape(6, 4, 4)[~groups].reshape(6, 4, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()


def test_global_masks_rank_across_layers() -> None:
    scores = {"a": torch.tensor([[0.1, 5.0], [0.2, 6.0]]), "b": torch.tensor([[0.3, 0.05, 7.0]])}
    masks = masks_lowest_across(scores, 0.5)  # 7 weights -> 4 lowest go: 0.05, 0.1, 0.2, 0.3 (round(3.5) = 4)
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [[False, False, True]]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(PruningError, match="block size"):
        obert.initial_inverse(10, 0)
    with pytest.raises(PruningError, match="damping"):
        obert.initial_inverse(10, 5, 0.0)
    with pytest.raises(PruningError, match="does not fit"):
        obert.prune(torch.randn(2, 5), obert.initial_inverse(4, 5), Target(0.5))


def test_memory_estimate_is_block_size_times_the_weight() -> None:
    assert obert.inverse_memory_bytes(1000, 50) == 1000 * 50 * 4
    assert obert.inverse_memory_bytes(1001, 50) == 21 * 50 * 50 * 4
