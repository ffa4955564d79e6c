"""MaskPro: exact N-of-M sampling, log-probabilities and their gradients, and the policy-gradient loop on toy problems."""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods.maskpro import (
    MaskPro,
    grad_log_prob_ranks,
    grad_log_prob_sequence,
    grad_log_prob_set,
    grad_log_prob_set_ranks,
    group_softmax,
    log_prob_ranks,
    log_prob_sequence,
    log_prob_set,
    order_to_mask,
    ranks_to_order,
    sample_order,
    sample_ranks,
    top_n_mask,
)


def brute_force_set_probability(probabilities: list[float], kept: tuple[int, ...]) -> float:
    """Σ over the orders of `kept` of Π_j p_σ(j) / (1 − Σ_{a<j} p_σ(a)), with explicit loops (Eq. 16)."""
    total = 0.0
    for order in itertools.permutations(kept):
        product, used = 1.0, 0.0
        for index in order:
            product *= probabilities[index] / (1 - used)
            used += probabilities[index]
        total += product
    return total


@given(st.integers(0, 10_000), st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 5), (4, 8)]))
@settings(max_examples=25, deadline=None)
def test_every_group_holds_exactly_n_distinct_positions(seed, pattern) -> None:
    n, m = pattern
    logits = torch.randn(3, 7, m, generator=torch.Generator().manual_seed(seed)) * 5
    order = sample_order(logits, n, torch.Generator().manual_seed(seed))
    mask = order_to_mask(order, m)
    assert order.shape == (3, 7, n)
    assert torch.all(mask.sum(-1) == n)
    assert torch.all(torch.sort(order, dim=-1).values.diff(dim=-1) > 0)  # distinct


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 3), (3, 5)])
def test_set_probability_matches_brute_force_and_sums_to_one(n, m) -> None:
    logits = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4][:m], dtype=torch.float64)
    probabilities = torch.softmax(logits, 0).tolist()
    total = 0.0
    for kept in itertools.combinations(range(m), n):
        mask = torch.zeros(m, dtype=torch.bool)
        mask[list(kept)] = True
        exact = brute_force_set_probability(probabilities, kept)
        assert log_prob_set(logits, mask, n).exp().item() == pytest.approx(exact, rel=1e-10)
        total += exact
    assert total == pytest.approx(1.0, abs=1e-12)


