"""CoNLL-2003 NER with a BERT-style token classifier: one-shot pruning methods compared (the pruning deep-dive, section 5).

Fine-tunes the encoder on the train split once (cached), then prunes every encoder Linear (embeddings and the
classifier head stay dense) with calibration sentences from the train split and measures test entity F1:
methods x sparsities x {uniform, OWL} (the deep-dive's Table 1), and F1 against calibration size for OBS and SparseGPT
at high sparsity (its Figure 1). Writes table.md, results.json and sample_size.png to --output.

    python benchmarks/conll_bert.py                      # the full study (about an hour or more on 2 CPU cores)
    python benchmarks/conll_bert.py --quick              # under 3 minutes: every method once at 50 %, small sizes
    python benchmarks/conll_bert.py --finetune-only      # fine-tune (or find the cached model) and print its F1
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from calibration.conll import NerDataError, load_conll2003
from calibration.sentences import labelled_batches, sentence_batches
from eval.ner import evaluate_ner
from eval.seeds import mean_and_spread, parse_seeds
from methods import PruningError, get_method
from prune.devices import resolve_device
from prune.models import MINILM, ModelError
from prune.movement import MovementSettings, movement_prune
from prune.output import OutputError
from prune.pipeline import PruneSettings, run_pipeline
from prune.plots import new_figure, save
from prune.stages.recover import RecoverSettings, recover
from prune.training import FinetuneSettings, fresh_copy, load_or_finetune

RESUME_KEYS = ("model", "classifier", "test_sentences", "nsamples", "owl", "training", "seed")  # what must match for runs to be kept
# --quick: every method once, at 50 %, uniform, on small sizes; exact OBS on block 0 only (on all six blocks one run takes
# ~140 s here); within 3 minutes on 2 CPU cores, fine-tuning included.
COMMITTED_RESULTS = Path(__file__).resolve().parent / "results" / "conll_bert"
NOT_MEASURED = {"output", "device", "cache_dir", "resume"}  # options that leave the figures as the full study's
QUICK = {"sparsities": "0.5", "allocations": "uniform", "nsamples": 32, "sample_sizes": "16,32", "sample_methods": "sparsegpt",
         "sample_sparsities": "0.5", "test_limit": 200, "train_limit": 1000, "epochs": 1, "obert_grads": 32, "gradual_epochs": 2,
         "train_steps": 10, "obs_blocks": "0"}
# Soft movement pruning's λ per target sparsity: its sparsity follows from λ (the pruning deep-dive §6.1). On MiniLM-L6 (batch 16):
# 300 steps from the 4,000-sentence classifier, λ = 1e-6 reached 47 % and 4e-6 80 %; 600 steps from the full one, 4e-6
# reached 94 % and 2e-6 84 %. The defaults are for 600 steps, the lower ones extrapolated in log λ from those figures.
SOFT_PENALTIES = "0.5=3.8e-7,0.6=6e-7,0.7=1e-6,0.8=2e-6"
# Methods that train on the task (not one-shot): oBERT pruned gradually then fine-tuned, movement pruning while fine-tuning.
TRAINED = ("obert-gradual", "movement-hard", "movement-soft")


@dataclass
class Study:
    """Everything measured, kept in the order it was measured."""

    setup: dict
    dense: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)  # {"method", "sparsity", "allocation", "nsamples", "f1", ...}
    seconds: float = 0.0

    def find(self, method: str, sparsity: float, allocation: str, nsamples: int, seed: int | None = None) -> dict | None:
        """The run of these settings with calibration seed `seed` (default: the study's seed)."""
        return next((run for run in self.runs if (run["method"], run["sparsity"], run["allocation"], run["nsamples"], self.seed_of(run))
                     == (method, sparsity, allocation, nsamples, self.setup["seed"] if seed is None else seed)), None)

    def seed_of(self, run: dict) -> int:
        return run.get("calibration_seed", self.setup["seed"])  # runs measured before calibration seeds had their own field

    def f1_cell(self, method: str, sparsity: float, allocation: str, nsamples: int, seeds: list[int]) -> str:
        """The F1 of one calibration seed, or mean ± standard deviation over the seeds measured; '-' when none was."""
        values = [run["f1"] for seed in seeds if (run := self.find(method, sparsity, allocation, nsamples, seed))]
        if not values:
            return "-"
        return mean_and_spread(values, 3)

    def as_dict(self) -> dict:
        return {"setup": self.setup, "dense": self.dense, "runs": self.runs, "seconds": self.seconds}


def parse_list(text: str, kind=str) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def resume_view(setup: dict) -> dict:
    """What of a study's setup its runs must share to be kept: soft movement's λ is recorded in each of its runs
    instead (a run measured with another λ than the one now given for its sparsity is measured again)."""
    training = {key: value for key, value in setup.get("training", {}).items() if key != "soft_penalties"}
    return {**setup, "training": training}


def parse_penalties(text: str) -> dict[float, float]:
    """'0.5=1e-6,0.7=4e-6' as {0.5: 1e-6, 0.7: 4e-6}."""
    penalties = {}
    for item in parse_list(text):
        target, _, value = item.partition("=")
        try:
            penalties[float(target)] = float(value)
        except ValueError:
            raise PruningError(f"--soft-penalties takes S=λ pairs such as 0.5=1e-6, got {item!r}") from None
        if penalties[float(target)] < 0:
            raise PruningError(f"--soft-penalties: λ must not be negative, got {item!r}")
    return penalties


def table_markdown(study: Study, methods: list[str], sparsities: list[float], allocations: list[str], nsamples: int, seeds: list[int]) -> str:
    """The deep-dive's Table 1 layout: Sparsity | Method | F1 uniform | F1 OWL | Time s, the time of the uniform run (calibration
    forwards + statistics + method + propagation, and any training), the part spent in the method itself, and the part
    spent training (fine-tuning after gradual oBERT; movement pruning is all training). A method whose sparsity is not
    set directly (soft movement) says what it reached. With several calibration seeds an F1 is mean ± standard deviation and
    a time is the first seed's."""
    lines = ["| Sparsity | Method | F1 (uniform) | F1 (OWL) | Time (s) | of which method (s) | of which training (s) |", "|---|---|---|---|---|---|---|",
             f"| 0% | Dense | {study.dense['f1']:.3f} | {study.dense['f1']:.3f} | - | - | - |"]
    for sparsity in sorted(sparsities):
        for method in methods:
            cells = [study.f1_cell(method, sparsity, allocation, nsamples, seeds) if allocation in allocations else "-" for allocation in ("uniform", "owl")]
            timed = next((run for seed in seeds for allocation in ("uniform", "owl") if (run := study.find(method, sparsity, allocation, nsamples, seed))), None)
            cells.extend([f"{timed['prune_seconds'] + timed.get('train_seconds', 0.0):.1f}", f"{timed['method_seconds']:.1f}",
                          f"{timed.get('train_seconds', 0.0):.1f}"] if timed else ["-", "-", "-"])
            name = method if not timed or abs(timed["achieved_sparsity"] - sparsity) < 0.02 else f"{method} (reached {timed['achieved_sparsity']:.0%})"
            if timed and timed.get("blocks"):
                name += f" (blocks {timed['blocks']} only)"
            lines.append(f"| {sparsity:.0%} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sample_sizes(study: Study, methods: list[str], sparsities: list[float], sizes: list[int], path: Path, seed: int) -> None:
    """F1 against the number of calibration sentences, one line per method and sparsity (the pruning deep-dive, Figure 1)."""
    figure = new_figure(6, 4)
    axes = figure.subplots()
    for method in methods:
        for sparsity in sparsities:
            points = [(size, run["f1"]) for size in sizes if (run := study.find(method, sparsity, "uniform", size, seed))]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=f"{method} {sparsity:.0%}")
    axes.axhline(study.dense["f1"], color="grey", linestyle="--", label="dense")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("calibration sentences")
    axes.set_ylabel("test entity F1")
    axes.set_title(f"{study.setup['model']} on CoNLL-2003: F1 vs calibration size")
    axes.legend(fontsize=8)
    replace_file(path, lambda partial: save(figure, partial))


def replace_file(path: Path, write) -> None:
    """Let `write` fill a temporary sibling of `path`, then rename it over `path`: a stopped run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_results(output: Path, study: Study, table: str | None) -> None:
    """results.json (and table.md), each replaced whole."""
    replace_file(output / "results.json", lambda path: path.write_text(json.dumps(study.as_dict(), indent=2) + "\n", encoding="utf-8"))
    if table is not None:
        replace_file(output / "table.md", lambda path: path.write_text(table, encoding="utf-8"))


def default_output(context: click.Context) -> Path:
    """Where a run writes when --output is not given: the committed results for the full study only; a quick or
    reduced run (any option that changes what is measured) gets a new temporary folder, so the tables stay as
    committed."""
    changed = [name for name in context.params if name not in NOT_MEASURED
               and context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    return COMMITTED_RESULTS if not changed else Path(tempfile.mkdtemp(prefix="conll_bert-"))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option("--data", default=None, help="A folder of CoNLL files (train/dev/test), 'hub' for the hub dataset. Default: ../shared/data/conll2003.")
@click.option("--model", default=MINILM, help="The encoder to fine-tune (an embedded name, a local folder or a hub name).")
@click.option("--methods", default="magnitude,obs,sparsegpt,wanda,obert," + ",".join(TRAINED),
              help="Comma-separated methods: one-shot ones, and " + ", ".join(TRAINED) + " (trained on the task).")
@click.option("--sparsities", default="0.5,0.6,0.7,0.8", help="Comma-separated sparsities.")
@click.option("--allocations", default="uniform,owl", help="uniform and/or owl.")
@click.option("--nsamples", type=int, default=4096, help="Calibration sentences from the train split (the pruning deep-dive: 4096).")
@click.option("--sample-sizes", default="128,512,1024,2048,4096", help="Calibration sizes of the F1-vs-size figure ('' to skip it).")
@click.option("--sample-methods", default="sparsegpt,obs", help="Methods of the F1-vs-size figure (run in this order).")
@click.option("--sample-sparsities", default="0.7,0.8", help="Sparsities of the F1-vs-size figure.")
@click.option("--owl-rule", default="proportional", help="OWL rule: proportional (S ∝ 1 − D, the pruning deep-dive's) or lambda (the OWL paper).")
@click.option("--owl-m", type=float, default=1.0, help="OWL outlier threshold M (the pruning deep-dive found M = 1 the most stable).")
@click.option("--owl-lambda", type=float, default=0.08, help="OWL λ of the lambda rule.")
@click.option("--calibration-batch", type=int, default=32, help="Sentences per calibration forward pass.")
@click.option("--test-limit", type=int, default=None, help="Score only the first n test sentences.")
@click.option("--epochs", type=int, default=FinetuneSettings.epochs, help="Fine-tuning epochs.")
@click.option("--lr", type=float, default=FinetuneSettings.lr, help="Fine-tuning learning rate.")
@click.option("--train-limit", type=int, default=None, help="Fine-tune on the first n training sentences only.")
@click.option("--finetune-only", is_flag=True, help="Fine-tune (or load the cached model), print its dev and test F1, and stop.")
@click.option("--resume", is_flag=True, help="Keep the runs already in --output/results.json (same setup) and measure only the missing ones.")
@click.option("--obert-grads", type=int, default=1024, help="oBERT: per-sample gradients (labelled train sentences) its Fisher is built from.")
@click.option("--obert-block", type=int, default=50, help="oBERT: weights per Fisher block.")
@click.option("--gradual-epochs", type=int, default=3, help="oBERT gradual: pruning epochs (cubic schedule) before the fine-tuning.")
@click.option("--train-steps", type=int, default=600, help="Training steps of the trained methods (fine-tuning after gradual oBERT; movement pruning).")
@click.option("--train-lr", type=float, default=5e-5, help="Learning rate of the fine-tuning after gradual oBERT.")
@click.option("--movement-lr", type=float, default=MovementSettings.lr, help="Learning rate of the weights during movement pruning (Sanh et al.'s).")
@click.option("--train-batch", type=int, default=16, help="Sentences per step of the trained methods.")
@click.option("--soft-penalties", default=SOFT_PENALTIES,
              help="Soft movement pruning: λ of the penalty λ Σσ(S) per target sparsity, as S=λ pairs (the sparsity follows from λ: the table says what it reached).")
@click.option("--obs-blocks", default=None, help="Prune only these blocks with exact OBS (e.g. 0 or 0-2; the others stay dense): it is slow.")
@click.option("--quick", is_flag=True, help=f"A smoke run within 3 minutes: {QUICK}.")
@click.option("--seed", type=int, default=0, help="Seed of fine-tuning (and of the calibration unless --calibration-seeds).")
@click.option("--calibration-seeds", default=None, help="Comma-separated seeds of the calibration sentences and of the trained methods' "
              "batches: every run is repeated with each, and the table shows F1 mean ± standard deviation. Default: --seed.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where fine-tuned models are kept (default: ~/.cache/obs-prune).")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Folder of table.md, results.json, sample_size.png. Default: "
              "benchmarks/results/conll_bert for the full study (every option at its default), a new temporary folder for any other run.")
def main(data, model, methods, sparsities, allocations, nsamples, sample_sizes, sample_methods, sample_sparsities, owl_rule, owl_m,
         owl_lambda, calibration_batch, test_limit, epochs, lr, train_limit, finetune_only, resume, obert_grads, obert_block, gradual_epochs,
         train_steps, train_lr, movement_lr, train_batch, soft_penalties, obs_blocks, quick, seed, calibration_seeds, device, cache_dir, output) -> None:
    """Fine-tune a token classifier on CoNLL-2003, prune it with every method, and compare test F1 and time."""
    output = output or default_output(click.get_current_context())
    if quick:
        sparsities, allocations, nsamples, sample_sizes = QUICK["sparsities"], QUICK["allocations"], QUICK["nsamples"], QUICK["sample_sizes"]
        sample_methods, sample_sparsities = QUICK["sample_methods"], QUICK["sample_sparsities"]
        test_limit = test_limit or QUICK["test_limit"]
        train_limit = train_limit or QUICK["train_limit"]
        epochs, obert_grads, gradual_epochs, train_steps = QUICK["epochs"], QUICK["obert_grads"], QUICK["gradual_epochs"], QUICK["train_steps"]
        obs_blocks = obs_blocks or QUICK["obs_blocks"]
    training = {"obert_grads": obert_grads, "obert_block": obert_block, "gradual_epochs": gradual_epochs, "train_steps": train_steps,
                "train_lr": train_lr, "movement_lr": movement_lr, "train_batch": train_batch, "soft_penalties": soft_penalties, "obs_blocks": obs_blocks}
    try:
        calibration_seed_list = parse_seeds(calibration_seeds, "--calibration-seeds") if calibration_seeds else [seed]
    except ValueError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    try:
        study = run_study(data, model, parse_list(methods), parse_list(sparsities, float), parse_list(allocations), nsamples,
                          parse_list(sample_sizes, int), parse_list(sample_methods), parse_list(sample_sparsities, float),
                          owl_rule, owl_m, owl_lambda, calibration_batch, test_limit, FinetuneSettings(epochs=epochs, lr=lr, seed=seed, train_limit=train_limit),
                          finetune_only, resume, seed, calibration_seed_list, device, cache_dir, output, training)
    except (NerDataError, PruningError, ModelError, OutputError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    if study is not None:
        click.echo(f"whole benchmark: {study.seconds:.0f} s; results in {output}")


def run_study(data, model, methods, sparsities, allocations, nsamples, sample_sizes, sample_methods, sample_sparsities, owl_rule, owl_m,
              owl_lambda, calibration_batch, test_limit, finetune, finetune_only, resume, seed, seeds, device_name, cache_dir, output,
              training: dict) -> Study | None:
    started = time.perf_counter()
    for allocation in allocations:
        if allocation not in ("uniform", "owl"):
            raise PruningError(f"--allocations takes uniform and owl, got {allocation!r}")
    for sparsity in {*sparsities, *sample_sparsities}:
        if not 0 < sparsity < 1:
            raise PruningError(f"sparsities must be in (0, 1), got {sparsity:g}")
    for method in {*methods, *sample_methods} - set(TRAINED):
        get_method(method)  # an unknown method fails here, before any work
    for name in ("obert_grads", "obert_block", "gradual_epochs", "train_steps", "train_batch"):
        if training[name] < 1:
            raise PruningError(f"--{name.replace('_', '-')} must be at least 1, got {training[name]}")
    penalties = parse_penalties(training["soft_penalties"])
    if "movement-soft" in methods and (missing := [f"{sparsity:g}" for sparsity in sparsities if sparsity not in penalties]):
        raise PruningError(f"--soft-penalties gives no λ for the sparsities {', '.join(missing)}")
    device = resolve_device(device_name)
    splits = load_conll2003(data)
    test = splits["test"][:test_limit] if test_limit else splits["test"]
    loaded, tuned, cached = load_or_finetune(model, splits, finetune, device, cache_dir)
    click.echo(f"token classifier: {loaded.source} ({'cached' if cached else f'fine-tuned in {tuned.seconds:.0f} s'}; best dev F1 "
               f"{tuned.best_dev_f1:.4f} at step {tuned.best_step})")
    dense = evaluate_ner(loaded.model, loaded.tokenizer, test, tuned.labels, device)
    click.echo(f"dense test F1 {dense.f1:.4f} (precision {dense.precision:.4f}, recall {dense.recall:.4f}, {len(test)} sentences)")
    setup = {"model": model, "classifier": loaded.source, "finetune": tuned.as_dict(), "test_sentences": len(test), "nsamples": nsamples,
             "owl": {"rule": owl_rule, "m": owl_m, "lambda": owl_lambda}, "training": training, "device": str(device), "seed": seed,
             "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    study = Study(setup=setup, dense={"f1": dense.f1, "precision": dense.precision, "recall": dense.recall})
    earlier = 0.0  # seconds spent by the runs resumed from
    if resume and (output / "results.json").is_file():
        saved = json.loads((output / "results.json").read_text(encoding="utf-8"))
        differences = [key for key in RESUME_KEYS if resume_view(saved["setup"]).get(key) != resume_view(setup)[key]]
        if differences:
            raise PruningError(f"{output / 'results.json'} was measured with another {', '.join(differences)}: pass another --output, or drop --resume")
        study.runs, earlier = saved["runs"], saved["seconds"]
        click.echo(f"resuming: {len(study.runs)} runs kept from {output / 'results.json'}")
    if finetune_only:
        study.seconds = earlier + time.perf_counter() - started
        return None

    def measure(method: str, sparsity: float, allocation: str, size: int, seed: int) -> dict:
        if (known := study.find(method, sparsity, allocation, size, seed)) is not None:
            if method != "movement-soft" or known.get("soft_penalty") == penalties[sparsity]:
                return known
            study.runs.remove(known)  # measured with another λ
        copy = fresh_copy(loaded)
        run = {"method": method, "sparsity": sparsity, "allocation": allocation, "nsamples": size, "calibration_seed": seed,
               "blocks": training["obs_blocks"] if method == "obs" else None}
        if method.startswith("movement-"):
            result = movement_prune(copy.model, task_batches(seed), MovementSettings(variant=method.removeprefix("movement-"), sparsity=sparsity,
                                    steps=training["train_steps"], lr=training["movement_lr"], penalty=penalties.get(sparsity, 0.0), seed=seed,
                                    progress=False), device)
            run.update(prune_seconds=0.0, method_seconds=0.0, train_seconds=result.seconds, achieved_sparsity=result.sparsity, allocation_blocks=None)
            if method == "movement-soft":
                run["soft_penalty"] = penalties[sparsity]
        else:
            gradients = method in ("obert", "obert-gradual")
            options = {"obert_grads": training["obert_grads"], "obert_block": training["obert_block"],
                       "obert_epochs": training["gradual_epochs"] if method == "obert-gradual" else 1} if gradients else {}
            batches = sentence_batches(loaded.tokenizer, splits["train"], training["obert_grads"] if gradients else size, seed=seed,
                                       batch_size=calibration_batch, label_names=tuned.labels if gradients else None)
            settings = PruneSettings(method="obert" if gradients else method, sparsity=sparsity, allocation=allocation, owl_rule=owl_rule,
                                     owl_m=owl_m, owl_lambda=owl_lambda, device=device_name, seed=seed, progress=False,
                                     blocks=training["obs_blocks"] if method == "obs" else None, **options)
            report = run_pipeline(copy, settings, calibration_batches=batches)
            run.update(prune_seconds=sum(report.seconds.get(stage, 0.0) for stage in ("calibrate", "allocate", "prune")),
                       method_seconds=report.prune_breakdown["method"], achieved_sparsity=report.sparsity,
                       allocation_blocks=[block["sparsity"] for block in report.allocation["blocks"]] if report.allocation else None)
            if method == "obert-gradual":  # then fine-tune the kept weights, the pruned ones pinned at zero (the pruning deep-dive §7.6)
                tuned_after = recover(copy.model, task_batches(seed), RecoverSettings(optimizer="adamw", steps=training["train_steps"],
                                      lr=training["train_lr"], batch=training["train_batch"]), device, seed=seed, progress=False)
                run["train_seconds"] = tuned_after.seconds
        scores = evaluate_ner(copy.model, loaded.tokenizer, test, tuned.labels, device)
        run.update(f1=scores.f1, precision=scores.precision, recall=scores.recall)
        study.runs.append(run)
        click.echo(f"{method:>13} {sparsity:.0%} {allocation:>7} n={size:<5} seed {seed} F1 {scores.f1:.4f}  prune {run['prune_seconds']:.1f} s"
                   + (f"  training {run['train_seconds']:.1f} s" if "train_seconds" in run else ""))
        return run

    def task_batches(seed: int):
        """Endless labelled batches of the train split (the task the trained methods learn)."""
        train_sentences = splits["train"][: finetune.train_limit] if finetune.train_limit else splits["train"]
        return labelled_batches(loaded.tokenizer, train_sentences, tuned.labels, training["train_batch"], seed=seed)

    for sparsity in sparsities:
        for method in methods:
            for allocation in allocations:
                for calibration_seed in seeds:
                    if method not in TRAINED or allocation == "uniform":  # the trained methods set each layer's sparsity themselves
                        measure(method, sparsity, allocation, nsamples, calibration_seed)
                        study.seconds = earlier + time.perf_counter() - started  # written after every run: a stopped study resumes
                        write_results(output, study, table_markdown(study, methods, sparsities, allocations, nsamples, seeds))
    for method in sample_methods:  # one method at a time, so that a long method (OBS) last leaves the others complete
        for sparsity in sample_sparsities:
            for size in sample_sizes:
                measure(method, sparsity, "uniform", size, seeds[0])
                study.seconds = earlier + time.perf_counter() - started
                write_results(output, study, None)
                plot_sample_sizes(study, sample_methods, sample_sparsities, sample_sizes, output / "sample_size.png", seeds[0])
    study.seconds = earlier + time.perf_counter() - started
    table = table_markdown(study, methods, sparsities, allocations, nsamples, seeds)
    write_results(output, study, table)
    click.echo(table)
    return study


if __name__ == "__main__":
    main()
