"""Which device blocks run on, and waiting for it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from methods import PruningError


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PruningError(f"--device {name} was asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PruningError(f"unknown device {name!r}: use auto, cpu or cuda") from None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move `module` to `device` for the enclosed work, and back where it was afterwards."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def timed(totals: dict, key: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the seconds spent inside (until `device` finished its queued work) to totals[key]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if device is not None:
            synchronize(device)
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - started
