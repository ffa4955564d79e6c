"""Models bigger than memory: streamed block by block from safetensors shards, written block by block."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.perplexity import perplexity
from prune import PruneSettings, load_model
from prune.models import all_prunable_layers, layer_weight
from prune.pipeline import Pipeline
from prune.plan import LayerPlan
from prune.run import Run
from prune.stages.evaluate import sequential_perplexity
from tests.conftest import FAST, HALF, SMALL, run, stored, tiny_model


def run_command(folder: Path, output: Path, text_file: Path, capsys, *extra: str) -> dict:
    code, out, err = run(["--model", str(folder), "--calibration", str(text_file), "--eval-data", str(text_file), "--eval-windows", "3",
                          "--output", str(output), *FAST, *extra], capsys)
    assert code == 0, err
    return json.loads((output / "report.json").read_text())


@pytest.fixture(scope="module")
def bfloat16_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    folders = {}
    for architecture in ("llama", "gpt2", "opt"):
        folder = tmp_path_factory.mktemp(f"{architecture}-bf16")
        tiny_model(architecture, len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[architecture] = folder
    return folders


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("options", [("--method", "sparsegpt", "--pattern", "2:4"), ("--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                                                                                     "--owl-m", "3"), ("--method", "alps", "--pattern", "2:4")])
def test_streamed_equals_in_memory(bfloat16_folders, text_file, tmp_path, capsys, architecture, options) -> None:
    """The same masks, weights (bit for bit) and figures whether the model is read whole or one block at a time."""
    folder = bfloat16_folders[architecture]
    whole = run_command(folder, tmp_path / "whole", text_file, capsys, *options, "--stream", "off")
    streamed = run_command(folder, tmp_path / "streamed", text_file, capsys, *options, "--stream", "on")
    assert (whole["model"]["streamed"], streamed["model"]["streamed"]) == (False, True)
    expected, actual = stored(tmp_path / "whole"), stored(tmp_path / "streamed")
    assert set(expected) == set(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype == torch.bfloat16 and torch.equal(actual[name], tensor), name
    for key in ("dense", "pruned"):
        assert streamed["perplexity"][key]["value"] == pytest.approx(whole["perplexity"][key]["value"], rel=1e-5)
    assert [layer["loss"] for layer in streamed["layers"]] == [layer["loss"] for layer in whole["layers"]]
    assert streamed["allocation"] == whole["allocation"]


def test_the_streamed_output_is_a_sharded_save_pretrained_folder(bfloat16_folders, text_file, tmp_path, capsys) -> None:
    output = tmp_path / "out"
    report = run_command(bfloat16_folders["llama"], output, text_file, capsys, "--method", "sparsegpt", "--sparsity", "0.5", "--blocks", "1")
    assert report["model"]["streamed"]
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert shards == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored(bfloat16_folders["llama"]))
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == "model-00002-of-00003.safetensors"
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00003-of-00003.safetensors"
    assert {"config.json", "tokenizer.json", "report.json"} <= {path.name for path in output.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert all(path.stat().st_mode & 0o777 == 0o666 & ~umask for path in output.glob("*.safetensors"))  # as any file the user writes
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    source = AutoModelForCausalLM.from_pretrained(bfloat16_folders["llama"], dtype=torch.bfloat16)
    assert torch.equal(reloaded.model.layers[0].mlp.down_proj.weight, source.model.layers[0].mlp.down_proj.weight)  # block 0 not selected
    assert (reloaded.model.layers[1].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt"])
def test_perplexity_block_by_block_equals_the_whole_model_forward(model_folders, tokenizer, architecture) -> None:
    loaded = load_model(str(model_folders[architecture]))
    windows = torch.randint(0, len(tokenizer), (5, 24), generator=torch.Generator().manual_seed(0))
    whole = perplexity(loaded.model, windows, torch.device("cpu"), batch_size=2, progress=False)
    run_state = Run(loaded, PruneSettings(progress=False), torch.device("cpu"))
    from prune.models import transformer_blocks

    blocks_name, blocks = transformer_blocks(loaded.model)
    run_state.plan = LayerPlan(blocks_name, blocks, [None] * len(blocks))
    sequential = sequential_perplexity(run_state, windows, batch_size=2)
    assert sequential.value == pytest.approx(whole.value, rel=1e-5)
    assert (sequential.seqlen, sequential.windows) == (24, 5)


def test_the_api_streams_to_an_output_and_a_bin_checkpoint_is_loaded_whole(model_folders, text_file, tmp_path, tokenizer) -> None:
    from prune import prune_model

    model, report = prune_model(str(model_folders["opt"]), method="wanda", sparsity=0.5, calibration=str(text_file), output=str(tmp_path / "api"),
                                **SMALL)
    assert report.model["streamed"] and all(layer.weight.is_meta for layer in all_prunable_layers(model).values())
    assert (layer_weight(all_prunable_layers(load_model(str(tmp_path / "api")).model)["model.decoder.layers.0.fc1"]) == 0).float().mean() == 0.5
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    model = tiny_model("opt", len(tokenizer))
    model.config.save_pretrained(legacy)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")  # a pickle checkpoint, as older releases were saved
    tokenizer.save_pretrained(legacy)
    _, report = prune_model(str(legacy), method="wanda", sparsity=0.5, calibration=str(text_file), output=str(tmp_path / "from-bin"), **SMALL)
    assert not report.model["streamed"] and any("streaming needs safetensors" in note for note in report.notes)


@pytest.mark.parametrize(("options", "reason"), [
    ({"recover": "adamw"}, "--recover"),
    ({"pattern": "2:4", "refine": "maskpro"}, "--refine"),
    ({"eval_tasks": ("arc_easy",)}, "--eval-tasks (lm-eval runs the whole model)"),
    ({"calibration": "conll:.", "eval_data": "wiki-sample"}, "entity F1 (--calibration conll:DIR)"),
    ({"method": "obert"}, "--method obert (its gradients of the task loss)"),
])
def test_streaming_refuses_stages_that_need_the_whole_model(options: dict, reason: str) -> None:
    """Each stage's settings say themselves why they need the whole model; --stream on cites that reason."""
    from methods import PruningError

    settings = PruneSettings(**{"sparsity": 0.5, **options})
    assert settings.whole_model_needed_by() == reason
    with pytest.raises(PruningError, match=re.escape(f"--stream on reads one block at a time, but {reason} needs the whole model")):
        Pipeline(PruneSettings(**{"sparsity": 0.5, "stream": "on", **options}))
    assert not PruneSettings(**{"sparsity": 0.5, "output": "x", **options}).streams()


