"""The optimizer-step cost of Magma and SkipUpdate over plain AdamW, on parameters shaped like SmolLM2-135M's
attention and MLP weights (30 blocks of q, k, v, o, gate, up, down; 106 M weights), pruned 2:4 and pinned at
zero as in the recovery stage, with random gradients.

Prints the median time of one optimizer step for each, and the extra time as a share of AdamW's step and of a
whole training step whose forward+backward takes --step-seconds (measured by benchmarks/smollm2_recover.py).

    .venv/bin/python benchmarks/magma_overhead.py --step-seconds 2.3
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from methods.magma import Magma

SMOLLM2_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def optimizer_step_seconds(mode: str, parameters: list[torch.nn.Parameter], keep_masks: dict, repeats: int) -> float:
    base = torch.optim.AdamW([{"params": [parameter]} for parameter in parameters], lr=1e-4)  # as the recovery stage builds it
    optimizer = Magma(base, mode=mode, p=0.5, seed=0, keep_masks=keep_masks)
    generator = torch.Generator().manual_seed(0)
    timings = []
    for step in range(repeats + 2):  # two warm-up steps create the moments
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
        started = time.perf_counter()
        optimizer.step()
        if step >= 2:
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


@click.command(context_settings={"show_default": True})
@click.option("--blocks", type=int, default=30)
@click.option("--repeats", type=int, default=7)
@click.option("--step-seconds", type=float, default=None, help="Forward+backward seconds of one training step, to express the overhead per step.")
def main(blocks: int, repeats: int, step_seconds: float | None) -> None:
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape) * 0.02) for _ in range(blocks) for shape in SMOLLM2_SHAPES]
    keep_masks = {}
    for parameter in parameters:  # 2:4-pruned, as in the recovery stage, where every mode pins the pruned weights
        keep = torch.zeros(parameter.shape, dtype=torch.bool)
        keep.view(parameter.shape[0], -1, 4)[..., :2] = True
        parameter.data.mul_(keep)
        keep_masks[parameter] = keep
    click.echo(f"{len(parameters)} tensors, {sum(p.numel() for p in parameters) / 1e6:.1f} M weights, {torch.get_num_threads()} threads")
    seconds = {mode: optimizer_step_seconds(mode, parameters, keep_masks, repeats) for mode in ("none", "magma", "skipupdate")}
    for mode, value in seconds.items():
        label = "adamw" if mode == "none" else mode
        line = f"  {label:<10} {value * 1000:8.1f} ms per optimizer step"
        if mode != "none":
            extra = value - seconds["none"]
            line += f"  (+{extra * 1000:.1f} ms = {extra / seconds['none']:+.1%} of AdamW's step"
            if step_seconds is not None:
                line += f", {extra / (step_seconds + seconds['none']):+.1%} of a whole step"
            line += ")"
        click.echo(line)


if __name__ == "__main__":
    main()
