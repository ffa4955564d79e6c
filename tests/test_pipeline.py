"""The layer-by-layer pipeline on tiny random models of every architecture, through the Python API."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from calibration.capture import LayerInputStatistics, capture_block_inputs, run_block
from calibration.corpora import load_corpus
from calibration.text import TextSources
from calibration.windows import sample_windows, tokenize, tokenize_documents
from eval.perplexity import perplexity
from methods import METHODS, PruningError, Target, wanda
from methods.statistics import ColumnNormAccumulator, HessianAccumulator
from prune import load_model, prune_model
from prune.models import layer_weight, prunable_layers, transformer_blocks
from tests.conftest import ARCHITECTURES, SMALL


def weights_outside_blocks(model) -> dict[str, torch.Tensor]:
    blocks_name, _ = transformer_blocks(model)
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith(blocks_name + ".")}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(name for name, method in METHODS.items() if method.gradients is None))
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"pattern": "4:8"}])
def test_every_architecture_and_method_reaches_its_target(model_folders, text_file, architecture, method, target) -> None:
    loaded = load_model(str(model_folders[architecture]))
    untouched = weights_outside_blocks(loaded.model)
    model, report = prune_model(loaded, method=method, calibration=str(text_file), **target, **SMALL)

    _, blocks = transformer_blocks(model)
    layers = [layer for block in blocks for layer in prunable_layers(block).values()]
    assert len(report.layers) == len(layers) > 0
    for layer, entry in zip(layers, report.layers, strict=True):
        weight = layer_weight(layer)  # (out, in), Conv1D transposed back
        assert entry.shape == tuple(weight.shape)
        assert entry.sparsity == pytest.approx((weight == 0).float().mean().item())
        if "pattern" in target:
            n, m = map(int, target["pattern"].split(":"))
            groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(2)
            assert torch.all(groups <= n) and entry.pattern_valid is True
        else:
            assert entry.sparsity == pytest.approx(0.5, abs=1 / weight.shape[1])
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    for name, value in weights_outside_blocks(model).items():  # embeddings and heads stay dense and unchanged
        assert torch.equal(value, untouched[name]), name
    assert set(report.seconds) >= {"load", "calibrate", "prune", "total"}
    assert report.calibration == {"source": str(text_file), "nsamples": 8, "seqlen": 32, "seed": 0,
                                  "used": METHODS[method].statistic is not None}


def test_gpt2_conv1d_groups_run_along_the_inputs(model_folders, text_file) -> None:
    model, _ = prune_model(str(model_folders["gpt2"]), method="wanda", pattern="2:4", calibration=str(text_file), **SMALL)
    _, blocks = transformer_blocks(model)
    projection = blocks[0].mlp.c_proj
    assert isinstance(projection, Conv1D) and projection.weight.shape == (256, 64)  # stored (in, out)
    groups = (projection.weight != 0).T.reshape(64, 64, 4).sum(2)  # per output row, groups of 4 inputs
    assert torch.all(groups == 2)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_captured_block_calls_replay_the_models_own_forward(model_folders, tokenizer, architecture) -> None:
    """Every block's output, computed by replaying what the first block was called with and feeding each output on,
    equals the output of that block in the model's own forward pass (BERT with padded sentences)."""
    loaded = load_model(str(model_folders[architecture]))
    _, blocks = transformer_blocks(loaded.model)
    ids = torch.randint(2, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    if architecture == "bert":
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, 10:] = 0
    calls = capture_block_inputs(loaded.model, blocks[0], [batch], torch.device("cpu"))
    if architecture == "llama":
        assert "position_embeddings" in calls[0].kwargs
    outputs = []
    handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output))
               for block in blocks]
    with torch.no_grad():
        loaded.model(**batch)
    for handle in handles:
        handle.remove()
    call = calls[0]
    for block, expected in zip(blocks, outputs, strict=True):
        replayed = run_block(block, call)
        torch.testing.assert_close(replayed, expected)
        call = call.with_hidden_states(replayed)


