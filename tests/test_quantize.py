"""Quantization by the OBS rule: GPTQ and SparseGPT's joint sparsification and quantization against plain
transcriptions of the papers' column loops (float64, no lazy blocks), and the properties a loader relies on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import PruningError, Target, sparsegpt, wanda
from methods.quantize import QuantGrid, on_grid, rounding_error, scales

PERCDAMP = 0.01


def problem(rows: int, columns: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 weight, correlated inputs X (tokens, columns) and H = (2/n) XᵀX."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    inputs = torch.randn(tokens, columns, generator=generator) @ (torch.eye(columns) + mixing)
    return weight, inputs, 2 * inputs.T @ inputs / tokens


def upper_factor(hessian: torch.Tensor) -> torch.Tensor:
    """U with UᵀU = (H + λI)⁻¹, λ = 1 % of mean(diag H) (the papers' damping), in float64."""
    damped = hessian.double() + PERCDAMP * torch.diagonal(hessian.double()).mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)


def quantize_column(column: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The papers' symmetric quantizer: s · clamp(round(w / s), −2^(b−1), 2^(b−1) − 1)."""
    return torch.clamp(torch.round(column / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def row_scales(weights: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's symmetric scale per row: 2 max|w| / (2^b − 1)."""
    return 2 * weights.abs().amax(dim=1) / (2**bits - 1)


def gptq_transcription(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, act_order: bool = False) -> torch.Tensor:
    """GPTQ (Frantar et al., 2023, Algorithm 1) one column at a time: quantize column j, then
    W[:, j:] −= ((w_j − q_j) / U_jj) U[j, j:]; a group's scale is taken when the loop reaches its first column.
    With `act_order` (the GPTQ code's act-order with static groups): every group's scale is taken first from its
    original columns, then the columns are visited in decreasing order of H_jj (the permutation written out as a
    list, H and W permuted by it), each column rounded with the scale of the group it came from."""
    columns = weight.shape[1]
    order = sorted(range(columns), key=lambda j: -hessian[j, j].item()) if act_order else list(range(columns))
    width = group_size or columns
    static = [row_scales(weight.double()[:, g * width : (g + 1) * width], bits) for g in range(columns // width)]
    work, upper = weight.double()[:, order].clone(), upper_factor(hessian[order][:, order])
    result = torch.zeros_like(work)
    scale = row_scales(work, bits)
    for j in range(columns):
        if act_order:
            scale = static[order[j] // width]
        elif group_size is not None and j % group_size == 0:
            scale = row_scales(work[:, j : j + group_size], bits)
        result[:, j] = quantize_column(work[:, j], scale, bits)
        error = (work[:, j] - result[:, j]) / upper[j, j]
        work[:, j:] -= error.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    unpermuted = torch.zeros_like(result)
    unpermuted[:, order] = result
    return unpermuted


def joint_transcription(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, mask_block: int, bits: int,
                        group_size: int, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023, Algorithm 1 with §3.5's joint quantization), one column at a time: every
    `mask_block` columns, the mask of the next ones is the lowest w²/U_jj² of them over all rows; column j's kept
    weights are quantized, E = (w_j − M_j quant(w_j)) / U_jj, and W[:, j:] −= E U[j, j:]. With `act_order`, the
    columns are visited in decreasing order of H_jj and each is rounded with its original group's scale, taken from
    the original weights before the loop (as in `gptq_transcription`)."""
    rows, columns = weight.shape
    order = sorted(range(columns), key=lambda j: -hessian[j, j].item()) if act_order else list(range(columns))
    static = [row_scales(weight.double()[:, g * group_size : (g + 1) * group_size], bits) for g in range(columns // group_size)]
    work, upper = weight.double()[:, order].clone(), upper_factor(hessian[order][:, order])
    result, keep = torch.zeros_like(work), torch.ones_like(work, dtype=torch.bool)
    for j in range(columns):
        if j % mask_block == 0:
            scores = work[:, j : j + mask_block] ** 2 / torch.diagonal(upper)[j : j + mask_block] ** 2
            pruned = torch.topk(scores.reshape(-1), round(scores.numel() * sparsity), largest=False).indices
            block_keep = torch.ones(scores.numel(), dtype=torch.bool)
            block_keep[pruned] = False
            keep[:, j : j + mask_block] = block_keep.reshape(scores.shape)
        if act_order:
            scale = static[order[j] // group_size]
        elif j % group_size == 0:
            scale = row_scales(work[:, j : j + group_size], bits)
        result[:, j] = quantize_column(work[:, j], scale, bits) * keep[:, j]
        error = (work[:, j] - result[:, j]) / upper[j, j]
        work[:, j:] -= error.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    unpermuted, unpermuted_keep = torch.zeros_like(result), torch.zeros_like(keep)
    unpermuted[:, order], unpermuted_keep[:, order] = result, keep
    return unpermuted, unpermuted_keep


def output_error(weight: torch.Tensor, changed: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean over tokens of ‖(W − W') x‖²."""
    return (((weight.double() - changed.double()) @ inputs.double().T) ** 2).sum().item() / inputs.shape[0]


def rows_equal(result: torch.Tensor, reference: torch.Tensor) -> float:
    """The fraction of rows equal to the reference's. A group's largest weight lands on a tie (|w| / s = 2^(b−1) − ½)
    that float32 and float64 may round apart, and the error feedback carries such a difference along its row."""
    close = (result.double() - reference).abs() <= 1e-4 * reference.abs().amax()
    return close.all(dim=1).double().mean().item()


def levels(weight: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return weight.double() / scale.double().repeat_interleave(group_size or weight.shape[1], dim=1)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, None), (8, 32)])
def test_gptq_equals_the_papers_column_loop(bits: int, group_size: int | None, act_order: bool) -> None:
    weight, inputs, hessian = outlier_problem(24, 128, 600)
    grid = QuantGrid(bits, group_size, act_order=act_order)
    result = sparsegpt.quantize_kept([weight], [torch.ones_like(weight, dtype=torch.bool)], hessian, grid, blocksize=64)[0]
    reference = gptq_transcription(weight, hessian, bits, group_size, act_order)
    assert rows_equal(result.weight, reference) >= 0.8
    assert output_error(weight, result.weight, inputs) == pytest.approx(output_error(weight, reference, inputs), rel=0.01)
    other_order = gptq_transcription(weight, hessian, bits, group_size, not act_order)  # the test can tell the two orders apart
    assert rows_equal(result.weight, other_order) < 0.5


def outlier_problem(rows: int, columns: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`problem` with input features of very unequal size (a few outlier features, as in LLM activations)."""
    weight, inputs, _ = problem(rows, columns, tokens, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    inputs = inputs * torch.exp(2 * torch.randn(columns, generator=generator))
    return weight, inputs, 2 * inputs.T @ inputs / tokens


@pytest.mark.parametrize("group_size", [32, None])
def test_static_groups_take_each_scale_from_the_original_columns_and_act_order_helps(group_size: int | None) -> None:
    weight, inputs, hessian = outlier_problem(24, 128, 600, seed=4)
    ones = [torch.ones_like(weight, dtype=torch.bool)]
    ordered = sparsegpt.quantize_kept([weight], ones, hessian, QuantGrid(4, group_size, act_order=True), blocksize=64)[0]
    width = group_size or 128
    expected = torch.stack([row_scales(weight[:, g * width : (g + 1) * width], 4) for g in range(128 // width)], dim=1)
    torch.testing.assert_close(ordered.scale, expected, rtol=1e-6, atol=0)
    plain = sparsegpt.quantize_kept([weight], ones, hessian, QuantGrid(4, group_size, act_order=False), blocksize=64)[0]
    assert output_error(weight, ordered.weight, inputs) < 0.9 * output_error(weight, plain.weight, inputs)


def test_gptq_beats_rounding_to_nearest() -> None:
    weight, inputs, hessian = problem(24, 128, 600, seed=1)
    grid = QuantGrid(4, 32)
    gptq = sparsegpt.quantize_kept([weight], [torch.ones_like(weight, dtype=torch.bool)], hessian, grid, blocksize=64)[0]
    nearest = torch.stack([quantize_column(column, row_scales(weight[:, 32 * (j // 32) : 32 * (j // 32 + 1)], 4), 4) for j, column in
                           enumerate(weight.T)], dim=1)
    assert output_error(weight, gptq.weight, inputs) < 0.7 * output_error(weight, nearest, inputs)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_joint_sparsification_and_quantization_equals_the_papers_loop(sparsity: float, act_order: bool) -> None:
    weight, inputs, hessian = problem(16, 128, 600, seed=2)
    result = sparsegpt.prune(weight, hessian, Target(sparsity), blocksize=64, mask_blocksize=16, grid=QuantGrid(4, 32, act_order=act_order))
    reference, keep = joint_transcription(weight, hessian, sparsity, 16, 4, 32, act_order)
    assert (result.mask == keep).float().mean() > 0.99
    assert rows_equal(result.weight, reference) >= 0.8
    assert output_error(weight, result.weight, inputs) == pytest.approx(output_error(weight, reference, inputs), rel=0.02)


def test_joint_sweep_costs_little_more_error_than_pruning_alone_and_less_than_two_passes() -> None:
    weight, inputs, hessian = problem(32, 256, 1000, seed=3)
    grid = QuantGrid(4, 64)
    pruned = sparsegpt.prune(weight, hessian, Target(0.5))
    joint = sparsegpt.prune(weight, hessian, Target(0.5), grid=grid)
    two_passes = sparsegpt.quantize_kept([pruned.weight], [pruned.mask], hessian, grid)[0]
    assert output_error(weight, pruned.weight, inputs) < output_error(weight, joint.weight, inputs)
    assert output_error(weight, joint.weight, inputs) < output_error(weight, two_passes.weight, inputs)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([4, 8]), pattern=st.sampled_from([None, "2:4"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), act_order=st.booleans())
def test_pruned_zeros_stay_exact_zeros_and_every_kept_weight_is_on_the_grid(seed: int, bits: int, pattern: str | None, dtype: torch.dtype,
                                                                              act_order: bool) -> None:
    weight, _, hessian = outlier_problem(8, 64, 200, seed=seed)
    target = Target.from_options(0.5 if pattern is None else None, pattern)
    grid = QuantGrid(bits, 16, scale_dtype=dtype, act_order=act_order)
    norms = torch.sqrt(torch.diagonal(hessian) / 2)
    for result in (sparsegpt.prune(weight.to(dtype), hessian, target, blocksize=32, mask_blocksize=16, grid=grid),
                   sparsegpt.quantize_kept([wanda.prune(weight.to(dtype), norms, target).weight],
                                           [wanda.prune(weight.to(dtype), norms, target).mask], hessian, grid, blocksize=32)[0]):
        assert result.weight.dtype == dtype and result.scale.dtype == dtype and result.scale.shape == (8, 4)
        assert torch.all(result.weight[~result.mask] == 0)
        if target.is_nm:  # with act-order too: whole groups of M move together through the sweep
            assert torch.all(result.mask.reshape(8, 16, 4).sum(dim=2) == 2)
        level = levels(result.weight, result.scale, 16)  # q · s rounded to the dtype, as the loader does
        assert torch.all((level - level.round()).abs() <= torch.finfo(dtype).eps * level.abs())
        assert level.round().min() >= -(2 ** (bits - 1)) and level.round().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(on_grid(result.weight, result.scale, grid), result.weight)  # what the loader rebuilds
        assert (result.weight[result.mask] != 0).float().mean() > 0.85  # rounding does not prune what the mask keeps


def test_activation_order_moves_whole_n_m_groups() -> None:
    """Columns by decreasing H_jj; for N:M the groups of M by their summed H_jj, each group's columns kept together."""
    hessian = torch.diag(torch.tensor([1.0, 5.0, 2.0, 3.0, 9.0, 0.5, 0.5, 0.5]))
    assert sparsegpt.activation_order(hessian, Target(0.5)).tolist() == [4, 1, 3, 2, 0, 5, 6, 7]
    assert sparsegpt.activation_order(hessian, Target.from_options(pattern="2:4")).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # 11 > 10.5
    assert sparsegpt.activation_order(hessian, Target.from_options(pattern="1:2")).tolist() == [4, 5, 0, 1, 2, 3, 6, 7]


def searched_row_scale(row: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's reference quantizer's search (grid 100, maxshrink 0.8, norm 2.4), by brute force in float64: of the scales
    (1 − i/100) · 2 max|w| / (2^b − 1), i = 0 … 79, the one whose rounding has the least Σ |q − w|^2.4 (the first on a tie)."""
    row = row.double()
    full = 2 * row.abs().max() / (2**bits - 1)
    errors = [(quantize_column(row, full * (1 - i / 100), bits) - row).abs().pow(2.4).sum().item() for i in range(80)]
    return full * (1 - errors.index(min(errors)) / 100)


@pytest.mark.parametrize("bits", [4, 8])
def test_searched_scales_are_the_brute_force_minimum_and_beat_max_scales(bits: int) -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(5)) ** 3  # heavy tails: clipping pays
    grid = QuantGrid(bits, None, search_scales=True)
    searched = scales(weight, grid)
    expected = torch.stack([searched_row_scale(row, bits) for row in weight])
    torch.testing.assert_close(searched.double(), expected, rtol=1e-5, atol=0)
    plain = scales(weight, QuantGrid(bits, None))
    assert torch.all(rounding_error(weight, searched, grid) <= rounding_error(weight, plain, grid))
    if bits == 4:  # 15 levels: clipping the tail pays on some rows; 255 levels (int8) need no clipping here
        assert (searched < plain).any() and rounding_error(weight, searched, grid).sum() < rounding_error(weight, plain, grid).sum()


def test_the_sweep_uses_the_searched_scales() -> None:
    weight, _, hessian = outlier_problem(8, 64, 200, seed=6)
    grid = QuantGrid(4, 16, act_order=True, search_scales=True)  # static groups: the scales of the original columns
    result = sparsegpt.quantize_kept([weight], [torch.ones_like(weight, dtype=torch.bool)], hessian, grid, blocksize=32)[0]
    expected = torch.stack([scales(weight[:, g * 16 : (g + 1) * 16], grid) for g in range(4)], dim=1)
    assert torch.equal(result.scale, expected)
    assert not torch.equal(result.scale, torch.stack([scales(weight[:, g * 16 : (g + 1) * 16], QuantGrid(4, 16)) for g in range(4)], dim=1))


def test_a_grid_the_layer_or_the_sweep_cannot_hold_is_refused() -> None:
    weight, _, hessian = problem(4, 96, 100)
    with pytest.raises(PruningError, match="not a multiple of the group size 64"):
        sparsegpt.prune(weight, hessian, Target(0.5), grid=QuantGrid(4, 64))
    with pytest.raises(PruningError, match="must divide the sweep's blocksize"):  # a group's scale is taken at its first column
        sparsegpt.prune(weight, hessian, Target(0.5), blocksize=32, mask_blocksize=32, grid=QuantGrid(4, 96, act_order=False))
    static = sparsegpt.prune(weight, hessian, Target(0.5), blocksize=32, mask_blocksize=32, grid=QuantGrid(4, 96))  # scales fixed first
    assert static.scale.shape == (4, 1)
    with pytest.raises(PruningError, match="3-bit weights are not supported"):
        QuantGrid(3)
