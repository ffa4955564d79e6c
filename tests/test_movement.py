"""Movement pruning's mathematics (methods/movement.py) against the pruning deep-dive §6 written out by hand."""

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


def classifier_and_batches(tokenizer, seed: int = 0):
    """A tiny random BERT token classifier for the synthetic sentences' labels, and endless labelled batches of them."""
    from calibration.sentences import labelled_batches
    from tests.conftest import synthetic_sentences, tiny_model

    sentences = synthetic_sentences(tokenizer, 64, seed)
    names = sorted({tag for sentence in sentences for tag in sentence.tags})
    model = tiny_model("bert", len(tokenizer), seed=seed)
    model.classifier = torch.nn.Linear(model.config.hidden_size, len(names))
    model.config.num_labels = model.num_labels = len(names)
    return model, labelled_batches(tokenizer, sentences, names, 8, seed=seed)


def test_hard_movement_pruning_reaches_the_target_in_every_layer_and_leaves_a_plain_model(tokenizer) -> None:
    from prune.models import all_prunable_layers, layer_weight
    from prune.movement import MovementSettings, movement_prune

    model, batches = classifier_and_batches(tokenizer)
    dense = {name: layer_weight(layer).clone() for name, layer in all_prunable_layers(model).items()}
    result = movement_prune(model, batches, MovementSettings(sparsity=0.6, steps=12, lr=1e-3, progress=False), torch.device("cpu"))
    assert len(result.losses) == 12 and result.sparsity == pytest.approx(0.6, abs=1e-3)
    for name, layer in all_prunable_layers(model).items():
        assert not hasattr(layer, "parametrizations") and isinstance(layer.weight, torch.nn.Parameter)
        assert result.layers[name] == pytest.approx(0.6, abs=1e-3)
        assert not torch.equal(layer_weight(layer) != 0, dense[name] != 0) or result.layers[name] == 0  # a mask was applied
    assert all(name.endswith(("weight", "bias")) for name, _ in model.named_parameters())  # no scores left behind


def test_soft_movement_sparsity_grows_with_the_penalty(tokenizer) -> None:
    from prune.movement import MovementSettings, movement_prune

    sparsities = []
    for penalty in (0.0, 3.0):
        model, batches = classifier_and_batches(tokenizer)
        settings = MovementSettings(variant="soft", steps=15, score_lr=0.05, penalty=penalty, threshold=-0.1, warmup=0.0, cooldown=0.0,
                                    progress=False)
        sparsities.append(movement_prune(model, batches, settings, torch.device("cpu")).sparsity)
    assert sparsities[1] > sparsities[0] + 0.2, sparsities


def test_movement_settings_refuse_what_cannot_work() -> None:
    from prune.movement import MovementSettings

    for settings, message in ((MovementSettings(variant="medium"), "hard or soft"), (MovementSettings(threshold=0.1), "below the scores' start"),
                              (MovementSettings(warmup=0.6, cooldown=0.5), "shares of the steps"), (MovementSettings(steps=0), "at least one step")):
        with pytest.raises(PruningError, match=message):
            settings.check()
