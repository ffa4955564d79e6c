"""End to end on the real embedded models: the `prune` console script on SmolLM2-135M, the API on MiniLM-L6."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from prune import prune_model

pytestmark = pytest.mark.slow


def test_prune_command_on_smollm2(tmp_path: Path) -> None:
    output = tmp_path / "smollm2-sparsegpt"
    command = [str(Path(sys.executable).with_name("prune")), "--method", "sparsegpt", "--sparsity", "0.5",
               "--nsamples", "4", "--seqlen", "128", "--eval-windows", "4", "--output", str(output), "--quiet"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["model"]["name"] == "smollm2-135m" and len(report["layers"]) == 30 * 7
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    assert (dense["windows"], dense["seqlen"]) == (4, 128)
    assert 5 < dense["value"] < 100  # a trained model on English prose, not a random one
    assert dense["value"] < pruned["value"] < 50 * dense["value"]
    model = AutoModelForCausalLM.from_pretrained(output)
    weight = model.model.layers[10].self_attn.q_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert "perplexity (wiki-sample, 4 windows of 128 tokens)" in finished.stdout


def test_api_on_minilm() -> None:
    model, report = prune_model("minilm-l6", method="wanda", pattern="2:4", nsamples=4, seqlen=128, progress=False)
    assert len(report.layers) == 6 * 6 and all(layer.pattern_valid for layer in report.layers)
    assert report.model["kind"] == "encoder"
    assert (model.encoder.layer[0].intermediate.dense.weight == 0).float().mean().item() == pytest.approx(0.5)
