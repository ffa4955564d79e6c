"""Capturing what a transformer block is called with, running blocks on captured inputs, and hooking layer inputs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from greenlet import greenlet
from torch import Tensor, nn

from methods.statistics import ACCUMULATORS


@dataclass
class BlockCall:
    """Everything one batch passes to a block: the hidden states and every other argument, as captured."""

    hidden_states: Tensor
    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments (attention mask, position ids, position embeddings, ...)
    token_mask: Tensor | None = None  # (batch, seq) bool: positions that are real tokens (None: all)
    hidden_as_keyword: bool = False  # the block received `hidden_states=` rather than a positional argument

    def with_hidden_states(self, hidden_states: Tensor) -> BlockCall:
        return replace(self, hidden_states=hidden_states)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def move_to(value, device: torch.device, dtype: torch.dtype | None = None):
    """`value` with every tensor inside (tuples, lists, dicts) moved to `device`, floating-point ones cast to `dtype`."""
    if isinstance(value, Tensor):
        return value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
    if isinstance(value, tuple):
        return tuple(move_to(item, device, dtype) for item in value)
    if isinstance(value, list):
        return [move_to(item, device, dtype) for item in value]
    if isinstance(value, dict):
        return {key: move_to(item, device, dtype) for key, item in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[dict], device: torch.device,
                         dtype: torch.dtype | None = None) -> list[BlockCall]:
    """Run the model on each batch up to `first_block` and record all it is called with (moved to `device`, its
    floating-point tensors cast to `dtype`: the dtype the blocks will run in).

    A batch is a dict of model inputs (`input_ids`, optionally `attention_mask`); padded positions
    (attention_mask == 0) are excluded from the statistics later through `BlockCall.token_mask`.
    """
    recorded: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        recorded.append((args, dict(kwargs)))
        raise _StopForward

    model_device = next(model.parameters()).device
    calls = []
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        for batch in batches:
            try:
                model(**{key: value.to(model_device) for key, value in batch.items()})
            except _StopForward:
                pass
            args, kwargs = recorded.pop()
            if args:
                hidden, args, as_keyword = args[0], args[1:], False
            else:
                hidden, as_keyword = kwargs.pop("hidden_states"), True
            mask = batch.get("attention_mask")
            calls.append(
                BlockCall(
                    hidden_states=move_to(hidden, device, dtype),
                    args=move_to(args, device, dtype),
                    kwargs=move_to(kwargs, device, dtype),
                    token_mask=None if mask is None or bool(mask.all()) else mask.bool().to(device),
                    hidden_as_keyword=as_keyword,
                )
            )
    finally:
        handle.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return calls


@torch.no_grad()
def run_block(block: nn.Module, call: BlockCall) -> Tensor:
    """The block's output hidden states for one captured call."""
    if call.hidden_as_keyword:
        output = block(*call.args, hidden_states=call.hidden_states, **call.kwargs)
    else:
        output = block(call.hidden_states, *call.args, **call.kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerInputStatistics:
    """Forward hooks that accumulate the inputs of a block's layers into per-layer statistics.

    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator: the grouping is
    found on the first batch, by tensor identity. Use as a context manager around the forward passes,
    calling `begin_batch` before each.
    """

    def __init__(self, layers: dict[str, nn.Module], kind: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.layers = layers
        self.make_accumulator: Callable = lambda features: ACCUMULATORS[kind](features, device, dtype)
        self.leader: dict[str, str] = {}  # layer name -> the name of the layer whose accumulator it shares
        self.accumulators: dict[str, object] = {}
        self._batch_inputs: list[tuple[Tensor, str]] = []
        self._token_mask: Tensor | None = None
        self._grouping = True
        self._handles: list = []
        self._done: set[str] = set()

    def __enter__(self) -> LayerInputStatistics:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def begin_batch(self, token_mask: Tensor | None) -> None:
        if self.leader:
            self._grouping = False
        self._batch_inputs.clear()
        self._token_mask = token_mask

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if self._grouping and name not in self.leader:
                shared = next((leader for seen, leader in self._batch_inputs if seen is inputs), None)
                if shared is not None:
                    self.leader[name] = shared
                    return
                self.leader[name] = name
                self.accumulators[name] = self.make_accumulator(inputs.shape[-1])
                self._batch_inputs.append((inputs, name))
            if self.leader.get(name) == name:
                self.accumulators[name].add(inputs, self._token_mask)

        return hook

    def merge(self, sum_across: Callable[[Tensor], Tensor]) -> None:
        """Combine every accumulator with the same ones of the other processes of a run (in the order the layers were
        first called, which is the same in every process)."""
        for accumulator in self.accumulators.values():
            accumulator.merge(sum_across)

    def statistics(self, name: str) -> Tensor | None:
        """The accumulated statistic for a layer, or None when the layer was never called."""
        leader = self.leader.get(name)
        return None if leader is None else self.accumulators[leader].result()

    def done(self, name: str) -> None:
        """Say that layer `name` no longer needs its statistic; once no layer sharing it does, it is freed."""
        self._done.add(name)
        leader = self.leader.get(name)
        if leader in self.accumulators and all(member in self._done for member, chief in self.leader.items() if chief == leader):
            del self.accumulators[leader]

    def groups(self) -> dict[str, list[str]]:
        """Leader name -> the layers sharing its statistics."""
        shared: dict[str, list[str]] = {}
        for name, leader in self.leader.items():
            shared.setdefault(leader, []).append(name)
        return shared


def run_calls(block: nn.Module, calls: list[BlockCall], statistics: LayerInputStatistics | None = None, *, advance: bool) -> None:
    """Run every captured call through `block`, feeding `statistics` when given.

    With `advance`, each call's hidden states are replaced by the block's output as soon as it is computed, so that
    `calls` becomes the next block's inputs while holding one activation buffer.
    """
    for position, call in enumerate(calls):
        if statistics is not None:
            statistics.begin_batch(call.token_mask)
        output = run_block(block, call)
        if advance:
            calls[position] = call.with_hidden_states(output)


@torch.no_grad()
def input_groups(block: nn.Module, layers: dict[str, nn.Module], call: BlockCall) -> dict[str, list[str]]:
    """Which layers are fed the very same input tensor (q/k/v, gate/up), found by running one call through the
    block: the first layer to see an input -> every layer that sees it, in the order they run."""
    seen: list[tuple[Tensor, str]] = []
    groups: dict[str, list[str]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            leader = next((first for tensor, first in seen if tensor is args[0]), None)
            if leader is None:
                seen.append((args[0], name))
                groups[name] = [name]
            else:
                groups[leader].append(name)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        run_block(block, call)
    finally:
        for handle in handles:
            handle.remove()
    return groups


@torch.no_grad()
def run_in_lockstep(block: nn.Module, calls: list[BlockCall], leaders: dict[str, nn.Module], make_accumulator: Callable,
                    complete: Callable[[str, object], None]) -> None:
    """Run every call through `block` once, all calls advancing together, and make `calls` the block's outputs.

    At the entry of each layer in `leaders`, every call stops until all calls' inputs to it are accumulated (in call
    order, into `make_accumulator(features)`); then `complete(leader, accumulator)` runs (it prunes that layer and the
    layers sharing its input), and the calls carry on through it. So each layer's statistic is collected on the
    inputs it sees once the layers before it in the block are pruned (the 'true sequential' order), and one forward
    pass both feeds the statistics and gives the pruned block's outputs. Each call's forward pass runs in a greenlet
    (a coroutine with its own stack, in this thread): at a layer's entry it hands control back, and the calls are
    resumed one after the other in call order, so only one runs at a time and the result does not depend on any
    scheduling. Memory holds every call's state at the layer where it waits.
    """
    last = len(calls) - 1
    accumulators: dict[str, object] = {}
    scheduler = greenlet.getcurrent()
    running = {"index": 0}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            index = running["index"]
            if index == 0:
                accumulators[name] = make_accumulator(args[0].shape[-1])
            accumulators[name].add(args[0], calls[index].token_mask)
            if index == last:
                complete(name, accumulators.pop(name))
            scheduler.switch()  # wait here until every call reached this layer and it was pruned

        return hook

    def run(index: int) -> None:
        calls[index] = calls[index].with_hidden_states(run_block(block, calls[index]))

    # the barrier runs before any other hook of the layer (e.g. one that casts its weights for the forward pass)
    handles = [layer.register_forward_pre_hook(hook_for(name), prepend=True) for name, layer in leaders.items()]
    runners: dict[int, greenlet] = {}
    try:
        runners = {index: greenlet(functools.partial(run, index)) for index in range(len(calls))}
        while runners:
            for index, runner in runners.items():
                running["index"] = index
                runner.switch()
            runners = {index: runner for index, runner in runners.items() if not runner.dead}
    finally:
        for handle in handles:
            handle.remove()
        # after an error, end the calls still waiting here, inside this function's no_grad: ended later by the garbage
        # collector, they would leave their no_grad (grad mode off) at some random point of the caller's program
        for runner in runners.values():
            if not runner.dead:
                runner.throw()
