"""oBERT through the pipeline: every layer pruned from per-sample task-loss gradients of the whole model, checked
against the pruning deep-dive's formulas computed here by hand (explicit Fisher blocks, torch.linalg.inv), for a causal LM on its
text and a token classifier on labelled CoNLL sentences."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from calibration.text import TextSources
from calibration.windows import sample_windows
from methods import PruningError
from prune import load_model, prune_model
from prune.models import all_prunable_layers, layer_weight
from tests.conftest import FAST, assert_one_line_error, forward_passes, run, write_conll

OBERT_RUN = {"seqlen": 16, "eval_data": None, "progress": False}


def hand_obert(model: torch.nn.Module, samples: list[dict], sparsity: float, block_size: int, damp: float) -> dict[str, torch.Tensor]:
    """The pruning deep-dive §7.4-7.5 for every prunable layer of `model` (float64): per-sample gradients of the task loss, the
    explicit inverse of each block of F = λI + (1/m) Σ g gᵀ, saliency w²/(2[F⁻¹]_jj), the lowest of the layer removed,
    w − F⁻¹ diag(F⁻¹)⁻¹ (w ⊙ (1 − M)) kept where M is."""
    layers = all_prunable_layers(model)
    gradients: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for sample in samples:
        model.zero_grad()
        model(**sample).loss.backward()
        for name, layer in layers.items():
            grad = layer.weight.grad.T if isinstance(layer, Conv1D) else layer.weight.grad  # as (out, in), like the weight
            gradients[name].append(grad.reshape(-1).double().clone())
    expected = {}
    for name, layer in layers.items():
        weight = layer_weight(layer).double().reshape(-1)
        g = torch.stack(gradients[name])
        blocks = [torch.linalg.inv(damp * torch.eye(part.shape[1], dtype=torch.float64) + part.T @ part / len(samples))
                  for part in g.split(block_size, dim=1)]
        inverse = torch.block_diag(*blocks)
        saliency = weight**2 / (2 * torch.diagonal(inverse))
        removed = int(round(weight.numel() * sparsity))
        keep = torch.ones_like(weight, dtype=torch.bool)
        keep[torch.argsort(saliency, stable=True)[:removed]] = False
        updated = (weight - inverse @ (weight * ~keep / torch.diagonal(inverse))) * keep
        expected[name] = updated.reshape(layer_weight(layer).shape)
    return expected


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_one_shot_obert_equals_the_seeds_formulas_by_hand(model_folders, text_file, architecture) -> None:
    options = {"obert_grads": 6, "obert_block": 16, "obert_damp": 1e-3, "hessian_dtype": "float64"}
    pruned, report = prune_model(str(model_folders[architecture]), method="obert", sparsity=0.5, calibration=str(text_file), **options, **OBERT_RUN)
    reference = load_model(str(model_folders[architecture]))
    windows = sample_windows(TextSources(reference.tokenizer, calibration=str(text_file), evaluation=None).calibration_ids(), 6, 16, 0)
    expected = hand_obert(reference.model, [{"input_ids": w[None], "labels": w[None]} for w in windows], 0.5, 16, 1e-3)
    for name, layer in all_prunable_layers(pruned).items():
        torch.testing.assert_close(layer_weight(layer).double(), expected[name], rtol=1e-4, atol=1e-5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert report.calibration["nsamples"] == 6 and report.calibration["used"]
    assert any("statistics of the" in note and "GiB" in note for note in report.notes)


def test_gradual_and_global_obert(model_folders, text_file) -> None:
    """Three pruning epochs reach the target with the weights pruned early staying pruned (the cubic schedule raises
    sparsity, a zero weight has the lowest saliency); global ranking reaches the target over all layers together,
    unevenly per layer."""
    gradual, report = prune_model(str(model_folders["llama"]), method="obert", sparsity=0.7, calibration=str(text_file), obert_grads=4,
                                  obert_block=16, obert_epochs=3, **OBERT_RUN)
    assert report.sparsity == pytest.approx(0.7, abs=1e-3)
    assert all(layer.sparsity == pytest.approx(0.7, abs=1e-3) and "3 pruning epochs" in layer.notes for layer in report.layers)
    one_shot, _ = prune_model(str(model_folders["llama"]), method="obert", sparsity=0.7, calibration=str(text_file), obert_grads=4,
                              obert_block=16, **OBERT_RUN)
    assert any(not torch.equal(layer_weight(a), layer_weight(b)) for a, b in
               zip(all_prunable_layers(gradual).values(), all_prunable_layers(one_shot).values(), strict=True))

    _, ranked = prune_model(str(model_folders["llama"]), method="obert", sparsity=0.5, calibration=str(text_file), obert_grads=4,
                            obert_block=16, obert_global=True, **OBERT_RUN)
    total = sum(layer.shape[0] * layer.shape[1] for layer in ranked.layers)
    zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in ranked.layers)
    assert zeros / total == pytest.approx(0.5, abs=1e-3)
    assert max(layer.sparsity for layer in ranked.layers) - min(layer.sparsity for layer in ranked.layers) > 0.05


def test_obert_prunes_a_token_classifier_from_its_labelled_sentences(model_folders, tokenizer, tmp_path) -> None:
    from tests.conftest import synthetic_sentences

    sentences = synthetic_sentences(tokenizer, 40, 0)
    data = write_conll(tmp_path / "data", {"train": sentences, "test": sentences[:10]})
    model = load_model(str(model_folders["bert"]))
    names = sorted({tag for sentence in sentences for tag in sentence.tags})
    model.model.config.id2label, model.model.config.label2id = dict(enumerate(names)), {name: index for index, name in enumerate(names)}
    model.model.classifier = torch.nn.Linear(model.model.config.hidden_size, len(names))
    model.model.config.num_labels = model.model.num_labels = len(names)
    pruned, report = prune_model(model, method="obert", pattern="2:4", calibration=f"conll:{data}", obert_grads=8, obert_block=8,
                                 eval_data=None, progress=False)
    assert all(layer.pattern_valid for layer in report.layers) and report.calibration["nsamples"] == 8
    assert report.entity_f1 is None or "pruned" in report.entity_f1


def test_obert_refuses_what_cannot_work_before_any_forward_pass(model_folders, text_file, tmp_path, capsys, monkeypatch) -> None:
    llama = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--method", "obert", "--no-eval",
             "--output", str(tmp_path / "out"), *FAST]
    cases = [
        (["--sparsity", "0.5", "--obert-grads", "50000"], "too short"),
        (["--sparsity", "0.5", "--stream", "on"], "needs the whole model"),
        (["--pattern", "2:4", "--obert-epochs", "3"], "needs an unstructured target"),
        (["--sparsity", "0.5", "--obert-global", "--allocation", "owl"], "cannot also follow --allocation owl"),
        (["--sparsity", "0.5", "--obert-block", "0"], "block size must be at least 1"),
        (["--model", str(model_folders["bert"]), "--sparsity", "0.5"], "needs labelled task data"),
    ]
    with forward_passes() as forwards:
        for arguments, fragment in cases:
            code, _, err = run([*llama, *arguments], capsys)
            assert_one_line_error(code, err, fragment)
            assert not forwards, (arguments, forwards[:3])
        monkeypatch.setattr("prune.stages.gradients.available_memory", lambda device: 1024)
        code, _, err = run([*llama, "--sparsity", "0.5"], capsys)
        assert_one_line_error(code, err, "GiB are free")
        assert not forwards
    assert not (tmp_path / "out").exists()
    with pytest.raises(PruningError, match="more than the 2 samples"):
        prune_model(str(model_folders["llama"]), method="obert", sparsity=0.5, obert_grads=3, eval_data=None, progress=False,
                    calibration_batches=[{"input_ids": torch.randint(0, 100, (2, 16))}])
