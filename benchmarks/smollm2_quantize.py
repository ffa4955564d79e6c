"""Pruning and quantization on SmolLM2-135M: WikiText-2 perplexity, size on disk and prune seconds of

    dense / SparseGPT 50 % / SparseGPT 2:4 / int4 (GPTQ) / 50 % + int4 in one sweep (joint) /
    50 % then GPTQ as a second pass (llm-compressor's order) / 2:4 + int4 joint / 2:4 then GPTQ,
    with GPTQ's plain column order (`--no-act-order`), and the quantized rows again with its activation order (the
    default since it was measured here: `--act-order`, static groups), and with the scale search (`--search-scales`)

int4 groups of 64 inputs by default: SmolLM2's hidden size, 576, is not a multiple of 128, and compressed-tensors
(like the serving kernels) takes whole groups only, so the usual g128 cannot be stored for this model.

Each configuration is one run of the command in its own process (so that its time and memory are its own), with
the same calibration windows. The two-pass rows prune and save dense, then run GPTQ on that output with
`--method magnitude` at the same target: the zeros of the pruned model are its lowest magnitudes, so the second
pass keeps exactly that mask and only quantizes (on activations of the pruned model, as llm-compressor's pipeline
does); their prune seconds are the sum of both passes.

    .venv/bin/python benchmarks/smollm2_quantize.py                     # 64 windows of 512 tokens, 64 evaluation windows, bfloat16
    .venv/bin/python benchmarks/smollm2_quantize.py --eval-windows 0    # the whole WikiText-2 test split
    .venv/bin/python benchmarks/smollm2_quantize.py --dtype float32 --eval-windows 40 --seeds 0,1,2 \
        --only "int4 (GPTQ)" --only "int4 (GPTQ), act-order"                # the activation-order comparison, 3 calibration seeds
    .venv/bin/python benchmarks/smollm2_quantize.py --dtype float32 --eval-windows 40 --seeds 0,1,2 \
        --only "int4 (GPTQ), act-order" --only "int4 (GPTQ), act-order, searched scales"    # the scale search, the same way

Nothing is written under benchmarks/results unless --results names a file there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from eval.seeds import mean_and_spread, parse_seeds

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

RUNS = {  # name -> (first pass options, second pass options or None); "int4" gets the benchmark's --group-size
    "dense": (["--sparsity", "0", "--method", "magnitude"], None),
    "sparsegpt 50%": (["--sparsity", "0.5"], None),
    "sparsegpt 2:4": (["--pattern", "2:4"], None),
    "int4 (GPTQ)": (["--sparsity", "0", "--quantize", "int4", "--no-act-order"], None),
    "50% + int4 joint": (["--sparsity", "0.5", "--quantize", "int4", "--no-act-order"], None),
    "50% then GPTQ (two passes)": (["--sparsity", "0.5"], ["--method", "magnitude", "--sparsity", "0.5", "--quantize", "int4", "--no-act-order"]),
    "2:4 + int4 joint": (["--pattern", "2:4", "--quantize", "int4", "--no-act-order"], None),
    "2:4 then GPTQ (two passes)": (["--pattern", "2:4"], ["--method", "magnitude", "--pattern", "2:4", "--quantize", "int4", "--no-act-order"]),
    "int4 (GPTQ), act-order": (["--sparsity", "0", "--quantize", "int4", "--act-order"], None),
    "50% + int4 joint, act-order": (["--sparsity", "0.5", "--quantize", "int4", "--act-order"], None),
    "2:4 + int4 joint, act-order": (["--pattern", "2:4", "--quantize", "int4", "--act-order"], None),
    "int4 (GPTQ), act-order, searched scales": (["--sparsity", "0", "--quantize", "int4", "--act-order", "--search-scales"], None),
    "50% + int4 joint, act-order, searched scales": (["--sparsity", "0.5", "--quantize", "int4", "--act-order", "--search-scales"], None),
}


def with_group_size(options: list[str], group_size: int) -> list[str]:
    return [*options, "--group-size", str(group_size)] if "--quantize" in options else options


def prune(options: list[str], output: Path, common: list[str]) -> dict:
    """One run of the command; its report."""
    command = [sys.executable, "-m", "prune", *common, *options, "--output", str(output), "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed: {completed.stderr.strip().splitlines()[-1]}")
    return json.loads((output / "report.json").read_text())


def prune_seconds(report: dict) -> float:
    return report["seconds"].get("calibrate", 0.0) + report["seconds"].get("prune", 0.0)


@click.command()
@click.option("--nsamples", default=64, show_default=True, help="Calibration windows.")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per calibration and evaluation window.")
@click.option("--eval-windows", default=64, show_default=True, help="Evaluation windows (0: the whole test split).")
@click.option("--eval-data", default=str(DEFAULT_WIKITEXT), show_default=True, help="WikiText-2 test file.")
@click.option("--only", multiple=True, help="Run only these configurations (by name; repeatable).")
@click.option("--group-size", default=64, show_default=True, help="Inputs per int4 scale (128 does not divide SmolLM2's 576).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True, help="The dtype the model is pruned and saved in.")
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds, comma-separated: each configuration runs once per seed.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the rows to this JSON file.")
def main(nsamples: int, seqlen: int, eval_windows: int, eval_data: str, only: tuple[str, ...], group_size: int, dtype: str, seeds: str,
         results: Path | None) -> None:
    unknown = sorted(set(only) - set(RUNS))
    if unknown:
        raise click.BadParameter(f"unknown configuration {unknown[0]!r}: choose from {', '.join(RUNS)}", param_hint="--only")
    try:
        seed_list = parse_seeds(seeds, "--seeds")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--seeds") from None
    common = ["--dtype", dtype, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval-data", eval_data,
              "--eval-seqlen", str(seqlen), *(["--eval-windows", str(eval_windows)] if eval_windows else [])]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (first, second) in RUNS.items():
            if only and name not in only:
                continue
            for seed in seed_list if name != "dense" else seed_list[:1]:
                folder = Path(scratch) / f"{name.replace(' ', '_').replace('%', '').replace(':', '-').replace(',', '')}-{seed}"
                seeded = [*common, "--seed", str(seed)]
                report = prune(with_group_size(first, group_size), folder / "first", seeded)
                seconds = prune_seconds(report)
                if second is not None:
                    report = prune(["--model", str(folder / "first"), *with_group_size(second, group_size)], folder / "second", seeded)
                    seconds += prune_seconds(report)
                rows.append({"configuration": name, "seed": seed, "perplexity": report["perplexity"]["pruned"]["value"],
                             "dense_perplexity": report["perplexity"]["dense"]["value"], "storage": report["storage"], "prune_seconds": seconds,
                             "peak_memory_mb": report["peak_memory_mb"]})
                print(f"{name} seed {seed}: perplexity {rows[-1]['perplexity']:.3f}, {rows[-1]['storage']['output_bytes'] / 2**20:.1f} MB, "
                      f"{seconds:.1f} s", flush=True)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"dtype": dtype, "nsamples": nsamples, "seqlen": seqlen, "eval_windows": eval_windows, "group_size": group_size,
                                       "seeds": seed_list, "rows": rows}, indent=2) + "\n")
    print(f"\nSmolLM2-135M {dtype}, calibration {nsamples} x {seqlen} tokens (seeds {seeds}), WikiText-2 test "
          f"({eval_windows or 'all'} windows of {seqlen}), int4 in groups of {group_size}")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """One line per configuration: perplexity (mean ± standard deviation over seeds), size on disk against the dense
    save, bits per quantized weight, prune seconds and peak memory (means over seeds)."""
    dense_bytes = next((row["storage"]["output_bytes"] for row in rows if row["configuration"] == "dense"), None)
    lines = ["| configuration | perplexity | on disk (MB) | vs dense | quantized layers, bits/weight | prune s | peak MB |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(row["configuration"] for row in rows):
        runs = [row for row in rows if row["configuration"] == name]
        storage = runs[0]["storage"]
        ratio = f"{storage['output_bytes'] / dense_bytes:.3f}x" if dense_bytes else "-"
        bits = f"{storage['quantized_bits_per_weight']:.3f}" if storage.get("quantized_bits_per_weight") else "dense"
        seconds = sum(row["prune_seconds"] for row in runs) / len(runs)
        peak = sum(row["peak_memory_mb"] for row in runs) / len(runs)
        lines.append(f"| {name} | {mean_and_spread([row['perplexity'] for row in runs])} | {storage['output_bytes'] / 2**20:.1f} | {ratio} | {bits} "
                     f"| {seconds:.1f} | {peak:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