def test_streaming_is_on_by_default_with_an_output() -> None:
    assert PruneSettings(sparsity=0.5, output="x").streams() and not PruneSettings(sparsity=0.5).streams()
    assert set(HALF) == {"bfloat16", "float16"}


COMPARED = ("method", "target", "calibration", "sparsity", "perplexity", "allocation", "options", "settings")


def same_results(first: dict, second: dict) -> None:
    """Two reports with the same figures, seconds, memory and notes aside."""
    for key in COMPARED:
        if key == "settings":
            assert {k: v for k, v in first[key].items() if k not in ("resume", "output")} == {k: v for k, v in second[key].items() if k not in ("resume", "output")}
        else:
            assert first[key] == second[key], key
    strip = lambda layers: [{k: v for k, v in layer.items() if k != "seconds"} for layer in layers]  # noqa: E731
    assert strip(first["layers"]) == strip(second["layers"])


def interrupt_inside_block(monkeypatch, index: int) -> None:
    """Make the one-shot stage die while pruning block `index` (after its statistics, before its shard is written)."""
    from prune.stages.oneshot import OneShot

    original = OneShot.prune_group

    def dying(self, run, block_index, *args, **kwargs):
        if block_index == index:
            raise RuntimeError("the power went out")
        return original(self, run, block_index, *args, **kwargs)

    monkeypatch.setattr(OneShot, "prune_group", dying)