def test_layers_fed_the_same_input_share_one_hessian(model_folders) -> None:
    loaded = load_model(str(model_folders["llama"]))
    _, blocks = transformer_blocks(loaded.model)
    calls = capture_block_inputs(loaded.model, blocks[0], [{"input_ids": torch.randint(0, 100, (2, 16))}] * 2, torch.device("cpu"))
    with LayerInputStatistics(prunable_layers(blocks[0]), "hessian", torch.device("cpu")) as statistics:
        for call in calls:
            statistics.begin_batch(call.token_mask)
            run_block(blocks[0], call)
    assert statistics.groups() == {
        "self_attn.q_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "self_attn.o_proj": ["self_attn.o_proj"],
        "mlp.gate_proj": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.down_proj": ["mlp.down_proj"],
    }
    assert statistics.statistics("self_attn.k_proj") is statistics.statistics("self_attn.q_proj")


def test_accumulators_are_running_means_that_skip_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 5, generator=generator) for _ in range(3)]
    masks = [torch.rand(3, 7, generator=generator) > 0.3 for _ in range(3)]
    hessian, norms = HessianAccumulator(5, torch.device("cpu"), torch.float64), ColumnNormAccumulator(5, torch.device("cpu"), torch.float64)
    for inputs, mask in zip(batches, masks, strict=True):
        hessian.add(inputs, mask)
        norms.add(inputs, mask)
    rows = torch.cat([inputs[mask] for inputs, mask in zip(batches, masks, strict=True)]).double()
    torch.testing.assert_close(hessian.result(), 2 * rows.T @ rows / len(rows))
    torch.testing.assert_close(norms.result(), rows.pow(2).mean(0).sqrt())


