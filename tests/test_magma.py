"""The Magma / SkipUpdate optimizer wrapper."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.magma import Magma


def quadratic_problem(seed: int = 0) -> tuple[torch.nn.Parameter, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(6, 5, generator=generator)), torch.randn(6, 5, generator=generator)


def loss_of(parameter: torch.nn.Parameter, target: torch.Tensor) -> torch.Tensor:
    return ((parameter - target) ** 2 * torch.arange(1, 6)).sum()


@pytest.mark.parametrize("make_base", [
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    lambda params: torch.optim.Adam(params, lr=0.01),
    lambda params: torch.optim.RMSprop(params, lr=0.01),
])
@pytest.mark.parametrize("granularity", ["tensor", "row", "column", "element"])
def test_p_one_and_score_one_is_the_base_optimizer(make_base, granularity) -> None:
    wrapped, target = quadratic_problem()
    plain = torch.nn.Parameter(wrapped.detach().clone())
    magma = Magma(make_base([wrapped]), p=1.0, fixed_score=1.0, granularity=granularity)
    base = make_base([plain])
    for _ in range(20):
        for optimizer, parameter in ((magma, wrapped), (base, plain)):
            optimizer.zero_grad()
            loss_of(parameter, target).backward()
            optimizer.step()
    torch.testing.assert_close(wrapped.detach(), plain.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("granularity", ["tensor", "row", "element"])
def test_fraction_of_updated_blocks_is_p(granularity) -> None:
    parameters = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(10)]
    magma = Magma(torch.optim.AdamW(parameters, lr=0.01), p=0.3, granularity=granularity, seed=1)
    fractions = []
    for _ in range(200):
        magma.zero_grad()
        sum((p**2).sum() for p in parameters).backward()
        magma.step()
        fractions.append(magma.updated_fraction)
    blocks = {"tensor": 10, "row": 80, "element": 320}[granularity] * 200
    mean = sum(fractions) / len(fractions)
    assert abs(mean - 0.3) < 4 * (0.3 * 0.7 / blocks) ** 0.5  # four binomial standard deviations


def test_skipupdate_is_unbiased() -> None:
    gradient = torch.randn(4, 3)
    start = torch.randn(4, 3)
    base_step = 0.1 * gradient  # plain SGD
    updates = []
    for seed in range(2000):
        parameter = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.SGD([parameter], lr=0.1)
        wrapper = Magma(optimizer, mode="skipupdate", p=0.5, seed=seed)
        parameter.grad = gradient.clone()
        wrapper.step()
        updates.append(start - parameter.detach())
    mean = torch.stack(updates).mean(0)
    # each update is 2Δ or 0: the mean of 2000 has standard deviation |Δ| / sqrt(2000); allow five
    torch.testing.assert_close(mean, base_step, atol=5 * base_step.abs().max().item() / 2000**0.5, rtol=0)


def test_pruned_weights_stay_zero_and_state_round_trips() -> None:
    parameter, target = quadratic_problem(3)
    keep = torch.rand(6, 5, generator=torch.Generator().manual_seed(4)) > 0.5
    with torch.no_grad():
        parameter.mul_(keep)
    magma = Magma(torch.optim.AdamW([parameter], lr=0.05), keep_masks={parameter: keep}, granularity="row", debug=True, seed=5)

    def run(optimizer: Magma, steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of(parameter, target).backward()
            optimizer.step()
            assert torch.all(parameter[~keep] == 0)

    run(magma, 30)
    saved_state, saved_parameter = copy.deepcopy(magma.state_dict()), parameter.detach().clone()  # as torch.save would
    run(magma, 30)
    continued = parameter.detach().clone()

    with torch.no_grad():
        parameter.copy_(saved_parameter)
    restored = Magma(torch.optim.AdamW([parameter], lr=0.05), keep_masks={parameter: keep}, granularity="row", seed=99)
    restored.load_state_dict(saved_state)
    run(restored, 30)
    assert torch.equal(parameter.detach(), continued)


def test_magma_uses_the_alignment_of_gradient_and_momentum() -> None:
    parameter = torch.nn.Parameter(torch.zeros(3))
    magma = Magma(torch.optim.Adam([parameter], lr=0.1), p=1.0, tau=2.0)
    parameter.grad = torch.ones(3)
    magma.step()
    # after one step Adam's first moment is 0.1 g: perfectly aligned, s = sigmoid(1 / 2)
    assert magma.scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())
    parameter.grad = -torch.ones(3)
    magma.step()
    # μ = 0.9·0.1 g − 0.1 g = −0.01 g: aligned with the new gradient again
    assert magma.scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


@pytest.mark.parametrize("mode", ["magma", "skipupdate"])
@pytest.mark.parametrize("make_base", [
    lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
    lambda params: torch.optim.Adam(params, lr=0.05),
    lambda params: torch.optim.AdamW([{"params": [parameter]} for parameter in params], lr=0.05, weight_decay=0.1),  # one base step
])
def test_learning_rate_scaling_equals_rescaling_the_update(monkeypatch, mode, make_base) -> None:
    """The fast path (whole-tensor scale as a factor on Adam's learning rate, alignment from the upcoming moment)
    takes the same steps as stepping the base and rescaling θ_before − θ_after."""
    def train(fast: bool) -> tuple[list[torch.Tensor], dict]:
        with monkeypatch.context() as patch:
            if not fast:
                patch.setattr(Magma, "_scales_by_learning_rate", lambda self, group: False)
            parameters = [torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))) for seed in range(3)]
            targets = [torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + seed)) for seed in range(3)]
            optimizer = Magma(make_base(parameters), mode=mode, p=0.6, seed=4)
            assert optimizer._scales_by_learning_rate(optimizer.param_groups[0]) == fast
            for _ in range(25):
                optimizer.zero_grad()
                sum(loss_of(parameter, target) for parameter, target in zip(parameters, targets, strict=True)).backward()
                optimizer.step()
            return [parameter.detach().clone() for parameter in parameters], optimizer.scores

    fast_parameters, fast_scores = train(fast=True)
    slow_parameters, slow_scores = train(fast=False)
    for fast, slow in zip(fast_parameters, slow_parameters, strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for index in slow_scores:
        torch.testing.assert_close(fast_scores[index], slow_scores[index], rtol=1e-5, atol=1e-6)


def magma_by_hand(start: torch.Tensor, gradients: list[torch.Tensor], kept: list[torch.Tensor], *, rows: bool, smoothing: float = 0.9,
                  lr: float = 0.05, weight_decay: float = 0.01, tau: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of the Magma paper around AdamW, written out in float64. Every step, whatever the mask: AdamW's moments
    μ ← β₁μ + (1 − β₁)g, ν ← β₂ν + (1 − β₂)g², its update Δ = lr·wd·θ + lr·μ̂/(√ν̂ + ε) (bias-corrected by the step
    count), the score s̃ = sigmoid(cos(μ, g)/τ) per block (the whole tensor, or each row) and s = 0.9 s + 0.1 s̃
    (s = s̃ at the first step). Then θ ← θ − s·m·Δ with m = kept[t] per block. Returns (θ, μ)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    theta = start.double().clone()
    moment, second = torch.zeros_like(theta), torch.zeros_like(theta)
    score = None
    for step, (gradient, mask) in enumerate(zip(gradients, kept, strict=True), 1):
        gradient = gradient.double()
        moment = beta1 * moment + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient**2
        update = lr * weight_decay * theta + lr * (moment / (1 - beta1**step)) / ((second / (1 - beta2**step)).sqrt() + eps)
        if rows:
            cosine = (moment * gradient).sum(1) / (moment.norm(dim=1) * gradient.norm(dim=1))
        else:
            cosine = (moment * gradient).sum() / (moment.norm() * gradient.norm())
        fresh = torch.sigmoid(cosine / tau)
        score = fresh if score is None else smoothing * score + (1 - smoothing) * fresh
        theta = theta - ((score * mask.double()).unsqueeze(1) if rows else score * mask.double()) * update
    return theta, moment


def run_magma(start: torch.Tensor, gradients: list[torch.Tensor], *, p: float, granularity: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The wrapper on the same gradients: (θ, AdamW's first moment, which blocks moved at each step)."""
    parameter = torch.nn.Parameter(start.clone())
    magma = Magma(torch.optim.AdamW([parameter], lr=0.05, weight_decay=0.01), p=p, tau=2.0, granularity=granularity, seed=seed)
    moved = []
    for gradient in gradients:
        before = parameter.detach().clone()
        parameter.grad = gradient.clone()
        magma.step()
        changed = parameter.detach() != before
        moved.append(changed.any(1) if granularity == "row" else changed.any().reshape(()))
    return parameter.detach(), magma.base.state[parameter]["exp_avg"], moved


def gradients_with_reversals(steps: int, seed: int) -> list[torch.Tensor]:
    """A steady direction plus noise, reversed (at half the size) every fourth step: the momentum then points
    against the new gradient."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(4, 6, generator=generator)
    return [(-0.5 if step % 4 == 3 else 1.0) * direction + 0.3 * torch.randn(4, 6, generator=generator) for step in range(steps)]


def cosines_by_hand(gradients: list[torch.Tensor]) -> list[float]:
    moment = torch.zeros_like(gradients[0], dtype=torch.float64)
    values = []
    for gradient in gradients:
        moment = 0.9 * moment + 0.1 * gradient.double()
        values.append(((moment * gradient).sum() / (moment.norm() * gradient.norm())).item())
    return values


def test_magma_scales_a_misaligned_update_down_as_algorithm_1_says() -> None:
    gradients = gradients_with_reversals(6, seed=1)
    assert min(cosines_by_hand(gradients)) < -0.3  # the case is really misaligned
    start = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    theta, moment, _ = run_magma(start, gradients, p=1.0, granularity="tensor")
    expected, expected_moment = magma_by_hand(start, gradients, [torch.tensor(1.0)] * 6, rows=False)
    torch.testing.assert_close(theta.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moment.double(), expected_moment, atol=1e-7, rtol=1e-5)


def test_magma_uses_the_smoothed_score_not_the_fresh_one() -> None:
    gradients = gradients_with_reversals(8, seed=3)
    start = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    ones = [torch.ones(4)] * 8
    smoothed, _ = magma_by_hand(start, gradients, ones, rows=True)
    fresh, _ = magma_by_hand(start, gradients, ones, rows=True, smoothing=0.0)
    assert (smoothed - fresh).abs().max() > 1e-3  # the two readings of the algorithm part ways here
    theta, _, _ = run_magma(start, gradients, p=1.0, granularity="row")
    torch.testing.assert_close(theta.double(), smoothed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_adam_moments_advance_on_steps_whose_update_is_masked(granularity: str) -> None:
    gradients = gradients_with_reversals(12, seed=5)
    start = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    theta, moment, moved = run_magma(start, gradients, p=0.5, granularity=granularity, seed=7)
    masked = sum(int((~step).sum()) for step in moved)
    assert 0 < masked < sum(step.numel() for step in moved)  # some blocks were skipped, some updated
    expected, expected_moment = magma_by_hand(start, gradients, [step.float() for step in moved], rows=granularity == "row")
    torch.testing.assert_close(theta.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moment.double(), expected_moment, atol=1e-7, rtol=1e-5)
