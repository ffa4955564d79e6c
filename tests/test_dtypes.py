"""Models stored in half precision: loaded, kept and saved in their own dtype; blocks computed in float32 on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prune import load_model, prune_model
from prune.models import layer_weight, prunable_layers, transformer_blocks
from tests.conftest import FAST, HALF, SMALL, run, tiny_model


@pytest.fixture(scope="module")
def half_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """The tiny Llama saved in bfloat16 and in float16, as a user's checkpoint would be."""
    folders = {}
    for name, dtype in HALF.items():
        folder = tmp_path_factory.mktemp(f"llama-{name}")
        tiny_model("llama", len(tokenizer)).to(dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as stored:
            tensors.update({key: stored.get_tensor(key) for key in stored.keys()})  # noqa: SIM118 (safe_open has no iterator)
    return tensors


@pytest.mark.parametrize("dtype", list(HALF))
def test_the_output_keeps_the_checkpoints_dtype_and_size(half_folders, text_file, tmp_path, capsys, dtype) -> None:
    source = half_folders[dtype]
    output = tmp_path / "pruned"
    code, _, err = run(["--model", str(source), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(text_file),
                        "--eval-data", str(text_file), "--eval-windows", "2", "--output", str(output), *FAST], capsys)
    assert code == 0, err
    tensors = stored_tensors(output)
    assert {tensor.dtype for tensor in tensors.values()} == {HALF[dtype]}
    size = lambda folder: sum(path.stat().st_size for path in folder.glob("*.safetensors"))  # noqa: E731
    assert size(output) == pytest.approx(size(source), rel=0.02)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.dtype == HALF[dtype]
    weight = reloaded.model.layers[1].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    report = json.loads((output / "report.json").read_text())
    assert report["settings"]["dtype"] == "auto" and report["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_bfloat16_model_is_pruned_in_float32_and_rounded_once(half_folders, text_file) -> None:
    """The first block's q/k/v see the same inputs whether the model is stored in bfloat16 or is its float32 copy:
    the same masks, and the bfloat16 weights are the float32 result rounded once."""
    half, _ = prune_model(str(half_folders["bfloat16"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), **SMALL)
    wide, _ = prune_model(str(half_folders["bfloat16"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), dtype="float32", **SMALL)
    assert half.dtype == torch.bfloat16 and wide.dtype == torch.float32
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        stored = layer_weight(prunable_layers(transformer_blocks(half)[1][0])[name])
        reference = layer_weight(prunable_layers(transformer_blocks(wide)[1][0])[name])
        assert torch.equal(stored != 0, reference != 0), name
        assert torch.equal(stored, reference.to(torch.bfloat16)), name


def test_an_explicit_dtype_casts_the_model(half_folders) -> None:
    assert load_model(str(half_folders["float16"])).dtype == torch.float16
    assert load_model(str(half_folders["float16"]), dtype="float32").dtype == torch.float32
