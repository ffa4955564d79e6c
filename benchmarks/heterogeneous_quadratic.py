"""The heterogeneous quadratic of seed 001, Appendix B.3: AdamW against AdamW + Magma (and SkipUpdate).

L(w) = ½ wᵀ H w in R⁹, H block-diagonal with 3 x 3 blocks sharing the eigenvalues {1, 2, 3, 99, 100, 101,
4998, 4999, 5000}: grouped by scale within blocks (homogeneous) or interleaved (heterogeneous), each block
randomly rotated. Gradients come from a random subset of the rows of X = H^{1/2}. Each 3-vector block is
one parameter tensor, so Magma's tensor-level blocks are the Hessian's blocks.

    .venv/bin/python benchmarks/heterogeneous_quadratic.py --output quadratic.png
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import torch

from methods.magma import Magma

EIGENVALUES = {
    "homogeneous": [[1, 2, 3], [99, 100, 101], [4998, 4999, 5000]],
    "heterogeneous": [[1, 99, 4998], [2, 100, 4999], [3, 101, 5000]],
}


def design_matrix(arrangement: str, seed: int = 0) -> torch.Tensor:
    """X = H^{1/2} (9 x 9) for the block-diagonal H of the given arrangement, blocks rotated at random."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for values in EIGENVALUES[arrangement]:
        rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
        blocks.append(rotation @ torch.diag(torch.tensor(values, dtype=torch.float64).sqrt()) @ rotation.T)
    return torch.block_diag(*blocks)


def full_loss(design: torch.Tensor, blocks: list[torch.Tensor]) -> float:
    w = torch.cat([block.detach() for block in blocks])
    return 0.5 * (design @ w).pow(2).sum().item()


def train(arrangement: str, optimizer_name: str, lr: float, steps: int = 1000, rows: int = 3, seed: int = 0, schedule: str = "constant") -> list[float]:
    """Loss curve of one optimizer on one problem, with a stochastic gradient from `rows` of the 9 rows of X each step
    and a constant learning rate or a cosine decay to zero."""
    design = design_matrix(arrangement, seed=0)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(9, generator=generator, dtype=torch.float64)
    blocks = [torch.nn.Parameter(start[3 * b : 3 * b + 3].clone()) for b in range(3)]
    base = torch.optim.AdamW(blocks, lr=lr, weight_decay=0.0)
    optimizer = {"adamw": base, "magma": Magma(base, seed=seed), "skipupdate": Magma(base, mode="skipupdate", seed=seed)}[optimizer_name]
    decay = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0)
    curve = []
    for _ in range(steps):
        chosen = torch.randperm(9, generator=generator)[:rows]
        w = torch.cat(list(blocks))
        loss = 0.5 * (9 / rows) * (design[chosen] @ w).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        curve.append(full_loss(design, blocks))
    return curve


def best_final_loss(arrangement: str, optimizer_name: str, lrs: list[float], seeds: list[int], steps: int, schedule: str) -> tuple[float, float]:
    """(the learning rate with the lowest mean final loss over seeds, that loss)."""
    results = []
    for lr in lrs:
        finals = [train(arrangement, optimizer_name, lr, steps, seed=seed, schedule=schedule)[-1] for seed in seeds]
        results.append((sum(finals) / len(finals), lr))
    loss, lr = min(results)
    return lr, loss


@click.command()
@click.option("--steps", default=1000, show_default=True)
@click.option("--seeds", default=5, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=Path("heterogeneous_quadratic.png"), show_default=True)
def main(steps: int, seeds: int, schedule: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lrs = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, arrangement in zip(axes, EIGENVALUES, strict=True):
        for name in ("adamw", "magma", "skipupdate"):
            lr, loss = best_final_loss(arrangement, name, lrs, list(range(seeds)), steps, schedule)
            curves = torch.tensor([train(arrangement, name, lr, steps, seed=seed, schedule=schedule) for seed in range(seeds)])
            axis.semilogy(curves.mean(0), label=f"{name} (lr {lr:g}): final {loss:.3g}")
            click.echo(f"{arrangement:>13}  {name:<10}  best lr {lr:<6g}  mean final loss {loss:.4g}")
        axis.set_title(f"{arrangement} Hessian, {schedule} lr")
        axis.set_xlabel("step")
        axis.legend()
    axes[0].set_ylabel("loss (mean over seeds)")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
