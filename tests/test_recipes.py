"""Per-layer control (--targets, --ignore, --sparsity-override) and recipes (--config): a recipe equals its flags,
flags override it, a run's report.json runs it again, and bad recipes fail before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prune import load_model, prune_model
from prune.models import all_prunable_layers, layer_weight
from tests.conftest import FAST, SMALL, assert_one_line_error, run, stored


def weights(model) -> dict[str, torch.Tensor]:
    return {name: layer_weight(layer).detach().clone() for name, layer in all_prunable_layers(model).items()}


def sparsity(weight: torch.Tensor) -> float:
    return (weight == 0).float().mean().item()


@pytest.mark.parametrize("rule", [{"ignore": [r"mlp\.down_proj"]}, {"ignore": "re:.*down_proj$"}, {"targets": ["self_attn", "gate", "up_proj"]}])
def test_ignored_or_untargeted_layers_stay_dense_and_say_so(model_folders, text_file, rule) -> None:
    dense = weights(load_model(str(model_folders["llama"])).model)
    model, report = prune_model(str(model_folders["llama"]), method="wanda", sparsity=0.5, calibration=str(text_file), **rule, **SMALL)
    entries = {entry.name: entry for entry in report.layers}
    for name, weight in weights(model).items():
        if name.endswith("down_proj"):
            assert torch.equal(weight, dense[name]) and entries[name].loss is None
            assert any("--ignore" in note or "--targets" in note for note in entries[name].notes)
        else:
            assert sparsity(weight) == pytest.approx(0.5)
    assert any("2 layer(s) left dense by --targets / --ignore" in note for note in report.notes)


def test_an_override_inside_a_shared_hessian_group_changes_only_its_layer(model_folders, text_file) -> None:
    """q/k/v share one Hessian: with k_proj overridden, q and v are pruned exactly as without the override."""
    options = {"method": "sparsegpt", "sparsity": 0.5, "calibration": str(text_file), **SMALL}
    plain = weights(prune_model(str(model_folders["llama"]), **options)[0])
    model, report = prune_model(str(model_folders["llama"]), sparsity_override={r"k_proj": 0.25}, **options)
    overridden = weights(model)
    for name, weight in overridden.items():
        expected = 0.25 if name.endswith("k_proj") else 0.5
        assert sparsity(weight) == pytest.approx(expected, abs=1 / weight.shape[1]), name
    for projection in ("q_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{projection}"
        torch.testing.assert_close(overridden[name], plain[name], rtol=1e-5, atol=1e-6)
    assert any("2 layer(s) pruned to their --sparsity-override" in note for note in report.notes)


def test_overrides_replace_owl_block_sparsities_only_where_they_match(model_folders, text_file) -> None:
    options = {"method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_m": 3, "calibration": str(text_file), **SMALL}
    _, owl_only = prune_model(str(model_folders["llama"]), **options)
    model, report = prune_model(str(model_folders["llama"]), sparsity_override=[r"o_proj=0.2"], **options)
    assert report.allocation == owl_only.allocation  # OWL measures the dense model: the overrides do not change it
    block_sparsity = {entry["block"]: entry["sparsity"] for entry in owl_only.allocation["blocks"]}
    for name, weight in weights(model).items():
        expected = 0.2 if name.endswith("o_proj") else block_sparsity[int(name.split(".")[2])]
        assert sparsity(weight) == pytest.approx(expected, abs=1 / weight.shape[1]), name


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(json.dumps(recipe) if path.suffix == ".json" else yaml.safe_dump(recipe))
    return path


RECIPE = {"method": "wanda", "sparsity": 0.5, "ignore": [r"layers\.1\.mlp\.down_proj"], "sparsity_override": {r"o_proj": 0.25},
          "eval-windows": 2, "nsamples": 8, "seqlen": 32, "batch_size": 4}
FLAGS = ["--method", "wanda", "--sparsity", "0.5", "--ignore", r"layers\.1\.mlp\.down_proj", "--sparsity-override", r"o_proj=0.25",
         "--eval-windows", "2", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_recipe_equals_its_flags_and_flags_given_with_it_win(model_folders, text_file, tmp_path, capsys, suffix) -> None:
    common = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--eval-data", str(text_file), "--quiet"]
    recipe = write_recipe(tmp_path / f"recipe{suffix}", RECIPE)
    code, _, err = run([*common, "--config", str(recipe), "--output", str(tmp_path / "recipe")], capsys)
    assert code == 0, err
    code, _, err = run([*common, *FLAGS, "--output", str(tmp_path / "flags")], capsys)
    assert code == 0, err
    from_recipe, from_flags = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("recipe", "flags"))
    assert {**from_recipe["settings"], "output": None} == {**from_flags["settings"], "output": None}
    assert from_recipe["perplexity"] == from_flags["perplexity"]
    expected, actual = stored(tmp_path / "flags"), stored(tmp_path / "recipe")
    assert set(expected) == set(actual) and all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    code, _, err = run([*common, "--config", str(recipe), "--sparsity", "0.6", "--output", str(tmp_path / "override")], capsys)
    assert code == 0, err
    overridden = json.loads((tmp_path / "override" / "report.json").read_text())
    assert overridden["target"]["sparsity"] == 0.6 and overridden["settings"]["ignore"] == RECIPE["ignore"]


def test_a_reports_settings_run_the_same_run_again(model_folders, text_file, tmp_path, capsys) -> None:
    first = ["--model", str(model_folders["opt"]), "--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl", "--owl-m", "3",
             "--sparsity-override", r"fc2=0.4", "--calibration", str(text_file), "--eval-data", str(text_file), "--eval-windows", "3",
             "--seed", "3", *FAST, "--output", str(tmp_path / "first")]
    code, _, err = run(first, capsys)
    assert code == 0, err
    code, _, err = run(["--config", str(tmp_path / "first" / "report.json"), "--output", str(tmp_path / "again"), "--quiet"], capsys)
    assert code == 0, err
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("first", "again")]
    assert reports[1]["model"]["name"] == str(model_folders["opt"])
    assert {**reports[0]["settings"], "output": None} == {**reports[1]["settings"], "output": None}
    for key in ("perplexity", "allocation", "sparsity", "target"):
        assert reports[0][key] == reports[1][key], key
    assert [{**entry, "seconds": 0} for entry in reports[0]["layers"]] == [{**entry, "seconds": 0} for entry in reports[1]["layers"]]
    expected, actual = stored(tmp_path / "first"), stored(tmp_path / "again")
    assert set(expected) == set(actual) and all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize(("recipe", "fragment"), [
    ({"sparsty": 0.5}, "unknown key 'sparsty'"),
    ({"sparsity": "half"}, "key 'sparsity': expected a number, got 'half' (str)"),
    ({"sparsity": [0.5]}, "key 'sparsity': expected one number, got [0.5]"),
    ({"sparsity": 0.5, "overwrite": 3}, "key 'overwrite': expected a boolean (true or false), got 3 (int)"),
    ({"sparsity": 0.5, "overwrite": "yes"}, "key 'overwrite': expected a boolean (true or false), got 'yes' (str)"),
    ({"sparsity": 0.5, "nsamples": 0.5}, "key 'nsamples': expected a whole number, got 0.5 (float)"),
    ({"sparsity": 0.5, "nsamples": True}, "key 'nsamples': expected a whole number, got True (bool)"),
    ({"pattern": 124}, "key 'pattern': expected a string (quote it in YAML: '...'), got 124 (int)"),  # what YAML 1.1 makes of 2:4
    ({"sparsity": 0.5, "targets": [["q_proj"]]}, "key 'targets': expected a string, got ['q_proj'] (list)"),
    ({"sparsity": 0.5, "method": ["wanda"]}, "key 'method': expected one string, got ['wanda']"),
    ({"sparsity": 0.5, "method": "sparsegtp"}, "key 'method'"),
    ({"sparsity": 0.5, "ignore": ["no_layer_is_called_this"]}, "--ignore 'no_layer_is_called_this' matches no layer"),
    ({"sparsity": 0.5, "targets": ["(unclosed"]}, "--targets '(unclosed' is not a regular expression"),
    ({"sparsity": 0.5, "sparsity_override": {"down_proj": 1.0}}, "the sparsity must be in [0, 1)"),
    ({"sparsity": 0.5, "sparsity_override": ["down_proj"]}, "expected REGEX=SPARSITY"),
    ({"pattern": "2:4", "sparsity_override": {"down_proj": 0.3}}, "cannot be combined with --pattern 2:4"),
    (["sparsity", 0.5], "expected a mapping"),
])
def test_bad_recipes_fail_in_one_line_before_any_model_is_loaded(model_folders, tmp_path, capsys, monkeypatch, recipe, fragment) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("prune.pipeline.load_model", no_loading)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    output = tmp_path / "out"
    code, _, err = run(["--model", str(model_folders["llama"]), "--config", str(path), "--output", str(output)], capsys)
    assert_one_line_error(code, err, fragment)
    assert not output.exists()
