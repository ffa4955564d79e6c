"""MaskPro refinement of SmolLM2-135M's 2:4 masks from a SparseGPT and from a Wanda initial mask (the MaskPro paper, Sun et al., 2025).

For each initial method the model is pruned once (64 x 512 wiki-sample tokens), then refined; at each
checkpoint step the current top-N masks are evaluated: WikiText-2 test perplexity (seqlen 512). Prints the
time per step split into sampling / forward / update (target: sampling <= 15 % of the step), the memory of
the logits and masks, the loss-residual curve and the fraction of groups changed, and writes the curves as
a PNG next to --json-out when given.

    .venv/bin/python benchmarks/smollm2_maskpro.py --steps 500,2000            # the issue's figures (hours on a CPU)
    .venv/bin/python benchmarks/smollm2_maskpro.py --steps 50,200 --eval-windows 32
    .venv/bin/python benchmarks/smollm2_maskpro.py --inits sparsegpt --steps 300 --seeds 0,1,2 --windows 64

With several --seeds, each initial mask is refined once per seed of the sampler (the same one-shot model and the same
training windows) and the summary gives perplexity mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from calibration.corpora import local_corpus
from calibration.text import TextSources
from calibration.windows import evaluation_windows, sample_windows, tokenize
from eval.perplexity import perplexity
from eval.seeds import mean_and_spread, parse_seeds
from methods import Target
from prune import PruneSettings, load_model, run_pipeline
from prune.devices import resolve_device
from prune.models import all_prunable_layers
from prune.plots import plot_refine
from prune.stages.refine import RefineSettings, dense_snapshot, put_weights_under_mask, refine

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@click.command(context_settings={"show_default": True})
@click.option("--wikitext", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_WIKITEXT, help="WikiText-2 raw test file.")
@click.option("--inits", default="sparsegpt,wanda", help="One-shot methods giving the initial 2:4 mask.")
@click.option("--pattern", default="2:4")
@click.option("--steps", default="500,2000", help="Checkpoints (comma-separated); the run lasts until the last one.")
@click.option("--lr", type=float, default=50.0)
@click.option("--logit-scale", type=float, default=10.0)
@click.option("--alpha", type=float, default=0.99)
@click.option("--batch", type=int, default=4)
@click.option("--seqlen", type=int, default=256)
@click.option("--windows", type=int, default=64)
@click.option("--weights", type=click.Choice(["oneshot", "dense"]), default="oneshot")
@click.option("--estimator", type=click.Choice(["auto", "set", "sequence"]), default="auto")
@click.option("--nsamples", type=int, default=64, help="One-shot calibration windows of 512 tokens.")
@click.option("--eval-windows", type=int, default=64, help="Evaluate on the first N windows of 512 tokens.")
@click.option("--seeds", default="0", help="Comma-separated seeds of MaskPro's mask sampler.")
@click.option("--device", default="auto")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(wikitext: Path, inits: str, pattern: str, steps: str, lr: float, logit_scale: float, alpha: float, batch: int, seqlen: int,
         windows: int, weights: str, estimator: str, nsamples: int, eval_windows: int, seeds: str, device: str, json_out: Path | None) -> None:
    try:
        seed_list = parse_seeds(seeds, "--seeds")
    except ValueError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    compute = resolve_device(device)
    checkpoints = sorted(int(step) for step in split_list(steps))
    loaded = load_model("smollm2-135m")
    model = loaded.model
    evaluation = evaluation_windows(tokenize(loaded.tokenizer, local_corpus(wikitext).text), 512, eval_windows)
    calibration_ids = TextSources(loaded.tokenizer, calibration="wiki-sample", evaluation=None).calibration_ids()
    dense_state = {name: value.clone() for name, value in model.state_dict().items()}
    target = Target.from_options(pattern=pattern)
    settings = RefineSettings(steps=checkpoints[-1], lr=lr, logit_scale=logit_scale, alpha=alpha, batch=batch, seqlen=seqlen, windows=windows,
                              holdout=8, weights=weights, estimator=estimator)
    click.echo(f"SmolLM2-135M on {compute}, {pattern}; MaskPro lr {lr:g}, C {logit_scale:g}, α {alpha:g}, {estimator} estimator, {weights} weights; "
               f"batches of {batch} x {seqlen} tokens from {windows} wiki-sample windows; perplexity on {len(evaluation)} WikiText-2 windows of 512")
    results = []
    for method in split_list(inits):
        model.load_state_dict(dense_state)
        dense = dense_snapshot(all_prunable_layers(model))
        report = run_pipeline(loaded, PruneSettings(method=method, pattern=pattern, nsamples=nsamples, seqlen=512, device=device, progress=False))
        before = perplexity(model, evaluation, compute, progress=False).value
        layers = {layer.name: model.get_submodule(layer.name) for layer in report.layers if layer.loss is not None}
        pruned_state = {name: value.clone() for name, value in model.state_dict().items()}
        refine_windows = sample_windows(calibration_ids, windows + 8, seqlen, seed=1)
        click.echo(f"\n{method} {pattern}: prune {report.seconds['prune']:.1f} s, perplexity {before:.2f}")
        for seed in seed_list:
            model.load_state_dict(pruned_state)
            initial = put_weights_under_mask(layers, dense, weights)
            results.append(refine_once(model, layers, initial, target, refine_windows, windows, settings, compute, checkpoints, evaluation,
                                       method, seed, before, json_out))
    for method in split_list(inits):
        mine = [row for row in results if row["init"] == method]
        finals = [row["perplexity_final"] for row in mine]
        click.echo(f"{method} {pattern} after {checkpoints[-1]} steps, sampler seeds {seeds}: perplexity "
                   + mean_and_spread(finals) + (f" (n = {len(finals)})" if len(finals) > 1 else ""))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


def refine_once(model, layers, initial, target, refine_windows, windows, settings, compute, checkpoints, evaluation, method, seed, before,
                json_out) -> dict:
    """One refinement with sampler seed `seed`: perplexity at the checkpoints, time split, curves (and its figure)."""
    at_checkpoint = {}

    def measure(step: int) -> None:
        at_checkpoint[step] = perplexity(model, evaluation, compute, progress=False).value
        click.echo(f"  {method} seed {seed} step {step}: perplexity {at_checkpoint[step]:.2f}")

    result = refine(model, layers, initial, target, refine_windows[:windows], refine_windows[windows:], settings, compute, seed=seed,
                    progress=False, checkpoints=set(checkpoints), on_checkpoint=measure)
    after = perplexity(model, evaluation, compute, progress=False).value
    share = {part: getattr(result, f"seconds_{part}") / result.seconds for part in ("sampling", "forward", "update")}
    click.echo(f"  {result.seconds_per_step:.2f} s/step: sampling {share['sampling']:.1%} (target <= 15 %), forward {share['forward']:.1%}, "
               f"update {share['update']:.1%}; logits + masks {result.memory_mb:.0f} MB; {result.changed_groups:.2%} of groups changed")
    click.echo("  residual curve: " + ", ".join(f"{point['step']}: {point['residual']:+.4f}" for point in result.curve[:: max(1, len(result.curve) // 10)]))
    click.echo(f"  held-out loss one-shot {result.heldout['losses']['one-shot']:.4f}, top-N {result.heldout['losses']['top-N']:.4f}; "
               f"final perplexity {before:.2f} -> {after:.2f}")
    if json_out is not None:
        result.perplexity_before, result.perplexity_after = before, after
        plot_refine(result.as_dict(), json_out.with_name(f"{json_out.stem}_{method}_seed{seed}.png"))
    return {"init": method, "seed": seed, "perplexity_oneshot": before, "perplexity_at": at_checkpoint, "perplexity_final": after, **result.as_dict()}

if __name__ == "__main__":
    torch.manual_seed(0)
    main()
