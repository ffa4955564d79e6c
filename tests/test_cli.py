"""The `prune` command: runs on every architecture, bad input, and the output folder."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.conftest import FAST, assert_one_line_error, forward_passes, run


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt", "bert"])
def test_cli_prunes_each_architecture(model_folders, text_file, tmp_path, architecture, capsys) -> None:
    output = tmp_path / "pruned"
    code, out, err = run(["--model", str(model_folders[architecture]), "--method", "sparsegpt", "--pattern", "2:4",
                          "--calibration", str(text_file), "--eval-data", str(text_file), "--eval-windows", "2", "--output", str(output), *FAST], capsys)
    assert code == 0, err
    assert "sparsity reached 50.00%" in out
    assert (output / "report.json").is_file() and (output / "config.json").is_file() and (output / "tokenizer.json").is_file()


def test_the_summary_is_the_last_thing_printed_and_the_layer_table_needs_verbose(model_folders, text_file, tmp_path, capsys) -> None:
    common = ["--model", str(model_folders["llama"]), "--sparsity", "0.5", "--calibration", str(text_file), "--eval-data", str(text_file),
              "--eval-windows", "2", *FAST]
    code, out, err = run([*common, "--output", str(tmp_path / "short")], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("saved the pruned model") and lines[1].startswith("method sparsegpt, target 50%")
    assert lines[-1].startswith("peak memory") and len(lines) <= 8 and not any("self_attn" in line for line in lines)
    layers = json.loads((tmp_path / "short" / "report.json").read_text())["layers"]
    assert len(layers) == 14 and all(layer["sparsity"] == pytest.approx(0.5, abs=0.02) for layer in layers)  # the table is in the report
    code, out, err = run([*common, "--verbose"], capsys)
    assert code == 0, err
    verbose = out.strip().splitlines()
    assert verbose[0].split() == ["layer", "shape", "sparsity", "N:M", "ok", "loss", "seconds"] and sum("self_attn" in line for line in verbose) == 8
    assert verbose[-1].startswith("peak memory")


@pytest.fixture()
def odd_width_model(tmp_path_factory, tokenizer) -> Path:
    """A Llama whose hidden size (36) holds 2:4 but not 4:8."""
    folder = tmp_path_factory.mktemp("odd-llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=72, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_input_is_one_line_and_exit_code_2(model_folders, text_file, tmp_path, odd_width_model, capsys) -> None:
    llama = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval"]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    cases = [
        (["--method", "obd", "--sparsity", "0.5"], "--method"),
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.2"], "--sparsity"),
        (["--pattern", "4:4"], "N < M"),
        (["--pattern", "2:4", "--sparsity", "0.6"], "conflicts"),
        ([], "give a sparsity"),
        (["--sparsity", "0.5", "--blocksize", "100"], "multiple of mask_blocksize"),
        (["--method", "wanda", "--sparsity", "0.5", "--blocksize", "64"], "does not apply"),
        (["--sparsity", "0.5", "--nsamples", "0"], "nsamples"),
        (["--sparsity", "0.5", "--calibration", str(tmp_path / "missing.txt")], "no such file"),
        ([*llama, "--sparsity", "0.5", "--calibration", str(empty)], "empty"),
        ([*llama, "--sparsity", "0.5", "--calibration", str(short)], "too short"),
        ([*llama, "--sparsity", "0.5", "--seqlen", "1024"], "positions"),
        (["--model", str(tmp_path / "no-such-model"), "--sparsity", "0.5"], "no such model folder"),
        (["--model", str(odd_width_model), "--calibration", str(text_file), "--no-eval", "--pattern", "4:8"], "not a multiple of 8"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--sparsity", "0.5", "--device", "cuda"], "no CUDA device"))
    for arguments, fragment in cases:
        code, _, err = run([*FAST, *llama[:2], *arguments] if "--model" not in arguments else [*FAST, *arguments], capsys)
        assert_one_line_error(code, err, fragment)


def test_incompatible_layers_can_be_skipped_and_are_reported(odd_width_model, text_file, capsys) -> None:
    code, out, err = run(["--model", str(odd_width_model), "--calibration", str(text_file), "--no-eval", "--pattern", "4:8",
                          "--skip-incompatible", *FAST], capsys)
    assert code == 0, err
    assert "left dense" in out


def test_output_is_loadable_and_refuses_to_clobber(model_folders, text_file, tmp_path, capsys) -> None:
    output = tmp_path / "result"
    common = ["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval", "--output", str(output), *FAST]
    assert run(["--sparsity", "0.5", *common], capsys)[0] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    weight = reloaded.model.layers[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    code, _, err = run(["--sparsity", "0.7", *common], capsys)
    assert_one_line_error(code, err, "not empty")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before

    assert run(["--sparsity", "0.7", "--overwrite", *common], capsys)[0] == 0
    weight = AutoModelForCausalLM.from_pretrained(output).model.layers[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no temporary folders left behind


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_a_full_disk_is_one_line_and_leaves_the_old_output_alone(model_folders, text_file, tmp_path, capsys, monkeypatch, stream,
                                                                  failure) -> None:
    """Whether the OS or safetensors (its own exception type, 'os error 28') reports the full disk: one line, exit 1,
    the old folder as it was and no partial folder beside it (the first block's write failed: nothing to resume)."""
    from safetensors import SafetensorError

    output = tmp_path / "result"
    output.mkdir()
    (output / "keep.txt").write_text("the user's file")

    def full(*args, **kwargs):
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("prune.weights.save_file", full)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    code, _, err = run(["--model", str(model_folders["llama"]), "--calibration", str(text_file), "--no-eval", "--sparsity", "0.5",
                        "--output", str(output), "--overwrite", "--stream", stream, *FAST], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "the disk is full" in err, err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert {p.name for p in tmp_path.iterdir()} == {"result"}


def test_every_input_is_checked_before_the_first_forward_pass(model_folders, text_file, tmp_path, capsys) -> None:
    """Bad data for any stage (too short for the calibration, the refinement or the recovery, not text at all, windows
    longer than the model) is refused before the model runs once: no dense evaluation is wasted on a failing run."""
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text " * 20)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème brûlée, à la carte; ".encode("latin-1") * 20)
    llama = ["--model", str(model_folders["llama"]), "--eval-data", str(text_file), "--output", str(tmp_path / "out"), *FAST]
    cases = [
        (["--sparsity", "0.5", "--calibration", str(short)], "too short"),
        (["--sparsity", "0.5", "--calibration", str(binary)], "not a text file (it holds NUL bytes)"),
        (["--sparsity", "0.5", "--calibration", str(latin)], "not a text file"),
        (["--method", "magnitude", "--pattern", "2:4", "--calibration", str(text_file), "--refine", "maskpro", "--refine-windows", "5000"],
         "too short for --refine"),
        (["--method", "magnitude", "--sparsity", "0.5", "--calibration", str(text_file), "--recover", "adamw", "--recover-batch", "5000"],
         "too short for --recover"),
        (["--sparsity", "0.5", "--calibration", str(text_file), "--eval-seqlen", "4096"], "longer than the model's"),
        (["--sparsity", "0.5", "--calibration", str(text_file), "--eval-data", str(binary)], "not a text file"),
    ]
    with forward_passes() as forwards:
        for arguments, fragment in cases:
            code, _, err = run([*llama, *arguments], capsys)
            assert_one_line_error(code, err, fragment)
            assert not forwards, (arguments, forwards[:3])
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
