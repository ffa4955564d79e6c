"""The source protocol of the quadratic benchmark (benchmarks/heterogeneous_quadratic.py): its Adam without bias
correction, its schedule and its data, against hand transcriptions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heterogeneous_quadratic.py"


@pytest.fixture(scope="module")
def quadratic():
    return load_script(SCRIPT)


def test_adam_without_bias_correction_is_its_two_moment_recursion(quadratic) -> None:
    parameter = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = quadratic.AdamWithoutBiasCorrection([parameter], lr=0.1)
    m = v = torch.zeros(2, dtype=torch.float64)
    expected = parameter.detach().clone()
    for gradient in (torch.tensor([0.5, 1.0]), torch.tensor([-0.25, 2.0])):
        parameter.grad = gradient.double()
        optimizer.step()
        m = 0.95 * m + 0.05 * gradient
        v = 0.95 * v + 0.05 * gradient**2
        expected = expected - 0.1 * m / (v.sqrt() + 1e-8)  # no division by 1 − β^t
        torch.testing.assert_close(parameter.detach(), expected)
    torch.testing.assert_close(optimizer.state[parameter]["exp_avg"], m.to(torch.float64))  # where Magma reads μ


def test_the_rate_warms_up_linearly_then_decays_by_cosine_to_zero(quadratic) -> None:
    factors = [quadratic.warmup_cosine(step, steps=100, warmup=5) for step in range(101)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == 1.0 and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert factors[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))


@pytest.mark.parametrize("arrangement", ["heterogeneous", "homogeneous"])
def test_the_samples_average_to_the_block_diagonal_hessian_of_the_source_labels(quadratic, arrangement) -> None:
    hessian, samples = quadratic.source_problem(quadratic.SOURCE_ARRANGEMENTS[arrangement], seed=3)
    torch.testing.assert_close(samples.T @ samples / 9, hessian)  # H = (1/n) Σ z_i z_iᵀ
    for index, values in enumerate(quadratic.SOURCE_ARRANGEMENTS[arrangement]):
        block = hessian[3 * index : 3 * index + 3, 3 * index : 3 * index + 3]
        torch.testing.assert_close(torch.linalg.eigvalsh(block), torch.tensor(values, dtype=torch.float64))
    assert torch.count_nonzero(hessian[:3, 3:]) == 0  # block-diagonal
    if arrangement == "heterogeneous":  # the source's label: one scale per block
        assert quadratic.SOURCE_ARRANGEMENTS[arrangement][0] == [1, 2, 3]
