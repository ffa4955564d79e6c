"""The recovery fine-tune: pruned weights stay zero, only attention/MLP weights move, the loss goes down."""

from __future__ import annotations

import json

import pytest
import torch

from calibration.corpora import CorpusError
from calibration.windows import language_model_batches
from eval.sparsity import nm_valid
from prune import load_model, prune_model
from prune.models import layer_weight, prunable_layers, transformer_blocks
from prune.stages.recover import RecoverSettings, recover, split_parameters
from tests.conftest import FAST, SMALL, assert_one_line_error, run, tiny_model


def layer_weights(model) -> list[torch.Tensor]:
    _, blocks = transformer_blocks(model)
    return [layer_weight(layer).detach().clone() for block in blocks for layer in prunable_layers(block).values()]


@pytest.mark.parametrize("optimizer", ["magma", "adamw", "skipupdate"])
def test_recovery_keeps_the_pattern_and_reports(model_folders, text_file, optimizer) -> None:
    loaded = load_model(str(model_folders["llama"]))
    settings = RecoverSettings(optimizer, steps=6, lr=1e-3, batch=2, seqlen=32, log_every=2, debug=True)
    model, report = prune_model(loaded, method="sparsegpt", pattern="2:4", calibration=str(text_file), eval_data=str(text_file),
                                eval_windows=2, recover=settings, **SMALL)
    for weight in layer_weights(model):
        assert nm_valid(weight, 2, 4) and (weight == 0).float().mean().item() == pytest.approx(0.5)
    assert report.recover["zeros_kept"] and report.recover["masked_weights"] > 0
    assert [point["step"] for point in report.recover["curve"]] == [2, 4, 6]
    assert report.perplexity["recovered"]["value"] == pytest.approx(report.recover["perplexity_after"])
    assert report.recover["perplexity_before"] == pytest.approx(report.perplexity["pruned"]["value"])
    if optimizer == "adamw":
        assert report.recover["updated_fraction"] is None
    else:
        assert 0 <= report.recover["updated_fraction"] <= 1
    assert "recovery (" in report.table()


@pytest.mark.parametrize("train_other", [False, True])
def test_only_attention_and_mlp_weights_move_unless_asked(tokenizer, train_other) -> None:
    model = tiny_model("gpt2", len(tokenizer))  # Conv1D: the masks must follow the stored (in, out) layout
    _, blocks = transformer_blocks(model)
    for block in blocks:
        for layer in prunable_layers(block).values():
            layer.weight.data[layer.weight.data.abs() < layer.weight.data.abs().median()] = 0
    zeros = [layer.weight == 0 for block in blocks for layer in prunable_layers(block).values()]
    inside, outside = split_parameters(model)
    before_inside = [p.detach().clone() for p in inside]
    before_outside = [p.detach().clone() for p in outside]
    ids = torch.randint(0, len(tokenizer), (2000,), generator=torch.Generator().manual_seed(0))
    settings = RecoverSettings("magma", steps=5, lr=1e-2, batch=2, seqlen=16, p=1.0, train_other=train_other, debug=True)
    result = recover(model, language_model_batches(ids, 16, 2, seed=0), settings, torch.device("cpu"), progress=False)

    after = [layer.weight for block in blocks for layer in prunable_layers(block).values()]
    assert all(torch.all(weight[mask] == 0) for weight, mask in zip(after, zeros, strict=True))
    assert result.zeros_kept and result.masked_weights == sum(int(mask.sum()) for mask in zeros)
    assert any(not torch.equal(p, q) for p, q in zip(inside, before_inside, strict=True))
    moved_outside = [not torch.equal(p, q) for p, q in zip(outside, before_outside, strict=True)]
    assert any(moved_outside) if train_other else not any(moved_outside)
    assert all(p.requires_grad for p in model.parameters())  # the flags are given back


@pytest.mark.parametrize("optimizer", ["magma", "adamw"])
def test_recovery_lowers_the_training_loss(tokenizer, optimizer) -> None:
    model = tiny_model("llama", len(tokenizer))
    for block in transformer_blocks(model)[1]:
        for layer in prunable_layers(block).values():
            layer.weight.data[:, ::2] = 0
    model.lm_head.weight.data *= 25  # the head stays frozen: let it be able to express confident predictions
    ids = torch.arange(16).repeat(64)  # a text where each token foretells the next
    settings = RecoverSettings(optimizer, steps=60, lr=1e-2, batch=4, seqlen=16, log_every=10, warmup=0.0)
    result = recover(model, language_model_batches(ids, 16, 4, seed=0), settings, torch.device("cpu"), progress=False)
    assert result.curve[-1]["loss"] < 0.5 * result.curve[0]["loss"], result.curve
    assert result.zeros_kept


def test_recovery_schedule_warms_up_and_decays_to_a_tenth(tokenizer) -> None:
    model = tiny_model("llama", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (4000,), generator=torch.Generator().manual_seed(0))
    settings = RecoverSettings("adamw", steps=20, lr=1e-3, batch=2, seqlen=16, log_every=1, warmup=0.1)
    rates = [point["lr"] for point in recover(model, language_model_batches(ids, 16, 2, seed=0), settings, torch.device("cpu"), progress=False).curve]
    assert rates[0] == 0 and rates[1] < rates[2] == pytest.approx(1e-3)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates[2:], rates[3:], strict=False))
    assert rates[-1] == pytest.approx(1e-4, rel=0.1)  # the last step runs just above the floor it would reach next


def test_language_model_batches_cycle_without_repeats_within_a_pass() -> None:
    ids = torch.arange(10 * 8)
    batches = language_model_batches(ids, 8, 2, seed=3)
    first_pass = torch.cat([next(batches)["input_ids"] for _ in range(5)])
    assert sorted(first_pass[:, 0].tolist()) == list(range(0, 80, 8))
    assert next(batches)["input_ids"].shape == (2, 8)
    with pytest.raises(CorpusError, match="too short"):
        language_model_batches(torch.arange(20), 8, 4, seed=0)


def test_cli_recovery_writes_its_figure(model_folders, text_file, tmp_path, capsys) -> None:
    output = tmp_path / "recovered"
    code, out, err = run(["--model", str(model_folders["opt"]), "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text_file),
                          "--eval-data", str(text_file), "--eval-windows", "2", "--recover", "magma", "--recover-steps", "4",
                          "--recover-batch", "2", "--recover-seqlen", "32", "--output", str(output), *FAST], capsys)
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    assert report["recover"]["optimizer"] == "magma" and report["recover"]["steps"] == 4
    assert (output / "recover.png").stat().st_size > 0
    assert "recovered" in report["perplexity"]


def test_cli_recovery_bad_input(model_folders, text_file, tmp_path, capsys) -> None:
    llama = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval", "--sparsity", "0.5", *FAST]
    for extra, fragment in (
        (["--recover", "magma", "--recover-steps", "0"], "--recover-steps must be at least 1"),
        (["--recover", "magma", "--recover-lr", "-1"], "--recover-lr must be positive"),
        (["--recover", "magma", "--recover-p", "0"], "--recover-p must be in (0, 1]"),
        (["--recover", "magma", "--recover-seqlen", "100000"], "longer than the model's"),
    ):
        code, _, err = run(llama + extra, capsys)
        assert_one_line_error(code, err, fragment)
    bert = ["--model", str(model_folders["bert"]), "--calibration", str(text_file), "--sparsity", "0.5", "--recover", "adamw", *FAST]
    code, _, err = run(bert, capsys)
    assert_one_line_error(code, err, "needs labelled task data")
    assert not any(tmp_path.iterdir())