@pytest.mark.parametrize("options", [("--method", "sparsegpt", "--pattern", "2:4"),
                                     ("--method", "wanda", "--sparsity", "0.6", "--allocation", "owl", "--owl-m", "3"),
                                     ("--method", "sparsegpt", "--sparsity", "0.5", "--propagate", "dense", "--order", "two-pass"),
                                     ("--method", "wanda", "--sparsity", "0.5", "--quantize", "int4", "--group-size", "32")])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(bfloat16_folders, text_file, tmp_path, capsys, monkeypatch, options) -> None:
    from prune.cli import main

    folder = bfloat16_folders["llama"]
    whole = run_command(folder, tmp_path / "whole", text_file, capsys, *options, "--stream", "on")
    command = ["--model", str(folder), "--calibration", str(text_file), "--eval-data", str(text_file), "--eval-windows", "3",
               "--output", str(tmp_path / "resumed"), *FAST, *options, "--stream", "on"]
    with monkeypatch.context() as patch:
        interrupt_inside_block(patch, 1)
        with pytest.raises(RuntimeError, match="power"):
            main(command)
    state = json.loads((tmp_path / ".resumed.partial" / "resume.json").read_text())
    assert state["finished"] == 1 and not (tmp_path / "resumed").exists()
    resumed = run_command(folder, tmp_path / "resumed", text_file, capsys, *options, "--stream", "on", "--resume")
    assert any("resumed after 1 finished blocks" in note for note in resumed["notes"])
    same_results(whole, resumed)
    expected, actual = stored(tmp_path / "whole"), stored(tmp_path / "resumed")
    assert set(expected) == set(actual) and all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    assert not (tmp_path / ".resumed.partial").exists() and not (tmp_path / "resumed" / "resume.json").exists()


def test_resuming_with_other_settings_is_refused_and_a_full_disk_leaves_a_usable_state(bfloat16_folders, text_file, tmp_path, capsys,
                                                                                        monkeypatch) -> None:
    import errno

    folder = bfloat16_folders["opt"]
    options = ("--method", "sparsegpt", "--sparsity", "0.5", "--stream", "on")
    whole = run_command(folder, tmp_path / "whole", text_file, capsys, *options)
    import prune.weights

    real_save = prune.weights.save_file
    written = []

    def filling(tensors, path, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real_save(tensors, path, *args, **kwargs)

    command = ["--model", str(folder), "--calibration", str(text_file), "--eval-data", str(text_file), "--eval-windows", "3",
               "--output", str(tmp_path / "out"), *FAST, *options]
    with monkeypatch.context() as patch:
        patch.setattr(prune.weights, "save_file", filling)
        code, _, err = run(command, capsys)
    assert code == 1 and "the disk is full" in err and len(err.strip().splitlines()) == 1
    assert "the 1 finished block stays in" in err and "--resume" in err, err  # kept: a --resume continues after it
    assert not list((tmp_path / ".out.partial").glob("*.partial"))  # the shard that failed left no half-written file
    assert json.loads((tmp_path / ".out.partial" / "resume.json").read_text())["finished"] == 1

    code, _, err = run([*command, "--resume", "--nsamples", "16"], capsys)
    assert code == 2 and "--resume" in err and "nsamples 8 -> 16" in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / ".out.partial" / "resume.json").read_text())["finished"] == 1  # the refusal kept the state

    resumed = run_command(folder, tmp_path / "out", text_file, capsys, *options, "--resume")
    same_results(whole, resumed)
    assert all(torch.equal(stored(tmp_path / "out")[name], tensor) for name, tensor in stored(tmp_path / "whole").items())


def test_resume_needs_a_streamed_run_with_an_output() -> None:
    from methods import PruningError

    for options in ({"resume": True}, {"resume": True, "output": "x", "stream": "off"}, {"resume": True, "output": "x", "recover": "adamw"}):
        with pytest.raises(PruningError, match="--resume continues a streamed run"):
            Pipeline(PruneSettings(sparsity=0.5, **options))
