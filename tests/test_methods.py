"""The per-layer methods on small random problems: exactness against references, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import METHODS, PruningError, Target, get_method, magnitude, sparsegpt, wanda  # noqa: F401
from methods.base import prune_count
from methods.hessian import damped_inverse
from tests.conftest import output_error, random_problem


def sequential_obs_with_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: visit columns left to right; remove each masked-out weight by the OBS update of the columns not yet visited."""
    updated = weight.clone()
    columns = weight.shape[1]
    for j in range(columns):
        inverse = torch.linalg.inv(hessian[j:, j:])
        pruned = ~mask[:, j]
        updated[pruned, j:] -= (updated[pruned, j] / inverse[0, 0]).unsqueeze(1) * inverse[0].unsqueeze(0)
    return updated * mask


@pytest.mark.parametrize("blocksize, mask_blocksize", [(1, 1), (8, 8), (16, 8), (32, 8)])
def test_sparsegpt_equals_sequential_obs_for_its_mask(blocksize: int, mask_blocksize: int) -> None:
    weight, _, hessian = random_problem(6, 32, 200)
    result = sparsegpt.prune(weight, hessian, Target(0.5), blocksize=blocksize, mask_blocksize=mask_blocksize, percdamp=0.0)
    reference = sequential_obs_with_mask(weight, hessian, result.mask)
    torch.testing.assert_close(result.weight.double(), reference, atol=1e-4, rtol=1e-4)


def test_sparsegpt_lazy_batching_does_not_change_the_result() -> None:
    weight, _, hessian = random_problem(10, 64, 400, seed=1)
    target = Target.from_options(pattern="2:4")
    small = sparsegpt.prune(weight, hessian, target, blocksize=8, mask_blocksize=8)
    large = sparsegpt.prune(weight, hessian, target, blocksize=64, mask_blocksize=8)
    assert torch.equal(small.mask, large.mask)
    torch.testing.assert_close(small.weight, large.weight, atol=1e-4, rtol=1e-4)


def test_sparsegpt_loss_is_the_output_error_it_causes() -> None:
    weight, inputs, hessian = random_problem(8, 48, 500, seed=2)
    result = sparsegpt.prune(weight, hessian, Target(0.6), blocksize=16, mask_blocksize=16, percdamp=0.0)
    assert result.loss == pytest.approx(output_error(weight, result.weight.double(), inputs), rel=1e-3)


def test_sparsegpt_beats_wanda_and_magnitude_on_a_pinned_correlated_problem() -> None:
    weight, inputs, hessian = random_problem(16, 64, 400, seed=3)
    norms = (inputs**2).mean(0).sqrt()
    for target in (Target(0.5), Target.from_options(pattern="2:4")):
        errors = {
            "sparsegpt": output_error(weight, sparsegpt.prune(weight, hessian, target, blocksize=16, mask_blocksize=16).weight, inputs),
            "wanda": output_error(weight, wanda.prune(weight, norms, target).weight, inputs),
            "magnitude": output_error(weight, magnitude.prune(weight, None, target).weight, inputs),
        }
        assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_sparsegpt_zeroes_dead_inputs_and_reports_them() -> None:
    weight, _, hessian = random_problem(4, 16, 100, seed=4)
    hessian[3, :] = 0
    hessian[:, 3] = 0
    result = sparsegpt.prune(weight, hessian, Target(0.25), blocksize=8, mask_blocksize=8)
    assert torch.all(result.weight[:, 3] == 0)
    assert result.details["dead_inputs"] == 1


def test_sparsegpt_raises_damping_when_cholesky_fails_and_says_so() -> None:
    weight = torch.randn(4, 8)
    hessian = torch.ones(8, 8)  # rank one: Cholesky fails without damping
    result = sparsegpt.prune(weight, hessian, Target(0.5), blocksize=8, mask_blocksize=8, percdamp=0.0)
    assert result.details["damping_retries"] > 0
    assert result.details["percdamp"] > 0


def test_singular_hessian_is_a_clear_error() -> None:
    weight = torch.randn(4, 8)
    hessian = torch.full((8, 8), float("nan"))
    with pytest.raises(PruningError, match="non-finite"):
        sparsegpt.prune(weight, hessian, Target(0.5), blocksize=8, mask_blocksize=8)
    with pytest.raises(PruningError, match="singular"):
        sparsegpt.prune(weight, -torch.eye(8), Target(0.5), blocksize=8, mask_blocksize=8, percdamp=0.0)


def test_wanda_ranks_within_each_row() -> None:
    weight, inputs, _ = random_problem(12, 40, 100, seed=5)
    norms = (inputs**2).mean(0).sqrt()
    result = wanda.prune(weight, norms, Target(0.3))
    saliency = weight.abs() * norms
    for row in range(weight.shape[0]):
        kept, removed = saliency[row][result.mask[row]], saliency[row][~result.mask[row]]
        assert removed.numel() == prune_count(40, 0.3)
        assert removed.max() <= kept.min()
    # a ranking across the layer would not give every row the same count
    assert (result.mask.sum(1) == result.mask.sum(1)[0]).all()


