"""Recovery fine-tune on SmolLM2-135M after SparseGPT: AdamW vs AdamW+Magma vs SkipUpdate (the Magma paper).

For each target (default 2:4 and 50 %) the model is pruned once by SparseGPT (64 x 512 wiki-sample tokens);
then, for each optimizer and each learning rate of the sweep, the pruned weights are restored and fine-tuned
with the same budget (steps, batches of wiki-sample windows in the same order, warm-up + cosine schedule).
Prints WikiText-2 test perplexity (seqlen 512) before and after, seconds per step split into
forward+backward and optimizer step, and the extra time Magma / SkipUpdate cost per step over plain AdamW.

    .venv/bin/python benchmarks/smollm2_recover.py                                  # the default sweep
    .venv/bin/python benchmarks/smollm2_recover.py --targets 2:4 --lrs 1e-4 --steps 20   # a quick look
    .venv/bin/python benchmarks/smollm2_recover.py --targets 2:4 --lr-of adamw=3e-4,magma=3e-4,skipupdate=3e-4 --seeds 0,1,2

With several --seeds, everything that draws is redrawn per seed (the calibration windows of SparseGPT, the order of
the training windows, Magma's and SkipUpdate's random blocks), and the summary gives perplexity mean ± standard
deviation over the seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import click
import torch

from calibration.corpora import local_corpus
from calibration.text import TextSources
from calibration.windows import evaluation_windows, language_model_batches, tokenize
from eval.perplexity import perplexity
from eval.seeds import mean_and_spread, parse_seeds
from prune import PruneSettings, load_model, run_pipeline
from prune.devices import resolve_device
from prune.stages.recover import RECOVER_OPTIMIZERS, RecoverSettings, recover

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def spread(rows: list[dict]) -> str:
    """'before -> after' of one seed, or mean ± standard deviation over the seeds (n)."""
    before, after = [row["perplexity_before"] for row in rows], [row["perplexity_after"] for row in rows]
    return f"{mean_and_spread(before)} -> {mean_and_spread(after)}" + (f" (n = {len(rows)})" if len(rows) > 1 else "")


def target_options(target: str) -> dict:
    """'50%' -> sparsity 0.5; '2:4' -> pattern."""
    return {"pattern": target} if ":" in target else {"sparsity": float(target.rstrip("%")) / 100}


@click.command(context_settings={"show_default": True})
@click.option("--wikitext", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_WIKITEXT, help="WikiText-2 raw test file.")
@click.option("--targets", default="2:4,50%", help="Comma-separated SparseGPT targets.")
@click.option("--optimizers", default=",".join(("adamw", "magma", "skipupdate")), help=f"Comma-separated, from {', '.join(RECOVER_OPTIMIZERS)}.")
@click.option("--lrs", default="1e-4,3e-4", help="Comma-separated peak learning rates (the sweep, for every optimizer).")
@click.option("--lr-of", default=None, metavar="adamw=1e-4,magma=3e-4", help="A learning rate per optimizer instead of the sweep (e.g. the best of a sweep at another target).")
@click.option("--steps", type=int, default=100)
@click.option("--batch", type=int, default=4, help="Windows per step.")
@click.option("--seqlen", type=int, default=256, help="Tokens per training window.")
@click.option("--nsamples", type=int, default=64, help="SparseGPT calibration windows of 512 tokens.")
@click.option("--eval-windows", type=int, default=64, help="Evaluate on the first N windows of 512 tokens.")
@click.option("--seeds", default="0", help="Comma-separated seeds: calibration windows, training order and the optimizers' draws.")
@click.option("--device", default="auto")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(wikitext: Path, targets: str, optimizers: str, lrs: str, lr_of: str | None, steps: int, batch: int, seqlen: int, nsamples: int,
         eval_windows: int, seeds: str, device: str, json_out: Path | None) -> None:
    try:
        seed_list = parse_seeds(seeds, "--seeds")
    except ValueError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    torch.manual_seed(0)
    compute = resolve_device(device)
    loaded = load_model("smollm2-135m")
    model = loaded.model
    evaluation = evaluation_windows(tokenize(loaded.tokenizer, local_corpus(wikitext).text), 512, eval_windows)
    training_ids = TextSources(loaded.tokenizer, calibration="wiki-sample", evaluation=None).calibration_ids()
    dense_state = {name: value.clone() for name, value in model.state_dict().items()}
    click.echo(f"SmolLM2-135M on {compute}; recovery: {steps} steps of {batch} x {seqlen} wiki-sample tokens, "
               f"warm-up 10 % + cosine to 10 %; perplexity on {len(evaluation)} WikiText-2 test windows of 512")
    rows = []
    for target, seed in [(target, seed) for target in split_list(targets) for seed in seed_list]:
        model.load_state_dict(dense_state)
        settings = PruneSettings(method="sparsegpt", nsamples=nsamples, seqlen=512, device=device, progress=False, seed=seed, **target_options(target))
        report = run_pipeline(loaded, settings)
        pruned_state = {name: value.clone() for name, value in model.state_dict().items()}
        before = perplexity(model, evaluation, compute, progress=False).value
        click.echo(f"\nSparseGPT {target} (seed {seed}): prune {report.seconds['prune']:.1f} s, perplexity {before:.2f}")
        for optimizer in split_list(optimizers):
            chosen = dict(item.split("=") for item in split_list(lr_of)) if lr_of else {}
            for lr in [float(chosen[optimizer])] if optimizer in chosen else [float(value) for value in split_list(lrs)]:
                model.load_state_dict(pruned_state)
                recover_settings = RecoverSettings(optimizer=optimizer, steps=steps, lr=lr, batch=batch, seqlen=seqlen)
                result = recover(model, language_model_batches(training_ids, seqlen, batch, seed=seed), recover_settings, compute, seed=seed,
                                 progress=False)
                after = perplexity(model, evaluation, compute, progress=False).value
                row = {
                    "target": target, "seed": seed, "optimizer": optimizer, "lr": lr, "perplexity_before": before, "perplexity_after": after,
                    "seconds_per_step": result.seconds_per_step, "forward_backward_per_step": result.seconds_forward_backward / steps,
                    "optimizer_per_step": result.seconds_optimizer / steps, "final_loss": result.curve[-1]["loss"],
                    "updated_fraction": result.updated_fraction, "zeros_kept": result.zeros_kept,
                }
                rows.append(row)
                click.echo(f"  {optimizer:<10} lr {lr:<7g} perplexity {before:.2f} -> {after:.2f}  loss {row['final_loss']:.3f}  "
                           f"{row['seconds_per_step']:.2f} s/step (fwd+bwd {row['forward_backward_per_step']:.2f}, optimizer {row['optimizer_per_step']:.3f})"
                           f"  zeros kept: {'yes' if result.zeros_kept else 'NO'}")
    click.echo("\nbest learning rate per target and optimizer, and the optimizer's extra time over plain AdamW:")
    for target in split_list(targets):
        adamw = [row for row in rows if row["target"] == target and row["optimizer"] == "adamw"]
        base_optimizer = sum(row["optimizer_per_step"] for row in adamw) / len(adamw) if adamw else None
        base_step = sum(row["seconds_per_step"] for row in adamw) / len(adamw) if adamw else None
        for optimizer in split_list(optimizers):
            mine = [row for row in rows if row["target"] == target and row["optimizer"] == optimizer]
            best_lr = min(mine, key=lambda row: statistics.mean(other["perplexity_after"] for other in mine if other["lr"] == row["lr"]))["lr"]
            line = f"  {target:<5} {optimizer:<10} best lr {best_lr:g}: perplexity " + spread([row for row in mine if row["lr"] == best_lr])
            if base_optimizer is not None and optimizer != "adamw":
                extra = sum(row["optimizer_per_step"] for row in mine) / len(mine) - base_optimizer
                line += f"; optimizer step +{extra * 1000:.1f} ms = {extra / base_optimizer:+.1%} of AdamW's step, {extra / base_step:+.1%} of a whole step"
            click.echo(line)
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
