"""Which device blocks run on, and waiting for it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free memory of a CUDA device, MemAvailable of a Linux host (None
    where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


GLIBC_MMAP_THRESHOLD = -3  # mallopt's M_MMAP_THRESHOLD


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve every allocation of `threshold` bytes or more by a mapping of its own, which goes back to the
    system when freed. (glibc otherwise raises that threshold each time a large block is freed, and a run that
    allocates and frees a block's worth of tensors per transformer block then keeps ever more freed memory resident:
    its peak would grow with the number of blocks.) For the process that runs the command; False where the C library
    is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(GLIBC_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError, TypeError):
        return False


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype blocks run in: float32 on a CPU (half-precision matrix products there are slow and inexact); on CUDA
    the stored dtype (statistics and sweeps are float32 whatever it is)."""
    return torch.float32 if device.type == "cpu" else stored


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Move `module` to `device` (and cast its floating-point weights to `dtype`) for the enclosed work; afterwards
    put it back where it was, in the dtype it had. A round trip through a wider dtype changes no weight."""
    first = next(module.parameters())
    home, stored = first.device, first.dtype
    module.to(device=device, dtype=dtype)
    try:
        yield module
    finally:
        module.to(device=home, dtype=stored if dtype is not None else None)


@contextlib.contextmanager
def cast_while_running(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """For the enclosed forward passes, each module of `model` that holds weights of its own is moved to `device` and
    cast to `dtype` just before it runs, and put back right after: one module's copy at a time."""
    handles = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        stored = [(parameter.device, parameter.dtype) for parameter in own]

        def before(module: nn.Module, args, own=own) -> None:
            for parameter in own:
                parameter.data = parameter.data.to(device, dtype if parameter.is_floating_point() else None)

        def after(module: nn.Module, args, output, own=own, stored=stored) -> None:
            for parameter, (home, kind) in zip(own, stored, strict=True):
                parameter.data = parameter.data.to(home, kind)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
