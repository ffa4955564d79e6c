"""One layer pruned by ALPS and by SparseGPT: seconds, ADMM iterations and the layer objective tr(ΔW H ΔWᵀ) of each.

The weight is random, the inputs random with correlated features (a mixing matrix) and features of unequal size, so
that H is far from diagonal as in a transformer. Shapes: out x in, e.g. SmolLM2's gate projection 1536x576 and down
projection 576x1536, and the LLaMA-7B MLP's 11008x4096 (gate/up).

    .venv/bin/python benchmarks/alps_layer.py --shapes 1536x576,576x1536 --targets 0.7,2:4
    .venv/bin/python benchmarks/alps_layer.py --shapes 11008x4096 --targets 0.7 --tokens 8192
"""

from __future__ import annotations

import time

import click
import torch

from methods import Target, alps, sparsegpt


def problem(rows: int, columns: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and H = (2/n) X Xᵀ of correlated inputs."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) / columns**0.5
    mixing = torch.eye(columns) + torch.randn(columns, columns, generator=generator) / columns**0.5
    sizes = torch.exp(torch.randn(columns, generator=generator))
    hessian = torch.zeros(columns, columns)
    for start in range(0, tokens, 1024):
        inputs = (torch.randn(min(1024, tokens - start), columns, generator=generator) @ mixing) * sizes
        hessian.addmm_(inputs.T, inputs, alpha=2 / tokens)
    return weight, hessian


def objective(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    change = (pruned - weight).double()
    return ((change @ hessian.double()) * change).sum().item()


def target_of(text: str) -> Target:
    return Target.from_options(pattern=text) if ":" in text else Target(float(text))


@click.command()
@click.option("--shapes", default="1536x576,576x1536", show_default=True, help="Comma-separated OUTxIN layer shapes.")
@click.option("--targets", default="0.7,2:4", show_default=True, help="Comma-separated sparsities or N:M patterns.")
@click.option("--tokens", default=4096, show_default=True, help="Calibration tokens behind H.")
@click.option("--iterations", default=alps.DEFAULT_ITERATIONS, show_default=True, help="ALPS's ADMM iteration cap.")
@click.option("--seed", default=0, show_default=True)
def main(shapes: str, targets: str, tokens: int, iterations: int, seed: int) -> None:
    print(f"{torch.get_num_threads()} threads; ALPS at most {iterations} ADMM iterations")
    print("| shape | target | SparseGPT s | ALPS s | ratio | ADMM iterations | objective ALPS / SparseGPT |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes.split(","):
        rows, columns = (int(part) for part in shape.split("x"))
        weight, hessian = problem(rows, columns, tokens, seed)
        for text in targets.split(","):
            target = target_of(text)
            started = time.perf_counter()
            greedy = sparsegpt.prune(weight, hessian, target)
            greedy_seconds = time.perf_counter() - started
            started = time.perf_counter()
            admm = alps.prune(weight, hessian, target, alps_iterations=iterations)
            admm_seconds = time.perf_counter() - started
            ratio = objective(weight, admm.weight, hessian) / objective(weight, greedy.weight, hessian)
            print(f"| {shape} | {text} | {greedy_seconds:.2f} | {admm_seconds:.2f} | {admm_seconds / greedy_seconds:.1f}x | "
                  f"{admm.details['iterations']} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