def test_magnitude_ranks_across_the_layer() -> None:
    weight = torch.randn(10, 20) * torch.linspace(0.1, 3, 10).unsqueeze(1)  # rows of very different scale
    result = magnitude.prune(weight, None, Target(0.5))
    assert (~result.mask).sum().item() == 100
    assert weight.abs()[~result.mask].max() <= weight.abs()[result.mask].min()
    assert result.mask.sum(1)[0] < result.mask.sum(1)[-1]  # small rows lose more


def test_target_parsing_and_bad_targets() -> None:
    assert Target.from_options(pattern="2:4") == Target(0.5, 2, 4)
    assert Target.from_options(sparsity=0.5, pattern="4:8") == Target(0.5, 4, 8)
    assert Target.from_options(pattern="1:4").sparsity == 0.75
    for sparsity, pattern in [(1.0, None), (-0.1, None), (None, "4:4"), (None, "5:4"), (None, "0:4"), (0.6, "2:4"), (None, "2-4")]:
        with pytest.raises(PruningError):
            Target.from_options(sparsity=sparsity, pattern=pattern)
    with pytest.raises(PruningError, match="not a multiple of M=8"):
        wanda.prune(torch.randn(3, 12), torch.ones(12), Target.from_options(pattern="4:8"))
    with pytest.raises(PruningError, match="unknown method"):
        get_method("optimal-brain-damage")


def run_method(name: str, weight: torch.Tensor, inputs: torch.Tensor, target: Target):
    method = get_method(name)
    statistics = {"hessian": 2 * inputs.T @ inputs / inputs.shape[0], "column_norms": (inputs**2).mean(0).sqrt(), None: None}
    small_blocks = {"blocksize": 16, "mask_blocksize": 8}  # lazy blocks that the small layers below span several of
    options = {key: value for key, value in small_blocks.items() if key in {option.name for option in method.options}}
    return method.run(weight, statistics[method.statistic], target, method.resolved_options(options))


LAYER_METHODS = sorted(name for name, method in METHODS.items() if method.gradients is None)  # those run on a layer's statistic


