"""What every registered one-shot method must do, whatever it is: generated from the registry, so that a method added
to methods/registry.py is held to it without a line here."""

from __future__ import annotations

import inspect

import pytest
import torch

from methods import METHODS, PruningError, Target
from methods.base import COLUMN_NORMS, FISHER, HESSIAN, Method
from methods.gptq import quantized
from methods.quantize import QuantGrid, on_grid

ROWS, COLUMNS = 12, 32
TARGETS = {"50%": Target(0.5), "30%": Target(0.3), "2:4": Target.from_options(pattern="2:4"), "1:4": Target.from_options(pattern="1:4")}


def statistic_for(method: Method, weight: torch.Tensor, seed: int) -> torch.Tensor | None:
    """The statistic the method declares, built from random calibration data as the pipeline would build it."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, COLUMNS, generator=generator) * torch.linspace(0.2, 3.0, COLUMNS)
    if method.statistic == HESSIAN:
        return 2 * inputs.T @ inputs / len(inputs)
    if method.statistic == COLUMN_NORMS:
        return inputs.pow(2).mean(dim=0).sqrt()
    if method.statistic == FISHER:
        options = method.resolved_options({})
        statistic = method.gradients.start(weight, options, torch.float64)
        gradients = torch.randn(64, weight.numel(), generator=generator, dtype=torch.float64) * 1e-2
        for start in range(0, len(gradients), method.gradients.batch):
            method.gradients.add(statistic, gradients[start:start + method.gradients.batch], len(gradients))
        return statistic
    return None


def prune(method: Method, weight: torch.Tensor, target: Target, seed: int = 0):
    options = method.resolved_options({}) if method.gradients is None else {}  # a gradient method's options shape its statistic
    return method.run(weight, statistic_for(method, weight, seed), target, options)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(7)) * torch.rand(ROWS, 1, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("target_name", sorted(TARGETS))
def test_the_method_reaches_its_target_with_exact_zeros(name, target_name, weight) -> None:
    method, target = METHODS[name], TARGETS[target_name]
    result = prune(method, weight, target)
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape and result.weight.shape == weight.shape
    assert torch.equal(result.weight[~result.mask], torch.zeros_like(result.weight[~result.mask]))  # exact zeros, not small ones
    if target.is_nm:
        kept = result.mask.reshape(ROWS, COLUMNS // target.m, target.m).sum(dim=2)
        assert bool((kept <= target.n).all()), "an N:M group keeps more than N weights"
        assert result.mask.sum().item() == ROWS * COLUMNS * target.n // target.m
    else:
        reached = 1 - result.mask.float().mean().item()
        assert abs(reached - target.sparsity) <= 1 / COLUMNS, reached
    assert result.loss >= 0 and torch.isfinite(torch.tensor(result.loss))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_is_deterministic(name, weight) -> None:
    first, second = prune(METHODS[name], weight, Target(0.5)), prune(METHODS[name], weight.clone(), Target(0.5))
    assert torch.equal(first.mask, second.mask) and torch.equal(first.weight, second.weight) and first.loss == second.loss


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_refuses_unknown_and_negative_options(name) -> None:
    method = METHODS[name]
    with pytest.raises(PruningError, match="takes no option"):
        method.check_options(Target(0.5), {"no_such_option": 1})
    for option in method.options:
        with pytest.raises(PruningError):
            method.check_options(Target(0.5), {option.name: -1})


def test_a_weight_update_is_declared_by_what_the_method_returns(weight) -> None:
    """Methods without a Hessian-based update keep the surviving weights as they were."""
    for name, method in METHODS.items():
        result = prune(method, weight, Target(0.5))
        if method.statistic in (None, COLUMN_NORMS):
            assert torch.equal(result.weight[result.mask], weight[result.mask]), name


@pytest.mark.parametrize("name", sorted(name for name, method in METHODS.items() if method.gradients is None))
@pytest.mark.parametrize("target_name", ["50%", "2:4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_quantized_method_reaches_its_target_and_rounds_every_kept_weight_to_the_grid(name, target_name, act_order, weight) -> None:
    """`quantized(method, grid)` (what --quantize runs) for every method that takes calibration activations: the
    target reached with exact zeros, every kept weight q · s with q a `bits`-bit integer, and, unless the method
    rounds inside its own sweep, the mask the method chose alone (GPTQ moves weights, never the mask)."""
    method, target, grid = METHODS[name], TARGETS[target_name], QuantGrid(4, 16, act_order=act_order)
    wrapped = quantized(method, grid)
    assert wrapped.statistic == HESSIAN and wrapped.name == method.name and wrapped.options == method.options
    hessian = statistic_for(wrapped, weight, seed=0)
    result = wrapped.run(weight, hessian, target, method.resolved_options({}))
    assert torch.equal(result.weight[~result.mask], torch.zeros_like(result.weight[~result.mask]))
    assert result.mask.sum().item() == ROWS * COLUMNS // 2  # 50 % and 2:4 keep half
    assert result.scale is not None and result.scale.shape == (ROWS, COLUMNS // 16)
    assert torch.equal(on_grid(result.weight, result.scale, grid), result.weight)
    levels = result.weight / result.scale.repeat_interleave(16, dim=1)
    assert levels.round().abs().max() <= 2**3 and torch.allclose(levels, levels.round(), atol=1e-4)
    if not method.quantizes:
        alone = prune(method, weight, target)
        assert torch.equal(result.mask, alone.mask)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_declared_options_are_what_the_method_takes(name) -> None:
    """Every keyword a method's functions take is a declared option (so the pipeline resolves and checks it), and
    every declared option is taken, but for the protocol's own: the `grid` of a method that rounds in its sweep (and
    the fixed `masks` of its GPTQ), and the cross-layer `mask` of a method built on task-loss gradients, whose
    options shape the statistic instead."""
    method = METHODS[name]
    declared = {option.name for option in method.options}
    for function in filter(None, (method.prune, method.prune_together)):
        parameters = list(inspect.signature(function).parameters.values())
        leading = 3  # (weight(s), statistic, target): a method without a statistic is given None
        assert all(parameter.kind == parameter.KEYWORD_ONLY for parameter in parameters[leading:]), f"{name}: options are keyword-only"
        taken = {parameter.name for parameter in parameters[leading:]}
        if method.gradients is not None:
            assert taken == {"mask"}, name
            continue
        protocol = ({"grid"} | ({"masks"} if function is method.prune_together else set())) if method.quantizes else set()
        assert taken == declared | protocol, name
