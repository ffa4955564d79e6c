"""Which device blocks run on, and waiting for it."""

from __future__ import annotations

import torch

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