shapes = st.tuples(st.integers(1, 12), st.sampled_from([16, 32, 48]))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.0, 0.95), name=st.sampled_from(LAYER_METHODS), seed=st.integers(0, 99))
def test_unstructured_sparsity_is_reached(shape, sparsity, name, seed) -> None:
    rows, columns = shape
    weight, inputs, _ = random_problem(rows, columns, 64, seed)
    result = run_method(name, weight.float(), inputs.float(), Target(sparsity))
    zeros = (result.weight == 0).sum().item()
    assert (~result.mask).sum().item() == pytest.approx(sparsity * rows * columns, abs=max(rows, columns // 8))
    assert zeros >= (~result.mask).sum().item()  # every removed weight is exactly zero


@settings(max_examples=25, deadline=None)
@given(shape=shapes, pattern=st.sampled_from(["2:4", "1:4", "4:8", "3:8"]), name=st.sampled_from(LAYER_METHODS), seed=st.integers(0, 99))
def test_every_n_m_group_keeps_exactly_n(shape, pattern, name, seed) -> None:
    rows, columns = shape
    target = Target.from_options(pattern=pattern)
    weight, inputs, _ = random_problem(rows, columns, 64, seed)
    result = run_method(name, weight.float(), inputs.float(), target)
    groups = result.mask.reshape(rows, columns // target.m, target.m).sum(2)
    assert torch.all(groups == target.n)
    assert torch.all(result.weight[~result.mask] == 0)


def sparsegpt_by_the_paper(weight: torch.Tensor, hessian: torch.Tensor, target: Target, mask_blocksize: int,
                           percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT as the pruning deep-dive writes it, without lazy batching, in float64: dead inputs get H_jj = 1 and a zero weight
    column; H + percdamp · mean(diag H) · I is inverted and U is the upper Cholesky factor of that inverse
    (H⁻¹ = UᵀU). Columns are visited left to right; when column j opens a mask block (every `mask_blocksize`
    columns, or every M for N:M) the mask of that block is chosen from the current weights by w²/[U]_jj²; then
    every row that drops w_j takes the OBS step W[:, j:] −= (w_j / U_jj) U[j, j:]. Returns (weights, mask, loss)."""
    work = weight.double().clone()
    hessian = hessian.double().clone()
    columns = hessian.shape[0]
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    hessian += percdamp * torch.diagonal(hessian).mean() * torch.eye(columns, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)
    mask = torch.ones_like(work, dtype=torch.bool)
    loss = 0.0
    width = target.m if target.is_nm else mask_blocksize
    for j in range(columns):
        if j % width == 0:
            scores = work[:, j : j + width] ** 2 / torch.diagonal(upper)[j : j + width] ** 2
            if target.is_nm:  # per row, keep the N highest of the group
                for row in range(scores.shape[0]):
                    dropped = scores[row].argsort()[: target.m - target.n]
                    mask[row, j + dropped] = False
            else:  # the lowest round(s · size) scores of the whole block, all rows together
                count = round(scores.numel() * target.sparsity)
                dropped = scores.flatten().argsort()[:count]
                block = mask[:, j : j + width].clone()
                block.view(-1)[dropped] = False
                mask[:, j : j + width] = block
        pruned = ~mask[:, j]
        errors = work[pruned, j] / upper[j, j]
        loss += (errors**2).sum().item() / 2
        work[pruned, j:] -= errors.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    return work * mask, mask, loss


@pytest.mark.parametrize("target", [Target(0.5), Target(0.7), Target.from_options(pattern="2:4"), Target.from_options(pattern="4:8")])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_equals_a_plain_transcription_of_the_paper(target: Target, seed: int) -> None:
    weight, _, hessian = random_problem(12, 64, 300, seed=20 + seed)
    hessian[5, :] = 0  # input 5 never fired
    hessian[:, 5] = 0
    result = sparsegpt.prune(weight.float(), hessian.float(), target, blocksize=32, mask_blocksize=16, percdamp=0.05)
    expected_weight, expected_mask, expected_loss = sparsegpt_by_the_paper(weight, hessian, target, 16, 0.05)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight.double(), expected_weight, atol=1e-4, rtol=1e-4)
    assert result.loss == pytest.approx(expected_loss, rel=1e-4)
    assert result.details["dead_inputs"] == 1


@pytest.mark.parametrize("blocksize, mask_blocksize", [(96, 48), (60, 20), (56, 7), (20, 5), (40, 40)])
def test_sparsegpt_inner_blocks_of_the_lazy_block_change_nothing(blocksize: int, mask_blocksize: int) -> None:
    """Inner blocks of 16, 10, 14 and 15 columns (mask blocks larger than, equal to and smaller than them), and a lazy
    block that ends inside an inner block (20 = 15 + 5)."""
    weight, _, hessian = random_problem(9, 120, 500, seed=41)
    result = sparsegpt.prune(weight.float(), hessian.float(), Target(0.6), blocksize=blocksize, mask_blocksize=mask_blocksize, percdamp=0.05)
    expected_weight, expected_mask, expected_loss = sparsegpt_by_the_paper(weight, hessian, Target(0.6), mask_blocksize, 0.05)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight.double(), expected_weight, atol=1e-4, rtol=1e-4)
    assert result.loss == pytest.approx(expected_loss, rel=1e-4)


def test_inner_blocks_start_at_every_mask_choice() -> None:
    for step in range(1, 200):
        inner = sparsegpt.inner_blocksize(step)
        assert 1 <= inner <= 16 and (inner % step == 0 or step % inner == 0), (step, inner)
    assert [sparsegpt.inner_blocksize(step) for step in (4, 8, 64, 50, 7, 67)] == [16, 16, 16, 10, 14, 1]


def test_the_factorised_hessian_is_damped_after_the_dead_input_fix(monkeypatch) -> None:
    _, _, hessian = random_problem(1, 16, 100, seed=30)
    hessian *= 50  # mean(diag H) far from 1, so that giving the dead input H_jj = 1 before or after the mean shows
    hessian[2, :] = 0
    hessian[:, 2] = 0
    factorised = []
    original = torch.linalg.cholesky_ex

    def spy(matrix, *args, **kwargs):
        factorised.append(matrix.clone())
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    damped_inverse(hessian, 0.03)
    fixed = hessian.clone()
    fixed[2, 2] = 1.0
    expected = fixed + 0.03 * torch.diagonal(fixed).mean() * torch.eye(16, dtype=hessian.dtype)
    torch.testing.assert_close(factorised[0], expected, atol=0, rtol=1e-12)


@pytest.mark.parametrize("target", [Target(0.5), Target(0.7), Target.from_options(pattern="2:4"), Target.from_options(pattern="4:8")])
def test_layers_sharing_a_hessian_swept_together_equal_each_alone(target: Target) -> None:
    """q/k/v (or gate/up) swept as one taller matrix: each layer's mask and weights are those it gets alone."""
    generator = torch.Generator().manual_seed(50)
    inputs = torch.randn(300, 64, generator=generator)
    hessian = 2 * inputs.T @ inputs / 300
    weights = [torch.randn(rows, 64, generator=generator) * scale for rows, scale in ((24, 1.0), (8, 3.0), (16, 0.2))]
    together = sparsegpt.prune_together(weights, hessian, target, blocksize=32, mask_blocksize=16)
    for weight, result in zip(weights, together, strict=True):
        alone = sparsegpt.prune(weight, hessian, target, blocksize=32, mask_blocksize=16)
        assert torch.equal(result.mask, alone.mask)
        torch.testing.assert_close(result.weight, alone.weight, atol=1e-5, rtol=1e-5)
        assert result.loss == pytest.approx(alone.loss, rel=1e-5)
        if not target.is_nm:  # each layer holds its own sparsity, though the layers' scales differ widely
            assert (~result.mask).float().mean().item() == pytest.approx(target.sparsity, abs=0.01)
