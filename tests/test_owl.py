"""OWL layerwise sparsity: the allocation rules, and OWL through the pipeline and the command."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.text import TextSources
from calibration.windows import sample_windows
from methods import METHODS, PruningError, owl
from prune import load_model, prune_model
from prune.cli import main
from prune.models import layer_weight, prunable_layers, transformer_blocks
from tests.conftest import SMALL, assert_one_line_error, run

ratios_and_sizes = st.integers(2, 12).flatmap(
    lambda count: st.tuples(
        st.lists(st.floats(0.0, 0.2), min_size=count, max_size=count),
        st.lists(st.integers(1000, 100000), min_size=count, max_size=count),
    )
)


def weighted_mean(values, weights) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


@settings(max_examples=50, deadline=None)
@given(data=ratios_and_sizes, sparsity=st.floats(0.2, 0.8), rule=st.sampled_from(owl.RULES))
def test_parameter_weighted_mean_is_the_target(data, sparsity, rule) -> None:
    ratios, sizes = data
    allocation = owl.allocate(rule, ratios, sizes, sparsity, lam=min(0.08, sparsity, 1 - sparsity))
    assert weighted_mean(allocation, sizes) == pytest.approx(sparsity, abs=1e-6)
    assert all(0 <= s < 1 for s in allocation)


@settings(max_examples=50, deadline=None)
@given(data=ratios_and_sizes, sparsity=st.floats(0.2, 0.8), rule=st.sampled_from(owl.RULES))
def test_more_outliers_lower_sparsity(data, sparsity, rule) -> None:
    ratios, sizes = data
    allocation = owl.allocate(rule, ratios, sizes, sparsity, lam=min(0.08, sparsity, 1 - sparsity))
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert allocation[i] <= allocation[j] + 1e-12


@settings(max_examples=50, deadline=None)
@given(data=ratios_and_sizes, sparsity=st.floats(0.2, 0.8), lam=st.floats(0.01, 0.1))
def test_clipped_rule_stays_within_s_plus_minus_lambda(data, sparsity, lam) -> None:
    ratios, sizes = data
    lam = min(lam, sparsity, 1 - sparsity)
    allocation = owl.allocate_clipped(ratios, sizes, sparsity, lam)
    assert all(sparsity - lam - 1e-12 <= s <= sparsity + lam + 1e-12 for s in allocation)


@settings(max_examples=50, deadline=None)
@given(ratios=st.lists(st.floats(0.0, 0.2, allow_subnormal=False), min_size=2, max_size=12), sparsity=st.floats(0.2, 0.8), lam=st.floats(0.01, 0.1))
def test_lambda_rule_is_the_owl_code(ratios, sparsity, lam) -> None:
    """The OWL repository's allocation, transcribed: all_layer_ratio = (D − min) · (1 / (max − min) · λ · 2);
    all_layer_ratio = all_layer_ratio − mean + (1 − S); block sparsity = 1 − all_layer_ratio (blocks of equal size)."""
    lam = min(lam, sparsity, 1 - sparsity)
    if max(ratios) == min(ratios):
        return
    ratio = [(d - min(ratios)) * (1 / (max(ratios) - min(ratios)) * lam * 2) for d in ratios]
    mean = sum(ratio) / len(ratio)
    expected = [1 - (r - mean + (1 - sparsity)) for r in ratio]
    assert owl.allocate_lambda(ratios, [7] * len(ratios), sparsity, lam) == pytest.approx(expected, abs=1e-12)


def test_lambda_rules_reach_both_ends_when_outliers_vary_evenly() -> None:
    for allocate in (owl.allocate_lambda, owl.allocate_clipped):
        allocation = allocate([0.01, 0.02, 0.03, 0.04, 0.05], [10] * 5, 0.6, 0.08)
        assert allocation == pytest.approx([0.68, 0.64, 0.60, 0.56, 0.52])
        assert allocate([0.03] * 4, [5, 6, 7, 8], 0.6, 0.08) == [0.6] * 4  # no variation: uniform


def test_the_two_lambda_rules_differ_on_skewed_ratios() -> None:
    """D = [0, 0, 0, 1], S = 0.5, λ = 0.08, by hand. The OWL code: scaled [0, 0, 0, 0.16], mean 0.04, so
    S − (scaled − 0.04) = [0.54, 0.54, 0.54, 0.38]. Clipped: the last block stops at S − λ = 0.42, so the others
    take 3 s + 0.42 = 2 → s = 1.58 / 3."""
    assert owl.allocate_lambda([0, 0, 0, 1], [1] * 4, 0.5, 0.08) == pytest.approx([0.54, 0.54, 0.54, 0.38])
    assert owl.allocate_clipped([0, 0, 0, 1], [1] * 4, 0.5, 0.08) == pytest.approx([1.58 / 3] * 3 + [0.42])
    with pytest.raises(PruningError, match="outside"):
        owl.allocate_lambda([0, 0, 0, 1], [1] * 4, 0.1, 0.1)  # 0.1 − 0.15 < 0


def test_the_proportional_rule_is_proportional_to_one_minus_d() -> None:
    allocation = owl.allocate_proportional([0.0, 0.5], [1, 1], 0.5)
    assert allocation == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(PruningError):
        owl.allocate_proportional([0.0, 0.9], [1, 1], 0.9)


def test_outlier_ratio_counts_scores_above_m_times_the_mean() -> None:
    scores = [torch.tensor([[1.0, 1.0, 1.0, 10.0]]), torch.ones(2, 2)]
    # mean = 17/8 = 2.125: one score above 2 x mean, none above 5 x mean
    assert owl.outlier_ratio(scores, 2.0) == pytest.approx(1 / 8)
    assert owl.outlier_ratio(scores, 5.0) == 0.0


@pytest.mark.parametrize("method", sorted(name for name, method in METHODS.items() if method.gradients is None))
def test_owl_through_the_pipeline(model_folders, text_file, method) -> None:
    model, report = prune_model(str(model_folders["llama"]), method=method, sparsity=0.6, calibration=str(text_file),
                                allocation="owl", owl_m=3.0, owl_lambda=0.1, **SMALL)
    blocks = report.allocation["blocks"]
    assert len(blocks) == 2
    assert weighted_mean([b["sparsity"] for b in blocks], [b["parameters"] for b in blocks]) == pytest.approx(0.6, abs=1e-6)
    for index, block in enumerate(transformer_blocks(model)[1]):
        weights = [layer_weight(layer) for layer in prunable_layers(block).values()]
        zeros = sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(blocks[index]["sparsity"], abs=0.02)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)


def test_owl_refuses_n_m_and_plots_the_allocation(model_folders, text_file, tmp_path, capsys) -> None:
    common = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval", "--nsamples", "8", "--seqlen", "32", "--quiet"]
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--pattern", "2:4", "--allocation", "owl"])
    assert exit_.value.code == 2 and "does not apply to pattern 2:4" in capsys.readouterr().err
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the caller's (a notebook's inline one, say): writing the figure leaves it alone
    try:
        main([*common, "--sparsity", "0.5", "--allocation", "owl", "--owl-rule", "proportional", "--output", str(tmp_path / "out"), "--verbose"])
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert (tmp_path / "out" / "allocation.png").stat().st_size > 1000
    assert "OWL allocation (proportional rule" in capsys.readouterr().out


def test_outlier_ratios_equal_a_hand_computation_on_the_dense_model(model_folders, text_file) -> None:
    """D per block from the dense model's own forward: every prunable layer's inputs hooked, ‖X_j‖ = sqrt(mean x_j²),
    scores |W_ij|·‖X_j‖ of all the block's layers together, D = share of them above M x their mean."""
    _, report = prune_model(str(model_folders["llama"]), method="wanda", sparsity=0.5, calibration=str(text_file),
                            allocation="owl", owl_m=3.0, **SMALL)
    dense = load_model(str(model_folders["llama"]))
    windows = sample_windows(TextSources(dense.tokenizer, calibration=str(text_file), evaluation=None).calibration_ids(), 8, 32, 0)
    blocks = transformer_blocks(dense.model)[1]
    inputs: dict[tuple[int, str], torch.Tensor] = {}

    def record(key: tuple[int, str]):
        def hook(module, args) -> None:
            inputs[key] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [layer.register_forward_pre_hook(record((index, name))) for index, block in enumerate(blocks) for name, layer in prunable_layers(block).items()]
    with torch.no_grad():
        dense.model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    for index, block in enumerate(blocks):
        scores = torch.cat([(layer_weight(layer).abs() * inputs[(index, name)].pow(2).mean(0).sqrt()).flatten()
                            for name, layer in prunable_layers(block).items()])
        expected = (scores > 3.0 * scores.mean()).double().mean().item()
        assert expected > 0
        assert report.allocation["blocks"][index]["outlier_ratio"] == pytest.approx(expected, abs=1.5 / scores.numel())


def test_the_former_name_of_the_proportional_rule_is_refused_with_its_new_name(model_folders, text_file, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("allocation: owl\nowl_rule: seed\n", encoding="utf-8")
    common = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--sparsity", "0.5", "--no-eval"]
    for argv in ([*common, "--allocation", "owl", "--owl-rule", "seed"], [*common, "--config", str(recipe)]):
        assert_one_line_error(*run(argv, capsys)[::2], "'seed' is now called 'proportional'")
    with pytest.raises(PruningError, match="--owl-rule 'seed' is now called 'proportional'"):
        prune_model(str(model_folders["llama"]), sparsity=0.5, allocation="owl", owl_rule="seed", calibration=str(text_file), **SMALL)
