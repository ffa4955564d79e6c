"""The compressed-tensors output: quantized layers packed with their scales, read back by plain `from_pretrained`
bit for bit as the dense save of the same run; streamed the same as in memory; bad requests refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.models import all_prunable_layers, layer_weight
from tests.conftest import FAST, run, stored, tiny_model


def command(folder: Path, text_file: Path, capsys, *options: str) -> tuple[int, str, str]:
    return run(["--model", str(folder), "--calibration", str(text_file), "--eval-data", str(text_file), *FAST, "--eval-windows", "3", *options],
               capsys)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    folders = {}
    for architecture in ("llama", "opt", "gpt2"):
        folder = tmp_path_factory.mktemp(f"{architecture}-bf16")
        tiny_model(architecture, len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[architecture] = folder
    return folders


@pytest.mark.parametrize("architecture, options", [
    ("llama", ("--method", "sparsegpt", "--sparsity", "0.5", "--quantize", "int4", "--group-size", "32")),
    ("opt", ("--method", "sparsegpt", "--pattern", "2:4", "--quantize", "int8", "--group-size", "0")),
    ("llama", ("--method", "wanda", "--sparsity", "0.5", "--quantize", "int4", "--group-size", "64", "--no-act-order")),
    ("llama", ("--method", "alps", "--sparsity", "0.6", "--quantize", "int4", "--group-size", "32")),
    ("llama", ("--method", "magnitude", "--sparsity", "0", "--quantize", "int4", "--group-size", "32", "--search-scales")),
])
def test_the_compressed_output_loads_back_bit_for_bit_as_the_dense_save(folders, text_file, tmp_path, capsys, architecture, options) -> None:
    folder = folders[architecture]
    for name, extra in (("dense", ("--save-format", "dense", "--stream", "off")), ("compressed", ("--stream", "off")),
                        ("streamed", ("--stream", "on"))):
        code, _, err = command(folder, text_file, capsys, *options, *extra, "--output", str(tmp_path / name))
        assert code == 0, err
    assert stored(tmp_path / "compressed").keys() == stored(tmp_path / "streamed").keys()
    assert all(torch.equal(tensor, stored(tmp_path / "streamed")[name]) for name, tensor in stored(tmp_path / "compressed").items())
    packed = [name for name in stored(tmp_path / "compressed") if name.endswith(".weight_packed")]
    assert len(packed) == len(all_prunable_layers(tiny_model(architecture, 10)))
    assert not any(name.endswith("weight_scale") for name in stored(tmp_path / "dense"))
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    weights = [group["weights"] for group in config["config_groups"].values()]
    assert all(args.get("actorder") == (None if "--no-act-order" in options else "weight") for args in weights)  # static groups: no g_idx
    dense, compressed = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("dense", "compressed"))
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, compressed(ids).logits)  # the first forward unpacks the layers
    loaded = compressed.state_dict()  # the dense save holds the weights the run evaluated: the loader rebuilds exactly those
    assert all(torch.equal(loaded[name], tensor) for name, tensor in dense.state_dict().items())
    report = json.loads((tmp_path / "compressed" / "report.json").read_text())
    bits = {"int4": 4, "int8": 8}[options[options.index("--quantize") + 1]]
    assert bits < report["storage"]["quantized_bits_per_weight"] < bits + 1
    assert report["storage"]["output_bytes"] == sum(path.stat().st_size for path in (tmp_path / "compressed").glob("*.safetensors"))
    assert report["storage"]["output_bytes"] < json.loads((tmp_path / "dense" / "report.json").read_text())["storage"]["output_bytes"]
    for layer in all_prunable_layers(dense).values():  # the pruned zeros survive the packing as exact zeros
        assert (layer_weight(layer) == 0).float().mean().item() >= report["target"]["sparsity"] - 0.02


@pytest.mark.parametrize("options, message", [
    (("--sparsity", "0.5", "--save-format", "compressed"), "has no sparse format"),
    (("--sparsity", "0.5", "--quantize", "int4", "--group-size", "48"), "not a multiple of the group size 48"),
    (("--sparsity", "0.5", "--quantize", "int4", "--recover", "adamw"), "--recover trains them afterwards"),
    (("--sparsity", "0.5", "--group-size", "64"), "--group-size applies to --quantize"),
    (("--sparsity", "0.5", "--no-act-order"), "--no-act-order applies to --quantize"),
    (("--sparsity", "0.5", "--search-scales"), "--search-scales applies to --quantize"),
    (("--method", "obert", "--sparsity", "0.5", "--quantize", "int4"), "needs the layer Hessian"),
])
def test_a_quantization_the_run_cannot_hold_is_refused_before_any_forward(folders, text_file, tmp_path, capsys, options, message) -> None:
    code, out, err = command(folders["llama"], text_file, capsys, *options, "--output", str(tmp_path / "out"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gpt2_and_a_missing_package_are_refused_for_a_compressed_save(folders, text_file, tmp_path, capsys, monkeypatch) -> None:
    code, _, err = command(folders["gpt2"], text_file, capsys, "--sparsity", "0.5", "--quantize", "int4", "--group-size", "32", "--output",
                           str(tmp_path / "out"))
    assert code == 2 and "Conv1D" in err and len(err.strip().splitlines()) == 1
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "compressed_tensors" else real(name, *args))
    code, _, err = command(folders["llama"], text_file, capsys, "--sparsity", "0.5", "--quantize", "int4", "--output", str(tmp_path / "out"))
    assert code == 2 and "pip install" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
