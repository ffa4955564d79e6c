"""Several processes, one pruned model: the ranks of a torch.distributed process group (as `torchrun` starts them).

Each rank runs its share of the calibration (and evaluation) windows through the blocks; the statistics are summed
over the ranks before a layer is pruned; each group of layers fed one input is pruned by one rank, in turn, and its
weights broadcast, so that every rank holds the same pruned block before the next one. Outside a process group (a
plain run) every operation here is the identity.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Item = TypeVar("Item")


class RanksLost(Exception):
    """Another rank died, or did not answer within the process group's timeout."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes pruning one model."""

    rank: int = 0
    world: int = 1
    traffic: dict = field(default_factory=dict, compare=False)  # bytes this rank sent through each kind of collective

    @classmethod
    def current(cls) -> Ranks:
        """The initialised default process group's ranks, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def several(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes the output, the report and the figures, and prints."""
        return self.rank == 0

    def share(self, items: list[Item]) -> list[Item]:
        """This rank's share of `items`: every world-th one from its rank on."""
        return items[self.rank :: self.world]

    def owner(self, index: int) -> int:
        """The rank that does the `index`-th piece of work handed out in turn."""
        return index % self.world

    def on_owner(self, owner: int, work: Callable[[], Item], tensors: list[Tensor]) -> Item:
        """Run `work` on the rank `owner` alone; then every rank holds the owner's values of `tensors` (which `work`
        filled in place there) and what `work` returned."""
        made = work() if self.rank == owner else None
        for tensor in tensors if self.several else ():
            self.broadcast_(tensor, owner)
        return self.broadcast_object(made, owner)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
        if self.several:
            self.talk(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
            self.count("summed", tensor)
        return tensor

    def broadcast_(self, tensor: Tensor, source: int) -> Tensor:
        """Give every rank `source`'s values of `tensor`, in place."""
        if self.several:
            self.talk(dist.broadcast, tensor, src=source)
            self.count("broadcast", tensor)
        return tensor

    def broadcast_object(self, value: Any, source: int) -> Any:
        """`source`'s `value` (any picklable object) on every rank."""
        if not self.several:
            return value
        box = [value]
        self.talk(dist.broadcast_object_list, box, src=source)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, by rank, on every rank."""
        if not self.several:
            return [value]
        values: list[Any] = [None] * self.world
        self.talk(dist.all_gather_object, values, value)
        return values

    def count(self, kind: str, tensor: Tensor) -> None:
        self.traffic[f"bytes_{kind}"] = self.traffic.get(f"bytes_{kind}", 0) + tensor.numel() * tensor.element_size()

    def talk(self, collective, *args, **kwargs) -> None:
        """Run a collective operation; a rank that died or timed out (the backends raise RuntimeError) is RanksLost."""
        try:
            collective(*args, **kwargs)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RanksLost(f"rank {self.rank} of {self.world} lost the others: {first[:200]}") from None


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another launcher of its kind) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(timeout_seconds: float, use_cuda: bool) -> Ranks:
    """Join the process group the launcher describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    NCCL with this rank's GPU (LOCAL_RANK) on CUDA, gloo on CPUs. A rank that does not answer within
    `timeout_seconds` makes the others stop with an error instead of waiting for ever."""
    if dist.is_initialized() or not launched_by_torchrun():
        return Ranks.current()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    return Ranks.current()