def test_padded_positions_do_not_enter_the_hessian(model_folders) -> None:
    loaded = load_model(str(model_folders["bert"]))
    _, blocks = transformer_blocks(loaded.model)
    ids = torch.randint(5, 100, (2, 12))
    padded = ids.clone()
    padded[1, 6:] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    short = capture_block_inputs(loaded.model, blocks[0], [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :6]}], torch.device("cpu"))
    full = capture_block_inputs(loaded.model, blocks[0], [{"input_ids": padded, "attention_mask": mask}], torch.device("cpu"))
    results = []
    for calls in (short, full):
        with LayerInputStatistics(prunable_layers(blocks[0]), "hessian", torch.device("cpu"), torch.float64) as statistics:
            for call in calls:
                statistics.begin_batch(call.token_mask)
                run_block(blocks[0], call)
        results.append(statistics.statistics("attention.self.query"))
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_pruned_outputs_feed_the_next_block(model_folders, text_file) -> None:
    runs = {}
    for propagate in ("pruned", "dense"):
        model, _ = prune_model(str(model_folders["llama"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), propagate=propagate,
                                order="two-pass", **SMALL)
        runs[propagate] = transformer_blocks(model)[1]
    first = [layer_weight(layer) for layer in prunable_layers(runs["pruned"][0]).values()]
    assert all(torch.equal(a, layer_weight(b)) for a, b in zip(first, prunable_layers(runs["dense"][0]).values(), strict=True))
    second = zip(prunable_layers(runs["pruned"][1]).values(), prunable_layers(runs["dense"][1]).values(), strict=True)
    assert not all(torch.equal(layer_weight(a), layer_weight(b)) for a, b in second)


def test_same_seed_same_masks_other_seed_other_windows(model_folders, text_file) -> None:
    def masks(seed: int) -> list[torch.Tensor]:
        model, _ = prune_model(str(model_folders["opt"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), seed=seed, **SMALL)
        return [layer_weight(layer) != 0 for block in transformer_blocks(model)[1] for layer in prunable_layers(block).values()]

    first, again, other = masks(0), masks(0), masks(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_perplexity_follows_the_protocol(model_folders, tokenizer) -> None:
    loaded = load_model(str(model_folders["llama"]))
    windows = torch.randint(0, len(tokenizer), (3, 20))
    result = perplexity(loaded.model, windows, torch.device("cpu"), batch_size=2, progress=False)
    losses = [loaded.model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss for w in windows]
    assert result.value == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)
    assert (result.seqlen, result.windows) == (20, 3)


def test_evaluation_text_never_overlaps_calibration(tokenizer, text_file) -> None:
    for calibration, evaluation in (("wiki-sample", "wiki-sample"), (str(text_file), str(text_file)), (str(text_file), "wiki-sample")):
        sources = TextSources(tokenizer, calibration=calibration, evaluation=evaluation)
        head, tail = sources.corpus(calibration, "calibration"), sources.corpus(evaluation, "evaluation")
        if calibration == evaluation:
            whole = load_corpus(calibration)
            pieces = whole.documents if len(whole.documents) > 1 else tuple(whole.documents[0].split("\n"))
            head_pieces = head.documents if len(whole.documents) > 1 else tuple(head.documents[0].split("\n"))
            tail_pieces = tail.documents if len(whole.documents) > 1 else tuple(tail.documents[0].split("\n"))
            assert head_pieces + tail_pieces == pieces  # a clean cut between documents (or lines)
            assert len(tail.text) == pytest.approx(0.1 * len(whole.text), rel=0.5)
        else:
            assert head.documents == load_corpus(calibration).documents
        assert len(sources.calibration_ids()) > 0 and len(sources.evaluation_ids()) > 0


def test_calibration_tokenised_in_pieces_matches_one_pass_but_for_a_few_tokens(tokenizer, wiki_text) -> None:
    documents = tuple(wiki_text.split("\n\n"))
    pieces = tokenize_documents(tokenizer, documents, piece_characters=20_000)
    whole = tokenize(tokenizer, "\n\n".join(documents))
    assert abs(len(pieces) - len(whole)) <= len(wiki_text) // 20_000 + 1
    assert torch.equal(pieces[:1000], whole[:1000])


def test_report_has_the_promised_fields(model_folders, text_file) -> None:
    _, report = prune_model(str(model_folders["llama"]), method="sparsegpt", pattern="2:4", calibration=str(text_file),
                            eval_data=str(text_file), eval_seqlen=32, eval_windows=4, **SMALL)
    data = report.to_dict()
    assert {"method", "target", "model", "calibration", "layers", "sparsity", "seconds", "perplexity", "peak_memory_mb"} <= set(data)
    unwritten = {"allocation", "entity_f1", "distributed", "tasks", "refine", "recover", "quantization", "storage"}
    assert unwritten <= set(data) and all(data[key] is None for key in unwritten)  # report.json keeps every key, null when not run
    assert json.loads(report.to_json()) == json.loads(json.dumps(data))
    assert data["target"] == {"sparsity": 0.5, "pattern": "2:4"}
    assert set(data["layers"][0]) >= {"name", "shape", "sparsity", "pattern_valid", "loss", "seconds"}
    assert set(data["seconds"]) >= {"load", "calibrate", "prune", "evaluate"}
    for stage in ("dense", "pruned"):
        assert data["perplexity"][stage]["windows"] == 4 and data["perplexity"][stage]["seqlen"] == 32
    assert data["perplexity"]["pruned"]["value"] != data["perplexity"]["dense"]["value"]
    assert data["peak_memory_mb"] > 0
    assert "2:4" in report.table() and "perplexity" in report.table()


def test_token_classifier_is_pruned_without_perplexity(model_folders, text_file) -> None:
    _, report = prune_model(str(model_folders["bert"]), method="wanda", sparsity=0.5, calibration=str(text_file), eval_data=str(text_file), **SMALL)
    assert report.perplexity is None
    assert any("perplexity skipped" in note for note in report.notes)


def test_only_the_selected_blocks_are_pruned(model_folders, text_file) -> None:
    loaded = load_model(str(model_folders["opt"]))
    before = [layer_weight(layer).clone() for layer in prunable_layers(transformer_blocks(loaded.model)[1][0]).values()]
    model, report = prune_model(loaded, method="sparsegpt", sparsity=0.5, calibration=str(text_file), blocks="1", **SMALL)
    first, second = transformer_blocks(model)[1]
    assert all(torch.equal(a, layer_weight(b)) for a, b in zip(before, prunable_layers(first).values(), strict=True))
    assert all((layer_weight(layer) == 0).float().mean() == pytest.approx(0.5, abs=0.02) for layer in prunable_layers(second).values())
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert any("block not selected" in note for layer in report.layers for note in layer.notes)
    with pytest.raises(PruningError, match="blocks 0-1"):
        prune_model(str(model_folders["opt"]), method="wanda", sparsity=0.5, calibration=str(text_file), blocks="0-2", **SMALL)
    with pytest.raises(PruningError, match="must look like"):
        prune_model(str(model_folders["opt"]), method="wanda", sparsity=0.5, calibration=str(text_file), blocks="first", **SMALL)


def test_second_block_is_pruned_on_the_pruned_first_blocks_outputs(model_folders, text_file) -> None:
    """Two passes: rebuild block 1's Wanda result by hand, inputs from the model whose block 0 is already pruned."""
    pruned, _ = prune_model(str(model_folders["llama"]), method="wanda", sparsity=0.5, calibration=str(text_file), order="two-pass", **SMALL)
    reference = load_model(str(model_folders["llama"]))
    blocks = transformer_blocks(reference.model)[1]
    blocks[0].load_state_dict(transformer_blocks(pruned)[1][0].state_dict())
    windows = sample_windows(TextSources(reference.tokenizer, calibration=str(text_file), evaluation=None).calibration_ids(), 8, 32, 0)
    squares = {}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, name=name: squares.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]) ** 2))
        for name, layer in prunable_layers(blocks[1]).items()
    ]
    with torch.no_grad():
        reference.model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    for name, layer in prunable_layers(blocks[1]).items():
        norms = torch.cat(squares[name]).mean(0).sqrt()
        expected = wanda.prune(layer_weight(layer), norms, Target(0.5)).mask
        assert torch.equal(layer_weight(prunable_layers(transformer_blocks(pruned)[1][1])[name]) != 0, expected), name