def sample_order_by_ranks(logits: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """sample_ranks as MaskPro calls it (member-major keys, three random streams drawn in a thread pool), as orders."""
    streams = [generator, *(torch.Generator().manual_seed(int(seed)) for seed in torch.randint(0, 2**31, (2,), generator=generator))]
    with ThreadPoolExecutor(2) as pool:
        return ranks_to_order(sample_ranks(logits, n, streams, pool=pool), n)


SAMPLERS = pytest.mark.parametrize("sampler", [sample_order, sample_order_by_ranks], ids=["gumbel-top-k", "ranks"])


@SAMPLERS
def test_sampled_set_frequencies_match_the_exact_probabilities(sampler) -> None:
    n, m, draws = 2, 4, 200_000
    logits = torch.tensor([1.5, 0.2, -0.7, 0.9])
    order = sampler(logits.expand(draws, m), n, torch.Generator().manual_seed(0))
    codes = (order_to_mask(order, m).long() * torch.tensor([1, 2, 4, 8])).sum(-1)
    chi_square = 0.0
    sets = list(itertools.combinations(range(m), n))
    for kept in sets:
        mask = torch.zeros(m, dtype=torch.bool)
        mask[list(kept)] = True
        expected = draws * log_prob_set(logits.double(), mask, n).exp().item()
        observed = (codes == sum(2**k for k in kept)).sum().item()
        chi_square += (observed - expected) ** 2 / expected
    assert chi_square < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


@SAMPLERS
def test_sampled_orders_follow_the_sequential_law(sampler) -> None:
    """The first draw is softmax(π); the second, given the first, is softmax over the rest (Eq. 15)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    order = sampler(logits.expand(100_000, 4), 2, torch.Generator().manual_seed(1))
    first = torch.bincount(order[:, 0], minlength=4).double() / len(order)
    assert torch.allclose(first, torch.softmax(logits.double(), 0), atol=0.006)
    after_zero = order[order[:, 0] == 0, 1]
    rest = torch.softmax(logits[1:].double(), 0)
    assert torch.allclose(torch.bincount(after_zero, minlength=4)[1:].double() / len(after_zero), rest, atol=0.01)


def test_gradients_of_log_probabilities_match_autograd_and_finite_differences() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, 8, generator=generator, dtype=torch.float64)
    order = sample_order(logits, 4, generator)
    leaf = logits.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(log_prob_sequence(leaf, order).sum(), leaf)
    assert torch.allclose(grad_log_prob_sequence(logits, order), expected, atol=1e-12)

    mask = order_to_mask(order, 8)
    analytic = grad_log_prob_set(logits, mask, 4)
    step = 1e-6
    for index in [(0, 0, 0), (2, 1, 5), (4, 2, 7)]:
        shifted_up, shifted_down = logits.clone(), logits.clone()
        shifted_up[index] += step
        shifted_down[index] -= step
        numeric = (log_prob_set(shifted_up, mask, 4) - log_prob_set(shifted_down, mask, 4)).sum() / (2 * step)
        assert analytic[index].item() == pytest.approx(numeric.item(), abs=1e-6)


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (4, 8), (8, 16)])
def test_sampled_ranks_are_a_permutation_per_group_and_do_not_depend_on_the_thread_pool(n, m) -> None:
    logits = torch.randn(6, 5, m, generator=torch.Generator().manual_seed(n)) * 4

    def streams() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (9, 10, 11)]

    ranks = sample_ranks(logits, n, streams())
    assert ranks.dtype == torch.int8
    assert torch.equal(ranks.sort(dim=-1).values, torch.arange(m, dtype=torch.int8).expand_as(ranks))  # a permutation per group
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(sample_ranks(logits, n, streams(), pool=pool, scratch=torch.empty(logits.numel() + 7)), ranks)


def test_rank_gradient_equals_the_sequence_gradient_and_survives_large_logits() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 8, generator=generator, dtype=torch.float64) * 3
    ranks = sample_ranks(logits, 3, generator)
    assert torch.allclose(grad_log_prob_ranks(logits, ranks, 3), grad_log_prob_sequence(logits, ranks_to_order(ranks, 3)), atol=1e-12)
    assert torch.allclose(log_prob_ranks(logits, ranks, 3), log_prob_sequence(logits, ranks_to_order(ranks, 3)), atol=1e-12)
    for n in (1, 2, 3, 4):
        drawn = sample_ranks(logits, n, generator)
        assert torch.allclose(grad_log_prob_set_ranks(logits, drawn, n), grad_log_prob_set(logits, drawn < n, n), atol=1e-10)
    spread = torch.tensor([[[300.0, -300.0, 0.0, 150.0]]])  # probabilities that underflow in float32
    gradient = grad_log_prob_ranks(spread, sample_ranks(spread, 2, generator), 2)
    assert torch.isfinite(gradient).all()
    assert torch.isfinite(grad_log_prob_set_ranks(spread, sample_ranks(spread, 2, generator), 2)).all()
    # float32 groups where 1 − p_a underflows (a member far ahead of all others) or does not: the closed-form
    # N = 2 gradient against the float64 autograd one
    extreme = torch.tensor([[[300.0, -300.0, 0.0, 150.0], [10.0, 0.0, 0.0, 0.0], [200.0, 100.0, 0.0, -50.0], [0.0, 0.0, 0.0, -90.0]]])
    ranks = torch.tensor([[[0, 3, 2, 1], [2, 0, 1, 3], [1, 2, 0, 3], [3, 2, 1, 0]]], dtype=torch.int8)
    expected = grad_log_prob_set(extreme.double(), ranks < 2, 2)
    assert torch.allclose(grad_log_prob_set_ranks(extreme, ranks, 2).double(), expected, atol=1e-6)
    with_minus_infinity = torch.tensor([[1.0, -math.inf, 0.5, 2.0]])
    assert torch.allclose(group_softmax(with_minus_infinity), torch.softmax(with_minus_infinity, -1))


def test_top_n_mask_keeps_the_largest_logits() -> None:
    logits = torch.tensor([[[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 6.0, -2.0]]])
    assert top_n_mask(logits, 2).tolist() == [[[False, True, False, True], [True, False, True, False]]]


def toy_problem(seed: int = 0, rows: int = 2, columns: int = 8):
    """A small linear layer at 2:4 with independent unit inputs. Each group of 4 weights holds two large
    (|w| in [1, 1.5]) and two small (|w| in [0.2, 0.4]) in random places. L(mask) is the relative output error
    ||x (W ⊙ m)ᵀ − x Wᵀ||² / ||x Wᵀ||² on a minibatch, so the best mask keeps the two largest w²·E[x²] of
    each group (known in closed form), and minibatches make the loss noisy."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(8192, columns, generator=generator)
    groups = (rows, columns // 4)
    large = 1.0 + 0.5 * torch.rand(*groups, 2, generator=generator)
    small = 0.2 + 0.2 * torch.rand(*groups, 2, generator=generator)
    places = torch.rand(*groups, 4, generator=generator).argsort(-1)
    signs = torch.where(torch.rand(*groups, 4, generator=generator) < 0.5, -1.0, 1.0)
    weight = (torch.cat([large, small], -1).gather(-1, places) * signs).flatten(1)
    best = top_n_mask((weight.pow(2) * inputs.pow(2).mean(0)).reshape(*groups, 4), 2).flatten(1)

    def loss(mask: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        batch = inputs if rows is None else inputs[rows]
        dense = batch @ weight.T
        return ((batch @ (weight * mask).T - dense).pow(2).sum() / dense.pow(2).sum()).item()

    return best, inputs, loss


@pytest.mark.parametrize("estimator", ["set", "sequence"])
def test_maskpro_finds_the_best_mask_from_a_wrong_start(estimator) -> None:
    target, inputs, loss = toy_problem()
    wrong = ~target  # each group keeps exactly the two the best mask drops
    refiner = MaskPro({"layer": wrong}, n=2, m=4, lr=1.0, logit_scale=1.0, alpha=0.9, estimator=estimator, seed=0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        rows = torch.randint(0, len(inputs), (256,), generator=generator)
        orders = refiner.sample()
        residual = loss(refiner.masks(orders)["layer"], rows) - loss(wrong, rows)
        refiner.update(orders, residual)
    assert torch.equal(refiner.final_masks()["layer"], target)
    assert loss(target) < 0.1 < 0.9 < loss(wrong)


def test_the_tracker_reduces_the_variance_of_the_update() -> None:
    """Theorem 2 of the MaskPro paper on the toy problem: at fixed logits, with a minibatch per step, the update that
    MaskPro.update applies, (L(m) − L(m₀) − δ) ∇log p, has a smaller variance than L(m) ∇log p (Eq. 10) and than
    the raw residual (Eq. 11). The logits are put back after each update, so only the tracker δ moves."""
    _, inputs, loss = toy_problem(seed=3, rows=4, columns=16)
    start = torch.ones(4, 16, dtype=torch.bool)
    start[:, 1::2] = False
    refiner = MaskPro({"layer": start}, n=2, m=4, logit_scale=2.0, seed=0)
    fixed = refiner.logits["layer"].clone()
    generator = torch.Generator().manual_seed(4)
    raw, residual_only, tracked = [], [], []
    for step in range(3000):
        rows = torch.randint(0, len(inputs), (16,), generator=generator)
        orders = refiner.sample()
        value = loss(refiner.masks(orders)["layer"], rows)
        residual = value - loss(start, rows)
        gradient = refiner.grad_log_prob("layer", orders["layer"]).flatten().clone()
        refiner.update(orders, residual)
        applied = (fixed - refiner.logits["layer"]).flatten() / refiner.lr
        refiner.logits["layer"].copy_(fixed)
        if step >= 500:  # let the tracker settle first
            raw.append(value * gradient)
            residual_only.append(residual * gradient)
            tracked.append(applied)

    def total_variance(updates: list[torch.Tensor]) -> float:
        return torch.stack(updates).var(dim=0).sum().item()

    assert total_variance(tracked) < total_variance(residual_only) < total_variance(raw)
    assert math.isfinite(total_variance(tracked))


def test_an_update_over_several_processes_moves_by_the_mean_of_their_estimates() -> None:
    """(1/K) Σ_k (r_k − δ) ∇log p(m_k) for the logits and the mean residual for δ, K = 2; the other process's part is
    handed in by a stand-in for the all-reduce."""
    generator = torch.Generator().manual_seed(0)
    initial = {"layer": torch.rand(8, 16, generator=generator).argsort(1) < 8}
    first, second = MaskPro(initial, 2, 4, seed=0, lr=0.5), MaskPro(initial, 2, 4, seed=1, lr=0.5)
    first.tracker = second.tracker = 0.1
    draws = {"first": first.sample(), "second": second.sample()}
    residuals = {"first": 0.7, "second": -0.3}
    gradients = {who: (refiner.grad_log_prob("layer", draws[who]["layer"]).clone()) for who, refiner in (("first", first), ("second", second))}
    expected_logits = first.logits["layer"] - 0.5 * ((0.7 - 0.1) * gradients["first"] + (-0.3 - 0.1) * gradients["second"]) / 2
    expected_tracker = first.alpha * 0.1 + (1 - first.alpha) * (0.7 - 0.3) / 2
    others = [gradients["second"] * (-0.3 - 0.1), torch.tensor([-0.3], dtype=torch.float64)]
    taken = first.update(draws["first"], residuals["first"], lambda tensor: tensor.add_(others.pop(0).to(tensor.dtype)), processes=2)
    torch.testing.assert_close(first.logits["layer"], expected_logits)
    assert taken == pytest.approx(0.2) and first.tracker == pytest.approx(expected_tracker) and not others
