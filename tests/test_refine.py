"""The MaskPro refinement stage: masks stay N:M, the weights under them are the documented ones, the report is complete."""

from __future__ import annotations

import json

import pytest
import torch

from eval.sparsity import nm_valid
from methods import PruningError, Target
from prune import load_model, prune_model
from prune.models import layer_weight, prunable_layers, transformer_blocks
from prune.stages.refine import RefineSettings, put_weights_under_mask, refine
from tests.conftest import FAST, SMALL, assert_one_line_error, run, tiny_model

QUICK = {"steps": 12, "batch": 2, "seqlen": 32, "windows": 8, "holdout": 4, "log_every": 4}


def named_layer_weights(model) -> dict[str, torch.Tensor]:
    blocks_name, blocks = transformer_blocks(model)
    return {f"{blocks_name}.{index}.{name}": layer_weight(layer).detach().clone()
            for index, block in enumerate(blocks) for name, layer in prunable_layers(block).items()}


@pytest.mark.parametrize(("architecture", "pattern", "estimator"), [("llama", "2:4", "sequence"), ("gpt2", "4:8", "set"), ("opt", "8:16", "sequence")])
def test_refinement_keeps_the_pattern_and_reports(model_folders, text_file, architecture, pattern, estimator) -> None:
    loaded = load_model(str(model_folders[architecture]))
    settings = RefineSettings(estimator=estimator, candidates=2, **QUICK)
    model, report = prune_model(loaded, method="sparsegpt", pattern=pattern, calibration=str(text_file), eval_data=str(text_file),
                                eval_windows=2, refine=settings, **SMALL)
    n, m = map(int, pattern.split(":"))
    for weight in named_layer_weights(model).values():
        assert nm_valid(weight, n, m) and (weight == 0).float().mean().item() == pytest.approx(1 - n / m)
    refined = report.refine
    assert [point["step"] for point in refined["curve"]] == [4, 8, 12]
    assert refined["layers"] == len(report.layers) and 0 <= refined["changed_groups"] <= 1
    assert set(refined["heldout"]["losses"]) == {"one-shot", "top-N", "draw 1", "draw 2"}
    assert refined["heldout"]["kept"] == min(refined["heldout"]["losses"], key=refined["heldout"]["losses"].get)
    parts = refined["seconds_sampling"] + refined["seconds_forward"] + refined["seconds_update"]
    assert 0 < parts <= refined["seconds"]
    assert refined["perplexity_before"] == pytest.approx(report.perplexity["pruned"]["value"])
    assert refined["perplexity_after"] == pytest.approx(report.perplexity["refined"]["value"])
    assert "refinement (maskpro" in report.table()


@pytest.mark.parametrize("weights", ["oneshot", "dense"])
def test_the_weights_under_the_mask_are_the_documented_ones(tokenizer, weights) -> None:
    """Every weight kept after refinement is the dense original, or (oneshot) the one-shot weight where m₀ kept it."""
    model = tiny_model("llama", len(tokenizer))
    dense = named_layer_weights(model)
    layers = {name: model.get_submodule(name) for name in dense}
    oneshot = {}
    for name, layer in layers.items():  # a one-shot stage that also changed the kept weights
        weight = dense[name].clone() * 1.5
        weight.reshape(weight.shape[0], -1, 4)[..., 2:] = 0
        layer.weight.data.copy_(weight)
        oneshot[name] = weight
    under = {name: torch.where(oneshot[name] != 0, oneshot[name], dense[name]) if weights == "oneshot" else dense[name] for name in layers}
    initial = put_weights_under_mask(layers, dense, weights)
    assert all(torch.equal(initial[name], oneshot[name] != 0) and torch.equal(layer_weight(layers[name]), under[name]) for name in layers)
    ids = torch.randint(0, len(tokenizer), (64, 16), generator=torch.Generator().manual_seed(0))
    settings = RefineSettings(steps=30, lr=500.0, logit_scale=1.0, alpha=0.9, batch=4, seqlen=16, windows=32, holdout=4, weights=weights)
    result = refine(model, layers, initial, Target.from_options(pattern="2:4"), ids[:32], ids[32:36], settings, torch.device("cpu"), progress=False)
    assert result.changed_groups > 0  # a large learning rate and a weak prior: the masks move
    for name, layer in layers.items():
        weight = layer_weight(layer)
        kept = weight != 0
        assert nm_valid(weight, 2, 4) and int(kept.sum()) == weight.numel() // 2
        assert torch.equal(weight[kept], under[name][kept])
    assert not any(hasattr(layer, "parametrizations") for layer in layers.values())  # the masks are baked in