def test_the_hessian_accumulates_its_upper_triangle_and_mirrors_it() -> None:
    """Wider than one panel: the running mean of 2 x xᵀ, exactly symmetric, against the full product."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 9, 300, generator=generator, dtype=torch.float64) for _ in range(3)]
    accumulator = HessianAccumulator(300, torch.device("cpu"), torch.float64)
    assert len(accumulator.panels) == 3
    for inputs in batches:
        accumulator.add(inputs)
    rows = torch.cat([inputs.reshape(-1, 300) for inputs in batches])
    hessian = accumulator.result()
    torch.testing.assert_close(hessian, 2 * rows.T @ rows / len(rows))
    assert torch.equal(hessian, hessian.T)
    accumulator.add(batches[0])  # adding after a result keeps the mean right
    rows = torch.cat([rows, batches[0].reshape(-1, 300)])
    torch.testing.assert_close(accumulator.result(), 2 * rows.T @ rows / len(rows))


def layer_inputs(model, layer, windows: torch.Tensor) -> torch.Tensor:
    """What `layer` is fed when the whole model runs on `windows`."""
    seen = {}

    def hook(module, args) -> None:
        seen["inputs"] = args[0]

    handle = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return seen["inputs"]


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt"])
def test_one_pass_equals_true_sequential_pruning_done_by_hand(model_folders, text_file, architecture) -> None:
    """One pass: rebuild every layer's Wanda mask by hand the reference implementation's 'true sequential' way: for
    each group of layers fed one input, in order, run the whole model (every layer before it already pruned) and
    take the group's input norms from that forward pass; then prune the group."""
    pruned, _ = prune_model(str(model_folders[architecture]), method="wanda", sparsity=0.5, calibration=str(text_file), **SMALL)
    reference = load_model(str(model_folders[architecture]))
    windows = sample_windows(TextSources(reference.tokenizer, calibration=str(text_file), evaluation=None).calibration_ids(), 8, 32, 0)
    for block, result in zip(transformer_blocks(reference.model)[1], transformer_blocks(pruned)[1], strict=True):
        layers = prunable_layers(block)
        remaining = list(layers)
        while remaining:
            inputs = layer_inputs(reference.model, layers[remaining[0]], windows)
            group = [name for name in remaining if torch.equal(layer_inputs(reference.model, layers[name], windows), inputs)]
            norms = inputs.reshape(-1, inputs.shape[-1]).pow(2).mean(0).sqrt()
            for name in group:
                mask = wanda.prune(layer_weight(layers[name]), norms, Target(0.5)).mask
                assert torch.equal(layer_weight(prunable_layers(result)[name]) != 0, mask), (architecture, name)
                layer_weight(layers[name]).mul_(mask)
            remaining = [name for name in remaining if name not in group]


