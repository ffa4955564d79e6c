"""Where the one-pass SparseGPT run on SmolLM2-135M spends its time beyond its FLOP bound: the model's own block
forward passes, the Hessian accumulation and the lock-step machinery, each timed alone against the matrix-multiply
work it has to do (the bound `smollm2_methods.py` prints). Nothing is pruned here.

Stages, each over all 30 blocks and the same calibration shape as the benchmark (64 windows of 512 tokens in batches
of 4; random token ids: the dense kernels' time does not depend on the values):
  forward            the blocks' eager forward passes, no hooks (Hugging Face's code as it runs for any user)
  hessians           the half-cost accumulation alone on recorded inputs of the four input groups of a block
  forward + hessians the two-pass statistics pass (hooks feeding the accumulators)
  lock-step          the one-pass statistics pass with pruning left out (greenlets, barriers, accumulators)
  compiled forward   (--compile) the forward under torch.compile: its compile seconds, then a timed pass

    .venv/bin/python benchmarks/forward_floor.py --compile
"""

from __future__ import annotations

import time

import click
import torch
from smollm2_methods import block_work, hessian_work, matmul_rate

from calibration.capture import LayerInputStatistics, capture_block_inputs, input_groups, run_block, run_calls, run_in_lockstep
from methods.base import HESSIAN
from methods.statistics import HessianAccumulator
from prune import load_model
from prune.models import prunable_layers, transformer_blocks


def recorded_inputs(block: torch.nn.Module, calls: list, leaders: dict[str, torch.nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Every call's input to each leader layer of `block` (the dense block's)."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in leaders}
    handles = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs[name].append(args[0])) for name, layer in leaders.items()]
    try:
        for call in calls:
            run_block(block, call)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


@click.command(context_settings={"show_default": True})
@click.option("--nsamples", default=64)
@click.option("--seqlen", default=512)
@click.option("--batch-size", default=4)
@click.option("--compile/--no-compile", "compile_forward", default=False, help="Also time the forward under torch.compile.")
@torch.no_grad()
def main(nsamples: int, seqlen: int, batch_size: int, compile_forward: bool) -> None:
    device = torch.device("cpu")
    model = load_model("smollm2-135m", dtype="float32").model.eval()
    _, blocks = transformer_blocks(model)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(model.config.vocab_size, (batch_size, seqlen), generator=generator)}
               for _ in range(nsamples // batch_size)]
    captured = capture_block_inputs(model, blocks[0], batches, device)
    layers = prunable_layers(blocks[0])
    groups = input_groups(blocks[0], layers, captured[0])
    rate = matmul_rate(device)
    tokens = nsamples * seqlen
    bounds = {
        "forward": len(blocks) * block_work(model, blocks[0], nsamples, seqlen) / rate,
        "hessians": len(blocks) * sum(hessian_work(tokens, layers[leader].in_features) for leader in groups) / rate,
    }
    bounds["forward + hessians"] = bounds["lock-step"] = bounds["forward"] + bounds["hessians"]
    bounds["compiled forward"] = bounds["forward"]
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul rate {rate / 1e9:.1f} GFLOP/s; "
               f"{len(blocks)} blocks, {nsamples} x {seqlen} tokens in batches of {batch_size}; input groups {list(groups)}")

    def over_blocks(step) -> float:
        calls = list(captured)
        started = time.perf_counter()
        for index, block in enumerate(blocks):
            step(index, block, calls)
        return time.perf_counter() - started

    def statistics_pass(index: int, block: torch.nn.Module, calls: list) -> None:
        with LayerInputStatistics(prunable_layers(block), HESSIAN, device) as statistics:
            run_calls(block, calls, statistics, advance=True)
            for leader in statistics.groups():
                statistics.statistics(leader)

    def lock_step(index: int, block: torch.nn.Module, calls: list) -> None:
        block_layers = prunable_layers(block)
        run_in_lockstep(block, calls, {leader: block_layers[leader] for leader in groups},
                        lambda features: HessianAccumulator(features, device), lambda leader, accumulator: accumulator.result())

    inputs = recorded_inputs(blocks[0], captured, {leader: layers[leader] for leader in groups})

    def hessians_only(index: int, block: torch.nn.Module, calls: list) -> None:
        for leader_inputs in inputs.values():
            accumulator = HessianAccumulator(leader_inputs[0].shape[-1], device)
            for features in leader_inputs:
                accumulator.add(features)
            accumulator.result()

    steps = {"forward": lambda index, block, calls: run_calls(block, calls, advance=True), "hessians": hessians_only,
             "forward + hessians": statistics_pass, "lock-step": lock_step}
    measured = {}

    def report(stage: str, seconds: float) -> None:
        measured[stage] = seconds
        click.echo(f"  {stage:<20} {seconds:6.1f} s, bound {bounds[stage]:5.1f} s: {seconds / bounds[stage]:.2f} x")

    for stage, step in steps.items():
        report(stage, over_blocks(step))
    if compile_forward:
        compiled = torch.compile(run_block)
        started = time.perf_counter()
        compiled(blocks[0], captured[0])
        compiled(blocks[1], captured[0])  # a second block: does the compiled graph serve every block?
        click.echo(f"  torch.compile: {time.perf_counter() - started:.1f} s to compile (the first two calls)")

        def compiled_step(index: int, block: torch.nn.Module, calls: list) -> None:
            for position, call in enumerate(calls):
                calls[position] = call.with_hidden_states(compiled(block, call))

        report("compiled forward", over_blocks(compiled_step))
    overhead = measured["lock-step"] - measured["forward + hessians"]
    click.echo(f"  lock-step machinery over the two-pass statistics pass: {overhead:+.1f} s; the statistics pass's floor in eager "
               f"PyTorch (forward + hessians alone): {(measured['forward'] + measured['hessians']) / bounds['lock-step']:.2f} x its bound")


if __name__ == "__main__":
    main()