def test_a_vanishing_learning_rate_leaves_the_one_shot_model_unchanged(model_folders, text_file) -> None:
    loaded = load_model(str(model_folders["gpt2"]))  # Conv1D: masks follow the stored (in, out) layout
    reference, _ = prune_model(load_model(str(model_folders["gpt2"])), method="wanda", pattern="2:4", calibration=str(text_file), **SMALL)
    settings = RefineSettings(lr=1e-9, logit_scale=30.0, **QUICK)
    model, report = prune_model(loaded, method="wanda", pattern="2:4", calibration=str(text_file), refine=settings, **SMALL)
    assert report.refine["changed_groups"] == 0
    expected = named_layer_weights(reference)
    assert all(torch.equal(weight, expected[name]) for name, weight in named_layer_weights(model).items())


def test_cli_refinement_writes_its_figure(model_folders, text_file, tmp_path, capsys) -> None:
    output = tmp_path / "refined"
    code, out, err = run(["--model", str(model_folders["llama"]), "--method", "wanda", "--pattern", "2:4", "--calibration", str(text_file),
                          "--eval-data", str(text_file), "--eval-windows", "2", "--refine", "maskpro", "--refine-steps", "4",
                          "--refine-batch", "2", "--refine-seqlen", "32", "--refine-windows", "4", "--refine-holdout", "2",
                          "--recover", "adamw", "--recover-steps", "2", "--recover-batch", "2", "--recover-seqlen", "32",
                          "--output", str(output), *FAST], capsys)
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    assert report["refine"]["steps"] == 4 and report["refine"]["weights"] == "oneshot"
    assert (output / "refine.png").stat().st_size > 0 and (output / "recover.png").stat().st_size > 0
    assert {"dense", "pruned", "refined", "recovered"} <= set(report["perplexity"])
    assert report["recover"]["perplexity_before"] == pytest.approx(report["perplexity"]["refined"]["value"])


def test_cli_refinement_bad_input(model_folders, text_file, tmp_path, capsys) -> None:
    llama = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval", *FAST]
    for extra, fragment in (
        (["--sparsity", "0.5", "--refine", "maskpro"], "needs --pattern N:M"),
        (["--pattern", "8:16", "--refine", "maskpro", "--refine-estimator", "set"], "N = 8 is too many"),
        (["--pattern", "2:4", "--refine", "maskpro", "--refine-windows", "2", "--refine-batch", "4"], "at least one batch"),
        (["--pattern", "2:4", "--refine", "maskpro", "--refine-alpha", "1"], "--refine-alpha must be in [0, 1)"),
        (["--pattern", "2:4", "--refine", "maskpro", "--refine-seqlen", "100000"], "longer than the model's"),
    ):
        code, _, err = run(llama + extra, capsys)
        assert_one_line_error(code, err, fragment)
    bert = ["--model", str(model_folders["bert"]), "--calibration", str(text_file), "--pattern", "2:4", "--refine", "maskpro", *FAST]
    code, _, err = run(bert, capsys)
    assert_one_line_error(code, err, "call prune.stages.refine.refine()")
    assert not any(tmp_path.iterdir())
    with pytest.raises(PruningError, match="needs --pattern"):
        RefineSettings().check(Target.from_options(sparsity=0.5))
