"""The quadratic benchmark of the Magma paper, Appendix B.3: AdamW against AdamW + Magma (and SkipUpdate).

L(w) = ½ wᵀ H w in R⁹, H block-diagonal with 3 x 3 blocks sharing the eigenvalues {1, 2, 3, 99, 100, 101,
4998, 4999, 5000}, each block randomly rotated. Each 3-vector block is one parameter tensor, so Magma's
tensor-level blocks are the Hessian's blocks. Two protocols:

  source (default): the benchmark the appendix cites (Orvieto & Gower 2025, after Zhang et al. 2024): its labels
    ("heterogeneous": each block holds one scale, {1,2,3}, {99,100,101}, {4998,4999,5000}; "homogeneous": the
    scales interleaved), Adam with β₁ = β₂ = 0.95 and no bias correction, 500 steps, a linear warm-up over the
    first 5 % then cosine to 0, w₀ = ones, data X = √n U Λ^½ (n = 9 samples, the columns of U Λ^½ scaled) with 3
    samples drawn per step, 10 seeds (each its own rotations and draws), median and inter-quartile range of the
    true loss; (a) the learning rate tuned per optimizer on 0.003 · √2^k up to 3.07, (b) shared rates 0.03, 0.1, 0.3;
    Magma's per-block score s over training.
  appendix-wording: this project's first reading of the appendix's text (its labels, which swap the source's;
    torch's AdamW, 1000 steps, constant or cosine rate, random w₀, gradients from 3 rows of H^½, the mean of 5
    seeds' last losses, rates 0.001 .. 1).

    .venv/bin/python benchmarks/heterogeneous_quadratic.py --output benchmarks/results/quadratic/source.png
    .venv/bin/python benchmarks/heterogeneous_quadratic.py --protocol appendix-wording --output quadratic.png
"""

from __future__ import annotations

import json
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


# ---- the source's protocol -------------------------------------------------------------------------------------

SOURCE_ARRANGEMENTS = {
    "heterogeneous": [[1, 2, 3], [99, 100, 101], [4998, 4999, 5000]],  # the source's label: each block one scale
    "homogeneous": [[1, 99, 4998], [2, 100, 4999], [3, 101, 5000]],
}
SOURCE_STEPS, SOURCE_WARMUP, SOURCE_BATCH, SOURCE_SEEDS = 500, 25, 3, 10
TUNING_GRID = [0.003 * math.sqrt(2) ** k for k in range(21)]  # 0.003 ... 3.07 in steps of √2
SHARED_RATES = (0.03, 0.1, 0.3)
OPTIMIZERS = ("adamw", "magma", "skipupdate")


