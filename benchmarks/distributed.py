"""One process or two: SmolLM2-135M SparseGPT 50 % with 1 process x 2 threads against 2 processes x 1 thread
(torchrun, gloo) on this machine.

Prints, for each: seconds per stage (from report.json), bytes each rank summed (all-reduce) and broadcast per
transformer block, peak resident memory per rank, the perplexity, and how many weights the two runs' masks share.

    .venv/bin/python benchmarks/distributed.py                       # 64 x 512 calibration tokens, 64 evaluation windows
    .venv/bin/python benchmarks/distributed.py --json-out benchmarks/results/distributed/smollm2.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch

from prune.weights import Checkpoint

STAGES = ("load", "data", "evaluate", "calibrate", "prune", "total")


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (one file or shards), in its stored dtype."""
    checkpoint = Checkpoint.find(folder)
    return checkpoint.read(checkpoint.names())


def run(command: list[str], threads: int) -> None:
    finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:6])} ... failed: {finished.stderr.strip().splitlines()[-1:]}")


@click.command()
@click.option("--nsamples", default=64, show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--eval-windows", default=64, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(nsamples: int, seqlen: int, eval_windows: int, json_out: Path | None) -> None:
    options = ["--model", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
               "--eval-seqlen", "512", "--eval-windows", str(eval_windows), "--quiet"]
    with tempfile.TemporaryDirectory() as scratch:
        one, two = Path(scratch) / "one", Path(scratch) / "two"
        run([sys.executable, "-m", "prune", *options, "--output", str(one)], threads=2)
        run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "prune", *options, "--output", str(two)], threads=1)
        reports = {name: json.loads((folder / "report.json").read_text()) for name, folder in (("1 x 2 threads", one), ("2 x 1 thread", two))}
        first, second = stored(one), stored(two)
        pruned = [name for name in first if first[name].dim() == 2 and ".layers." in name]
        same = sum((first[name] != 0).eq(second[name] != 0).sum().item() for name in pruned)
        agreement = same / sum(first[name].numel() for name in pruned)
    blocks = int(reports["1 x 2 threads"]["model"]["blocks"].split("(")[1].rstrip(")"))
    click.echo(f"SmolLM2-135M SparseGPT 50 %, calibration {nsamples} x {seqlen}, {eval_windows} evaluation windows of 512 tokens; "
               f"{torch.get_num_threads()} threads here")
    click.echo(f"{'run':<14} " + " ".join(f"{stage:>9}" for stage in STAGES) + f" {'perplexity':>11}")
    for name, report in reports.items():
        click.echo(f"{name:<14} " + " ".join(f"{report['seconds'].get(stage, 0.0):>9.1f}" for stage in STAGES)
                   + f" {report['perplexity']['pruned']['value']:>11.3f}")
    for entry in reports["2 x 1 thread"]["distributed"]["per_rank"]:
        click.echo(f"rank {entry['rank']}: {entry['calibration_windows']} calibration windows, {entry['layer_groups_pruned']} layer groups pruned, "
                   f"{entry.get('bytes_summed', 0) / blocks / 2**20:.2f} MB summed and {entry.get('bytes_broadcast', 0) / blocks / 2**20:.2f} MB "
                   f"broadcast per block, peak memory {entry['peak_memory_mb']:.0f} MB")
    click.echo(f"one process: peak memory {reports['1 x 2 threads']['peak_memory_mb']:.0f} MB")
    ratio = reports["2 x 1 thread"]["seconds"]["prune"] / reports["1 x 2 threads"]["seconds"]["prune"]
    click.echo(f"prune seconds, 2 processes / 1 process: {ratio:.2f}; masks shared by the two runs: {agreement:.4%}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"nsamples": nsamples, "seqlen": seqlen, "eval_windows": eval_windows, "mask_agreement": agreement,
                                        "prune_ratio": ratio, "reports": {name: {key: report[key] for key in ("seconds", "perplexity", "peak_memory_mb",
                                        "distributed", "prune_breakdown")} for name, report in reports.items()}}, indent=2))


if __name__ == "__main__":
    main()
