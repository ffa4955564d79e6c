"""Compare dense / magnitude / Wanda / SparseGPT on SmolLM2-135M at 50 % and 2:4, and measure SparseGPT against the hardware.

Prints, per run: WikiText-2 test perplexity (seqlen 512), prune seconds (calibration capture + the
layer-by-layer stage), peak resident memory of the pruning stage and its ratio to the memory the design
allows (model + 2 activation buffers + one block's statistics, + 25 %). For SparseGPT it also prints the
floating-point work of each stage (block forward passes, Hessian accumulation, sweeps) divided by the
fp32 matrix-multiply rate measured in the same run: the time the hardware could not beat.

    .venv/bin/python benchmarks/smollm2_methods.py                      # the full table (about an hour on 2 CPU cores)
    .venv/bin/python benchmarks/smollm2_methods.py --eval-windows 64    # perplexity on the first 64 windows only
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import torch
import yaml

from calibration.corpora import local_corpus
from calibration.windows import evaluation_windows, tokenize
from eval.perplexity import perplexity
from eval.seeds import mean_and_spread, parse_seeds
from methods import get_method
from methods.statistics import HessianAccumulator
from prune import PruneSettings, load_model, run_pipeline
from prune.models import prunable_layers, transformer_blocks

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def method_spec(spec: str) -> tuple[str, dict]:
    """A --methods entry: a method name, optionally with its options after slashes (`ria/ria_per_row=true`)."""
    name, *pairs = spec.split("/")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = yaml.safe_load(value)
    return name, options


def planned_runs(methods: list[str], targets: list[str], allocations: list[str], orders: list[str]) -> list[tuple[str, str | None, str, str]]:
    """(method, target, allocation, order) for every combination, dense first; OWL only for unstructured targets;
    the orders only for methods that collect statistics."""
    runs = [("dense", None, "uniform", "-")]
    for target in targets:
        for method in methods:
            for allocation in allocations:
                if allocation.startswith("owl") and ":" in target:
                    continue
                for order in orders if get_method(method_spec(method)[0]).statistic is not None else ["-"]:
                    runs.append((method, target, allocation, order))
    return runs


def target_options(target: str) -> dict:
    """'60%' -> sparsity 0.6; '2:4' -> pattern."""
    return {"pattern": target} if ":" in target else {"sparsity": float(target.rstrip("%")) / 100}


def memory_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, from /proc (Linux)."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak_memory() -> None:
    """Restart the VmHWM high-water mark at the current RSS (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply rate (FLOP/s) of `size`-square products on `device`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def hessian_work(tokens: int, features: int) -> float:
    """Products of the half-cost accumulation: each 128-feature row panel against the columns from the panel on."""
    panel = HessianAccumulator.PANEL
    return sum(2 * tokens * min(panel, features - start) * (features - start) for start in range(0, features, panel))


def block_work(model, block, nsamples: int, seqlen: int) -> float:
    """Floating-point operations of one block's forward pass over the calibration set: every Linear (2 per weight and
    token), and QKᵀ and AV (4 T² width per sequence)."""
    config = model.config
    linear = sum(layer.weight.numel() for layer in prunable_layers(block).values())
    attention_width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 2 * nsamples * seqlen * linear + nsamples * 4 * seqlen**2 * attention_width


def sparsegpt_work(model, report, nsamples: int, seqlen: int, blocksize: int) -> dict[str, float]:
    """Floating-point operations of a SparseGPT run, by stage (what a perfect implementation still has to do); the
    propagation pass is the two-pass design's second forward, which the one-pass design does not make."""
    tokens = nsamples * seqlen
    blocks_name, blocks = transformer_blocks(model)
    one_pass = block_work(model, blocks[0], nsamples, seqlen)
    hessian = sum(hessian_work(tokens, layer.shape[1]) for layer in report.layers if layer.statistics_from == layer.name)
    sweep = 0.0
    for layer in report.layers:
        if layer.loss is None:
            continue
        rows, columns = layer.shape
        for start in range(0, columns, blocksize):
            width = min(blocksize, columns - start)
            sweep += rows * width * (width + 1)  # rank-one updates inside the block
            sweep += 2 * rows * width * (columns - start - width)  # the lazy update of the columns after it
        sweep += (1 / 3 + 1 + 1 / 3) * columns**3  # Cholesky, inverse, Cholesky of the inverse
    pruned_blocks = {int(layer.name[len(blocks_name) + 1 :].split(".")[0]) for layer in report.layers if layer.loss is not None}
    return {
        "forward (statistics pass)": len(pruned_blocks) * one_pass,
        "hessian accumulation": hessian,
        "sweep": sweep,
        "forward (propagation pass)": max(pruned_blocks) * one_pass,  # every block before the last pruned one
    }


def memory_allowed_mb(model, report, nsamples: int, seqlen: int) -> float:
    """Model + 2 activation buffers + one block's statistics (float32), in MB."""
    parameters = sum(p.numel() for p in model.parameters()) * 4
    activations = 2 * nsamples * seqlen * model.config.hidden_size * 4
    blocks = {layer.name.rsplit(".", 2)[0] for layer in report.layers}
    per_block = max(
        (sum(layer.shape[1] ** 2 * 4 for layer in report.layers if layer.statistics_from == layer.name and layer.name.startswith(block + ".")) for block in blocks),
        default=0,
    )
    return (parameters + activations + per_block) / 2**20


def run_one(method: str, target: str | None, allocation: str, order: str, options: dict, seed: int = 0) -> dict:
    """Prune (unless dense) and evaluate in this process; memory is measured from before the model is loaded."""
    device = torch.device(options["device_resolved"])
    import gensim.corpora.wikicorpus  # noqa: F401  library code the wiki-sample reader needs: part of the baseline, like torch
    baseline = memory_mb()["VmRSS"]
    loaded = load_model("smollm2-135m")
    row = {"method": method, "target": target or "-", "allocation": allocation, "order": order, "seed": seed, "prune_seconds": None}
    if method != "dense":
        name, method_options = method_spec(method)
        settings = PruneSettings(
            method=name,
            **method_options,
            **target_options(target),
            allocation=allocation.split(":")[0],
            **({"owl_rule": allocation.split(":")[1]} if ":" in allocation else {}),
            **({"order": order} if order != "-" else {}),
            blocks=options["blocks"],
            nsamples=options["nsamples"],
            seqlen=options["seqlen"],
            batch_size=options["batch_size"],
            device=options["device"],
            seed=seed,
            progress=False,
        )
        reset_peak_memory()
        report = run_pipeline(loaded, settings)
        peak = memory_mb()["VmHWM"]
        row["prune_seconds"] = sum(report.seconds.get(stage, 0.0) for stage in ("calibrate", "allocate", "prune"))
        row["peak_mb"] = peak
        row["peak_over_baseline_mb"] = peak - baseline
        row["allowed_mb"] = memory_allowed_mb(loaded.model, report, options["nsamples"], options["seqlen"]) * 1.25
        row["breakdown"] = report.prune_breakdown
        if name == "sparsegpt":
            work = sparsegpt_work(loaded.model, report, options["nsamples"], options["seqlen"], blocksize=128)
            if order == "one-pass":
                work.pop("forward (propagation pass)")
            row["work_gflop"] = {stage: flops / 1e9 for stage, flops in work.items()}
    ids = tokenize(loaded.tokenizer, local_corpus(Path(options["wikitext"])).text)
    windows = evaluation_windows(ids, options["eval_seqlen"], options["eval_windows"])
    started = time.perf_counter()
    loaded.model.to(device)
    row["perplexity"] = perplexity(loaded.model, windows, device, progress=False).value
    row["eval_seconds"] = time.perf_counter() - started
    row["peak_with_eval_mb"] = memory_mb()["VmHWM"]  # the whole process after the model was loaded, evaluation included
    row["eval_windows"] = len(windows)
    row["eval_tokens"] = len(ids)
    return row


@click.command()
@click.option("--wikitext", type=click.Path(exists=True, path_type=Path), default=DEFAULT_WIKITEXT, help="WikiText-2 raw test file.")
@click.option("--nsamples", default=64, show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--batch-size", default=4, show_default=True, help="Calibration windows per forward pass.")
@click.option("--eval-seqlen", default=512, show_default=True)
@click.option("--eval-windows", type=int, default=None, help="Evaluate only the first N windows (default: all).")
@click.option("--device", default="auto", show_default=True)
@click.option("--methods", default="magnitude,wanda,sparsegpt", show_default=True, help="Comma-separated methods (dense always runs); options after slashes: ria/ria_per_row=true.")
@click.option("--targets", default="50%,2:4", show_default=True, help="Comma-separated targets: 50%, 60%, 2:4, 4:8 ...")
@click.option("--allocations", default="uniform", show_default=True,
              help="uniform, owl or owl:RULE (lambda, lambda-clipped, proportional), comma-separated (OWL only for unstructured targets).")
@click.option("--orders", default="one-pass,two-pass", show_default=True, help="Block orders to compare (methods with statistics).")
@click.option("--blocks", default=None, help="Prune only these blocks (e.g. 0-9), for methods too slow for the whole model.")
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds, comma-separated: every run is repeated with each, and the "
              "perplexities are summarised as mean ± standard deviation.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
@click.option("--single", default=None, hidden=True, help="Internal: run one METHOD:TARGET in this process and print JSON.")
def main(wikitext: Path, nsamples: int, seqlen: int, batch_size: int, eval_seqlen: int, eval_windows: int | None, device: str,
         methods: str, targets: str, allocations: str, orders: str, blocks: str | None, seeds: str, json_out: Path | None, single: str | None) -> None:
    device_resolved = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    options = {"wikitext": str(wikitext), "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size, "eval_seqlen": eval_seqlen,
               "eval_windows": eval_windows, "device": device, "device_resolved": device_resolved, "blocks": blocks}
    if single is not None:
        method, target, allocation, order, seed = single.split("|")
        click.echo(json.dumps(run_one(method, target or None, allocation, order, options, int(seed))))
        return
    try:
        seed_list = parse_seeds(seeds, "--seeds")
    except ValueError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    rate = matmul_rate(torch.device(device_resolved))
    click.echo(f"device {device_resolved}, {torch.get_num_threads()} threads; fp32 matmul rate {rate / 1e9:.1f} GFLOP/s")
    results = []
    plan = [(*run, seed) for run in planned_runs(methods.split(","), targets.split(","), allocations.split(","), orders.split(","))
            for seed in (seed_list if run[0] != "dense" else seed_list[:1])]
    for method, target, allocation, order, seed in plan:
        # each run in a fresh process, so that one run's memory does not count against the next
        arguments = [sys.executable, __file__, "--single", f"{method}|{target or ''}|{allocation}|{order}|{seed}", "--wikitext", str(wikitext), "--nsamples", str(nsamples),
                     "--seqlen", str(seqlen), "--batch-size", str(batch_size), "--eval-seqlen", str(eval_seqlen), "--device", device]
        if eval_windows is not None:
            arguments += ["--eval-windows", str(eval_windows)]
        if blocks is not None:
            arguments += ["--blocks", blocks]
        finished = subprocess.run(arguments, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            raise click.ClickException(f"run {method} {target} failed: {finished.stderr.strip().splitlines()[-1:]}")
        row = json.loads(finished.stdout.strip().splitlines()[-1])
        if "work_gflop" in row:
            row["bound_seconds"] = sum(row["work_gflop"].values()) * 1e9 / rate
        results.append(row)
        click.echo(f"  done {method} {target or ''} {allocation} {order} seed {seed}: perplexity {row['perplexity']:.2f}, prune {row['prune_seconds'] or 0:.1f} s")

    windows = results[0]["eval_windows"]
    click.echo("")
    click.echo(f"SmolLM2-135M, calibration {nsamples} x {seqlen} tokens of wiki-sample (batches of {batch_size}); "
               f"WikiText-2 test perplexity, seqlen {eval_seqlen}, {windows} windows ({results[0]['eval_tokens']} tokens)")
    if blocks is not None:
        click.echo(f"only blocks {blocks} pruned; the others stay dense")
    click.echo(f"{'method':<10} {'target':>6} {'alloc':>7} {'order':>8} {'perplexity':>11} {'prune s':>8} {'peak MB':>8} {'over start':>10} {'allowed':>8} {'ratio':>6} {'+eval MB':>8}")
    for row in results:
        if row["prune_seconds"] is None:
            click.echo(f"{row['method']:<10} {row['target']:>6} {'-':>7} {'-':>8} {row['perplexity']:>11.2f} {'-':>8} {'-':>8} {'-':>10} {'-':>8} {'-':>6} {'-':>8}")
            continue
        ratio = row["peak_over_baseline_mb"] / row["allowed_mb"]
        click.echo(
            f"{row['method']:<10} {row['target']:>6} {row['allocation']:>7} {row['order']:>8} {row['perplexity']:>11.2f} {row['prune_seconds']:>8.1f} "
            f"{row['peak_mb']:>8.0f} {row['peak_over_baseline_mb']:>10.0f} {row['allowed_mb']:>8.0f} {ratio:>6.2f} {row['peak_with_eval_mb']:>8.0f}"
        )
    click.echo("(peak MB: resident-memory high-water mark of the pruning stage; over start: minus the process after its imports (torch, transformers, gensim),")
    click.echo(" before the model was loaded; allowed: 1.25 x (model + 2 activation buffers + one block's Hessians); ratio = over start / allowed, target < 1;")
    click.echo(" +eval MB: the high-water mark from before pruning to after the perplexity evaluation)")

    for row in results:
        if "work_gflop" not in row:
            continue
        click.echo("")
        click.echo(f"SparseGPT {row['target']} {row['allocation']} {row['order']}: floating-point work against the measured matmul rate ({rate / 1e9:.1f} GFLOP/s)")
        for stage, gflop in row["work_gflop"].items():
            click.echo(f"  {stage:<28} {gflop:>9.1f} GFLOP  {gflop * 1e9 / rate:>7.1f} s at the matmul rate")
        measured = row["breakdown"]
        click.echo(f"  measured: statistics passes {measured['statistics']:.1f} s, sweeps {measured['method']:.1f} s, propagation passes {measured['propagate']:.1f} s")
        click.echo(f"  bound {row['bound_seconds']:.1f} s, measured {row['prune_seconds']:.1f} s: {row['prune_seconds'] / row['bound_seconds']:.2f} x the bound "
                   f"(target <= 1.2 for one-pass)")
    by_key = {(row["method"], row["target"], row["allocation"], row["order"]): row for row in results}
    for (method, target, allocation, order), row in by_key.items():
        other = by_key.get((method, target, allocation, "two-pass"))
        if order == "one-pass" and other is not None:
            click.echo(f"{method} {target} {allocation}: one-pass / two-pass time {row['prune_seconds'] / other['prune_seconds']:.2f} (target <= 0.6 for "
                       f"sparsegpt), perplexity {row['perplexity']:.2f} vs {other['perplexity']:.2f} ({row['perplexity'] / other['perplexity'] - 1:+.1%})")
    if len(seed_list) > 1:
        click.echo("")
        click.echo(f"perplexity over calibration seeds {seeds}: mean ± standard deviation (n)")
        summary = {}
        for row in results:
            summary.setdefault((row["method"], row["target"], row["allocation"], row["order"]), []).append(row["perplexity"])
        for (method, target, allocation, order), values in summary.items():
            click.echo(f"  {method:<10} {target:>6} {allocation:>7} {order:>8}  {mean_and_spread(values)} ({len(values)})")
    if json_out is not None:
        json_out.write_text(json.dumps({"matmul_gflops": rate / 1e9, "seeds": seed_list, "results": results}, indent=2))


if __name__ == "__main__":
    main()
