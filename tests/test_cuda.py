"""The CUDA path against the CPU one: the pipeline on tiny Llama / GPT-2 / BERT, a MaskPro update, Magma steps.

Marked `cuda` and skipped where no CUDA device is available; `make gpu-check` runs them on a GPU
(`pytest -m cuda`). Each test runs the same work on both devices from the same seed and compares.
"""

from __future__ import annotations

import copy

import pytest
import torch

from eval.sparsity import nm_valid
from methods.magma import Magma
from methods.maskpro import MaskPro, grouped
from prune import load_model, prune_model
from prune.models import layer_weight, prunable_layers, transformer_blocks
from prune.stages.recover import RecoverSettings
from prune.stages.refine import RefineSettings
from tests.conftest import SMALL

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MASK_AGREEMENT = 0.999  # float summation order differs between devices: a few near-ties may flip
LOSS_RTOL = 1e-3
PERPLEXITY_RTOL = 0.01


def pruned_layers(model) -> list[torch.Tensor]:
    """Every pruned layer's weight (out, in), on the CPU in float32."""
    _, blocks = transformer_blocks(model)
    return [layer_weight(layer).detach().float().cpu() for block in blocks for layer in prunable_layers(block).values()]


def prune_on(device: str, folder, text_file, **target) -> tuple[list[torch.Tensor], object]:
    loaded = load_model(str(folder))
    evaluation = {"eval_data": str(text_file), "eval_windows": 4} if loaded.kind == "causal-lm" else {}
    model, report = prune_model(loaded, calibration=str(text_file), device=device, **target, **evaluation, **SMALL)
    return pruned_layers(model), report


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("target", [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "wanda", "pattern": "2:4"},
                                    {"method": "obs", "sparsity": 0.5}], ids=["sparsegpt-50", "wanda-2:4", "obs-50"])
def test_pipeline_on_cuda_equals_the_cpu_run(model_folders, text_file, architecture, target) -> None:
    cpu_weights, cpu_report = prune_on("cpu", model_folders[architecture], text_file, **target)
    cuda_weights, cuda_report = prune_on("cuda", model_folders[architecture], text_file, **target)
    assert cuda_report.device.startswith("cuda") and cuda_report.peak_device_memory_mb > 0
    kept_cpu = torch.cat([(weight != 0).flatten() for weight in cpu_weights])
    kept_cuda = torch.cat([(weight != 0).flatten() for weight in cuda_weights])
    assert (kept_cpu == kept_cuda).float().mean().item() >= MASK_AGREEMENT
    if "pattern" in target:
        assert all(nm_valid(weight, 2, 4) for weight in cuda_weights)
    for on_cpu, on_cuda in zip(cpu_report.layers, cuda_report.layers, strict=True):
        assert on_cuda.name == on_cpu.name
        assert on_cuda.sparsity == pytest.approx(on_cpu.sparsity, abs=2 / on_cpu.shape[1])
        if on_cpu.loss is not None:
            assert on_cuda.loss == pytest.approx(on_cpu.loss, rel=LOSS_RTOL, abs=1e-7)
    if cpu_report.perplexity is not None:
        for stage in ("dense", "pruned"):
            assert cuda_report.perplexity[stage]["value"] == pytest.approx(cpu_report.perplexity[stage]["value"], rel=PERPLEXITY_RTOL)


def test_refinement_and_recovery_run_on_cuda(model_folders, text_file) -> None:
    refine = RefineSettings(steps=6, batch=2, seqlen=32, windows=8, holdout=4, log_every=3, candidates=2)
    recover = RecoverSettings("magma", steps=4, lr=1e-3, batch=2, seqlen=32, log_every=2)
    model, report = prune_model(str(model_folders["llama"]), method="sparsegpt", pattern="2:4", calibration=str(text_file), device="cuda",
                                eval_data=str(text_file), eval_windows=2, refine=refine, recover=recover, **SMALL)
    assert all(nm_valid(weight, 2, 4) and (weight == 0).float().mean().item() == pytest.approx(0.5) for weight in pruned_layers(model))
    assert [point["step"] for point in report.refine["curve"]] == [3, 6]
    assert report.recover["zeros_kept"] and [point["step"] for point in report.recover["curve"]] == [2, 4]
    assert all(torch.isfinite(torch.tensor(report.perplexity[stage]["value"])) for stage in ("dense", "pruned", "refined", "recovered"))


def test_maskpro_update_on_cuda_equals_the_cpu_update() -> None:
    generator = torch.Generator().manual_seed(0)
    initial = {name: torch.rand(16, 32, generator=generator).argsort(1) < 16 for name in ("q", "down")}
    on_cpu = MaskPro(initial, 2, 4, seed=3)
    on_cuda = MaskPro({name: mask.cuda() for name, mask in initial.items()}, 2, 4, seed=3)
    for residual in (0.5, -0.25, 0.125):
        draws = on_cpu.sample()  # the same draws on both devices: the update (Eq. 12) is deterministic given them
        on_cpu.update(draws, residual)
        on_cuda.update({name: ranks.cuda() for name, ranks in draws.items()}, residual)
    assert on_cuda.tracker == pytest.approx(on_cpu.tracker)
    for name in initial:
        torch.testing.assert_close(on_cuda.logits[name].cpu(), on_cpu.logits[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(on_cuda.final_masks()[name].cpu(), on_cpu.final_masks()[name])


def test_maskpro_samples_on_cuda_are_valid_draws_of_the_policy() -> None:
    initial = {"layer": torch.rand(64, 64, generator=torch.Generator().manual_seed(1)).argsort(1) < 32}
    refiner = MaskPro({name: mask.cuda() for name, mask in initial.items()}, 2, 4, seed=0, logit_scale=1.0)
    draws = [refiner.sample()["layer"] for _ in range(200)]
    for ranks in draws[:5]:  # each group's ranks are a permutation of 0..M-1
        assert torch.equal(ranks.sort(dim=-1).values.cpu(), torch.arange(4, dtype=ranks.dtype).expand_as(ranks.cpu()))
    kept = torch.stack([(ranks < 2).float() for ranks in draws]).mean(0).cpu()
    # the one-shot mask's members are kept more often than the others (their logits start higher)
    initially_kept = grouped(initial["layer"], 4).cpu()
    assert kept[initially_kept].mean() > kept[~initially_kept].mean() + 0.1


@pytest.mark.parametrize("granularity", ["tensor", "row", "element"])
@pytest.mark.parametrize("make_base", [lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1), lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)],
                         ids=["adamw", "sgd"])
def test_magma_steps_on_cuda_equal_the_cpu_steps(granularity, make_base) -> None:
    generator = torch.Generator().manual_seed(0)
    start, target = torch.randn(8, 12, generator=generator), torch.randn(8, 12, generator=generator)
    keep = torch.rand(8, 12, generator=generator) < 0.5
    results = {}
    for device in ("cpu", "cuda"):
        parameter = torch.nn.Parameter((start * keep).to(device))
        optimizer = Magma(make_base([parameter]), granularity=granularity, keep_masks={parameter: keep.to(device)}, seed=5)
        for _ in range(10):
            optimizer.zero_grad()
            ((parameter - target.to(device)) ** 2 * torch.arange(1, 13, device=device)).sum().backward()
            optimizer.step()
        results[device] = (parameter.detach().cpu(), copy.deepcopy(optimizer.updated_fraction))
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-6)
    assert results["cuda"][1] == results["cpu"][1]  # the same blocks survived: the draws come from the CPU generator
    assert torch.all(results["cuda"][0][~keep] == 0)