def test_an_error_inside_a_one_pass_block_leaves_grad_mode_as_it_was(model_folders, text_file, monkeypatch) -> None:
    from prune.stages.oneshot import OneShot

    original = OneShot.prune_group

    def failing(self, run, index, *args, **kwargs):
        if index == 1:
            raise RuntimeError("the power went out")
        return original(self, run, index, *args, **kwargs)

    monkeypatch.setattr(OneShot, "prune_group", failing)
    with pytest.raises(RuntimeError, match="power"):
        prune_model(str(model_folders["llama"]), method="sparsegpt", sparsity=0.5, calibration=str(text_file), order="one-pass", **SMALL)
    gc.collect()  # calls left waiting inside the block would end here, and with them their no_grad
    assert torch.is_grad_enabled()


def test_a_stage_written_in_this_module_runs_through_the_pipeline_and_the_report(model_folders, text_file, tmp_path) -> None:
    """A new stage is one class (its settings, its work, its report section) handed to prune_model: it is checked,
    timed, reported (report.json, the summary) and its option is routed and recorded like the built-in ones'."""
    from dataclasses import dataclass

    from prune.models import all_prunable_layers
    from prune.report import Section
    from prune.run import Stage
    from prune.settings import StageSettings, option
    from prune.stages import STAGES

    @dataclass
    class CountSettings(StageSettings):
        count_scale: float = option(1.0, "--count-scale", "Scale of the count.", positive=True)

        def whole_model_reason(self, run) -> str | None:
            return "the zero count (it reads every layer at once)"

    class CountZeros(Stage):
        key, settings_class, name, sections = "count", CountSettings, "count", ("zeros",)

        def execute(self, run) -> None:
            zeros = sum(int((layer_weight(layer) == 0).sum()) for layer in all_prunable_layers(run.model).values())
            run.report.put("zeros", Section({"zeros": zeros * self.settings.count_scale}, lines=lambda figures: [f"zeros counted: {figures['zeros']:g}"]))

    model, report = prune_model(str(model_folders["llama"]), method="magnitude", sparsity=0.5, calibration=str(text_file),
                                output=str(tmp_path / "out"), stages=(*STAGES, CountZeros), count_scale=2.0, **SMALL)
    assert not report.model["streamed"]  # its whole-model reason turned streaming off
    zeros = sum(int((layer_weight(layer) == 0).sum()) for layer in all_prunable_layers(model).values())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["zeros"]["zeros"] == report.zeros["zeros"] == 2 * zeros > 0
    assert saved["settings"]["count_scale"] == 2.0 and "count" in saved["seconds"]
    assert f"zeros counted: {report.zeros['zeros']:g}" in report.summary()
    with pytest.raises(PruningError, match="--count-scale must be positive"):
        prune_model(str(model_folders["llama"]), sparsity=0.5, stages=(*STAGES, CountZeros), count_scale=-1.0)