class AdamWithoutBiasCorrection(torch.optim.Optimizer):
    """The source's Adam: m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g², w ← w − lr m / (√v + ε), no bias correction.
    Its first moment is kept under "exp_avg", where Magma reads it."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            first, second = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(parameter), torch.zeros_like(parameter)
                state["exp_avg"].mul_(first).add_(parameter.grad, alpha=1 - first)
                state["exp_avg_sq"].mul_(second).addcmul_(parameter.grad, parameter.grad, value=1 - second)
                parameter.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])


def warmup_cosine(step: int, steps: int = SOURCE_STEPS, warmup: int = SOURCE_WARMUP) -> float:
    """The rate factor: linear from 1/warmup to 1 over the warm-up, then cosine to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def source_problem(values: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H = U Λ Uᵀ, the samples z_i = √n λ_i^½ u_i as rows), U block-diagonal with a random rotation per block."""
    generator = torch.Generator().manual_seed(seed)
    rotations = [torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))[0] for _ in values]
    rotation = torch.block_diag(*rotations)
    eigenvalues = torch.tensor([value for block in values for value in block], dtype=torch.float64)
    hessian = rotation @ torch.diag(eigenvalues) @ rotation.T
    samples = (math.sqrt(9) * rotation * eigenvalues.sqrt()).T  # row i: √n λ_i^½ times the i-th column of U
    return hessian, samples


def run_source(arrangement: str, optimizer_name: str, lr: float, seed: int) -> tuple[list[float], list[list[float]]]:
    """(the true loss after each step, Magma's per-block score s after each step (empty for the others))."""
    hessian, samples = source_problem(SOURCE_ARRANGEMENTS[arrangement], seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    blocks = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(3)]
    base = AdamWithoutBiasCorrection(blocks, lr=lr)
    optimizer = {"adamw": base, "magma": Magma(base, seed=seed), "skipupdate": Magma(base, mode="skipupdate", seed=seed)}[optimizer_name]
    schedule = torch.optim.lr_scheduler.LambdaLR(base, warmup_cosine)
    losses, scores = [], []
    for _ in range(SOURCE_STEPS):
        chosen = torch.randperm(9, generator=generator)[:SOURCE_BATCH]
        w = torch.cat(list(blocks))
        loss = (samples[chosen] @ w).pow(2).sum() / (2 * SOURCE_BATCH)  # unbiased for ½ wᵀ H w
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        w = torch.cat([block.detach() for block in blocks])
        losses.append(0.5 * float(w @ hessian @ w))
        if optimizer_name == "magma":
            scores.append([float(optimizer.scores[index]) for index in range(3)])
    return losses, scores


def quartiles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first quartile, median, third quartile) over the first dimension (non-finite values sort last)."""
    values = torch.nan_to_num(values, nan=float("inf"))
    return torch.quantile(values, 0.25, dim=0), torch.quantile(values, 0.5, dim=0), torch.quantile(values, 0.75, dim=0)


def source_protocol(output: Path) -> None:
    """Tune each optimizer's rate, compare at shared rates, plot median curves with quartile bands and Magma's s."""
    from prune.plots import new_figure, save

    seeds = range(SOURCE_SEEDS)
    results: dict = {}
    figure = new_figure(12, 7)
    axes = figure.subplots(2, 2)
    for column, arrangement in enumerate(SOURCE_ARRANGEMENTS):
        entry = results[arrangement] = {"blocks": SOURCE_ARRANGEMENTS[arrangement], "tuned": {}, "shared": {}}
        for name in OPTIMIZERS:
            finals = {lr: torch.tensor([run_source(arrangement, name, lr, seed)[0][-1] for seed in seeds]) for lr in TUNING_GRID}
            medians = {lr: quartiles(values.unsqueeze(1))[1].item() for lr, values in finals.items()}
            best = min(medians, key=medians.get)
            runs = [run_source(arrangement, name, best, seed) for seed in seeds]
            low, middle, high = quartiles(torch.tensor([losses for losses, _ in runs]))
            entry["tuned"][name] = {"lr": best, "interior": TUNING_GRID[0] < best < TUNING_GRID[-1], "median": middle[-1].item(),
                                    "q1": low[-1].item(), "q3": high[-1].item(), "grid_medians": {f"{lr:.4g}": value for lr, value in medians.items()}}
            axes[0][column].fill_between(range(1, SOURCE_STEPS + 1), low.numpy(), high.numpy(), alpha=0.2)
            axes[0][column].semilogy(range(1, SOURCE_STEPS + 1), middle.numpy(), label=f"{name} (lr {best:.3g}): {middle[-1].item():.3g}")
            if name == "magma":
                score = torch.tensor([scores for _, scores in runs]).median(dim=0).values  # (steps, 3 blocks)
                for block, values in enumerate(SOURCE_ARRANGEMENTS[arrangement]):
                    axes[1][column].plot(range(1, SOURCE_STEPS + 1), score[:, block].numpy(), label=f"block {values}")
            for lr in SHARED_RATES:
                values = torch.tensor([run_source(arrangement, name, lr, seed)[0][-1] for seed in seeds]).unsqueeze(1)
                low, middle, high = (part.item() for part in quartiles(values))
                entry["shared"].setdefault(f"{lr:g}", {})[name] = {"median": middle, "q1": low, "q3": high}
            tuned = entry["tuned"][name]
            click.echo(f"{arrangement:>13}  {name:<10}  tuned lr {tuned['lr']:<7.4g} ({'inside' if tuned['interior'] else 'AT THE EDGE OF'} the grid)  "
                       f"final loss median {tuned['median']:.4g} [{tuned['q1']:.4g}, {tuned['q3']:.4g}]  shared: "
                       + ", ".join(f"lr {lr:g}: {entry['shared'][f'{lr:g}'][name]['median']:.4g}" for lr in SHARED_RATES))
        axes[0][column].set_title(f"{arrangement} (source's label): blocks {SOURCE_ARRANGEMENTS[arrangement]}", fontsize=9)
        axes[0][column].set_xlabel("step")
        axes[0][column].set_ylabel("true loss: median, quartile band (10 seeds)")
        axes[0][column].legend(fontsize=8)
        axes[1][column].set_title("Magma's score s per block (median over seeds)", fontsize=9)
        axes[1][column].set_xlabel("step")
        axes[1][column].legend(fontsize=8)
    output.parent.mkdir(parents=True, exist_ok=True)
    save(figure, output)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    click.echo(f"wrote {output} and {output.with_suffix('.json')}")


# ---- the first reading of the appendix's wording ------------------------------------------------------------------

@click.command()
@click.option("--protocol", type=click.Choice(["source", "appendix-wording"]), default="source", show_default=True)
@click.option("--steps", default=1000, show_default=True, help="appendix-wording only.")
@click.option("--seeds", default=5, show_default=True, help="appendix-wording only.")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True, help="appendix-wording only.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("heterogeneous_quadratic.png"), show_default=True)
def main(protocol: str, steps: int, seeds: int, schedule: str, output: Path) -> None:
    if protocol == "source":
        source_protocol(output)
        return
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
