"""SparseGPT's column sweep alone on SmolLM2-135M's layer shapes: lazy blocks swept by rank-one updates over the whole
lazy block (inner block = the lazy block, the code before) against inner blocks of about 16 columns (the default).

Random weights and a random well-conditioned Hessian per shape; the median of --repeats sweeps per shape; the masks of
both must be equal. Prints seconds per sweep and the ratio, and the total over SmolLM2's 30 blocks.

    .venv/bin/python benchmarks/sparsegpt_sweep.py
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from methods.base import Target
from methods.sparsegpt import BLOCKSIZE, MASK_BLOCKSIZE, sweep

# (columns = inputs, rows = outputs swept together) of one SmolLM2-135M block: q/k/v and gate/up share their input
SHAPES = {"q/k/v": (576, 960), "o": (576, 576), "gate/up": (576, 3072), "down": (1536, 576)}
BLOCKS = 30


def factor(columns: int, seed: int) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of a random damped Hessian."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(columns, 2 * columns, generator=generator, dtype=torch.float64)
    hessian = inputs @ inputs.T / inputs.shape[1] + 0.01 * torch.eye(columns, dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()


def timed_sweep(weight: torch.Tensor, upper: torch.Tensor, target: Target, inner: int | None) -> tuple[float, torch.Tensor]:
    work = weight.T.contiguous()
    started = time.perf_counter()
    keep, _, _ = sweep(work, upper, target, BLOCKSIZE, MASK_BLOCKSIZE, [(0, weight.shape[0])], inner=inner)
    return time.perf_counter() - started, keep


@click.command(context_settings={"show_default": True})
@click.option("--targets", default="50%,2:4", help="Comma-separated: a sparsity in % or N:M.")
@click.option("--repeats", type=int, default=5)
def main(targets: str, repeats: int) -> None:
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads; lazy block {BLOCKSIZE}, mask block {MASK_BLOCKSIZE}")
    for text in targets.split(","):
        target = Target.from_options(pattern=text) if ":" in text else Target.from_options(sparsity=float(text.rstrip("%")) / 100)
        totals = {"whole lazy block": 0.0, "inner blocks": 0.0}
        for name, (columns, rows) in SHAPES.items():
            weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(columns + rows))
            upper = factor(columns, columns)
            medians, masks = {}, {}
            for label, inner in (("whole lazy block", BLOCKSIZE), ("inner blocks", None)):
                runs = [timed_sweep(weight, upper, target, inner) for _ in range(repeats)]
                medians[label], masks[label] = statistics.median(seconds for seconds, _ in runs), runs[0][1]
                totals[label] += medians[label] * BLOCKS
            same = torch.equal(masks["whole lazy block"], masks["inner blocks"])
            click.echo(f"{text:>5} {name:<8} {rows}x{columns}: {medians['whole lazy block'] * 1000:7.1f} ms -> {medians['inner blocks'] * 1000:7.1f} ms "
                       f"({medians['inner blocks'] / medians['whole lazy block']:.2f} x), masks equal: {same}")
        click.echo(f"{text:>5} SmolLM2's {BLOCKS} blocks: {totals['whole lazy block']:.2f} s -> {totals['inner blocks']:.2f} s "
                   f"({totals['inner blocks'] / totals['whole lazy block']:.2f} x)")


if __name__ == "__main__":
    main()
