"""Models bigger than memory: a safetensors checkpoint read one block at a time, and a pruned copy written one block
at a time as a normal `save_pretrained` folder (sharded safetensors and their index).

The model itself is a skeleton built on the meta device (accelerate's `init_empty_weights`) with only the weights
outside the transformer blocks (embeddings, final norm, head) in memory. A block's weights are read from the shards
when a stage needs that block and dropped again afterwards; once a block is pruned it is written to its own output
shard and read from there from then on. Each shard is opened, read and closed per block, so that no mapped page of a
shard stays resident.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class StreamingError(OSError):
    """The output could not be written (a full disk, a folder that cannot be written)."""


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or shards with their index): name -> file."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in a model folder, or None when it holds no safetensors weights."""
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            return cls({name: folder / file for name, file in weight_map.items()})
        if (folder / SINGLE).is_file():
            with safe_open(folder / SINGLE, framework="pt") as stored:
                return cls({name: folder / SINGLE for name in stored.keys()})  # noqa: SIM118 (safe_open has no iterator)
        return None

    @staticmethod
    def read_file(path: Path) -> dict[str, Tensor]:
        """Every tensor of one safetensors file, copied into memory."""
        with safe_open(path, framework="pt") as stored:
            return {name: stored.get_tensor(name).clone() for name in stored.keys()}  # noqa: SIM118 (safe_open has no iterator)

    def names(self) -> set[str]:
        return set(self.files)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (of the first one found)."""
        for name, path in self.files.items():
            with safe_open(path, framework="pt") as stored:
                tensor = stored.get_slice(name)
                dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}.get(tensor.get_dtype(), ""), None)
            if dtype is not None:
                return dtype
        return torch.float32

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Copies of the named tensors (floating-point ones cast to `dtype`), each shard opened and closed once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for path, members in by_file.items():
            with safe_open(path, framework="pt") as stored:
                for name in members:
                    tensor = stored.get_tensor(name)
                    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                    tensors[name] = tensor.to(cast, copy=True)  # into the process's own memory: the mapping closes
        return tensors


def materialise(module: nn.Module, tensors: dict[str, Tensor], device: torch.device, prefix: str = "", only: Iterable[str] | None = None) -> None:
    """Give the parameters of `module` (named `prefix` + name in `tensors`; with `only`, just those names) these
    values, on `device`."""
    for name in list(only) if only is not None else [name for name, _ in module.named_parameters()]:
        value = tensors[prefix + name]
        set_module_tensor_to_device(module, name, device, value=value, dtype=value.dtype)  # in the value's dtype, not the skeleton's


def release(module: nn.Module, dtype: torch.dtype) -> None:
    """Drop the weights of `module`: its parameters go back to the meta device, in the dtype the model is stored in."""
    for name, parameter in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta", value=torch.empty(parameter.shape, dtype=dtype, device="meta"), dtype=dtype)


def parameter_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + name for name, _ in module.named_parameters()]


class ShardWriter:
    """A `save_pretrained`-style folder written one shard at a time: one shard per transformer block and one for
    everything else, named model-0000i-of-0000N.safetensors, and their index at the end. Each shard is written to a
    temporary name and renamed, so that a shard present under its name is complete."""

    def __init__(self, folder: Path, shards: int) -> None:
        self.folder = folder
        self.shards = shards

    def shard_name(self, number: int) -> str:
        return f"model-{number + 1:05d}-of-{self.shards:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, Tensor]) -> Path:
        path = self.folder / self.shard_name(number)
        partial = path.with_suffix(".partial")
        with writing(path), removed_on_failure(partial):
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, partial, metadata={"format": "pt"})
            partial.chmod(0o666 & ~current_umask())  # as any file the user writes (safetensors makes it private)
            os.replace(partial, path)
        return path

    def has(self, number: int) -> bool:
        return (self.folder / self.shard_name(number)).is_file()

    def finish(self) -> None:
        """Write the index of every shard's tensors."""
        weight_map, total = {}, 0
        for number in range(self.shards):
            with safe_open(self.folder / self.shard_name(number), framework="pt") as stored:
                for name in stored.keys():  # noqa: SIM118 (safe_open has no iterator)
                    weight_map[name] = self.shard_name(number)
                    piece = stored.get_slice(name)
                    total += _element_size(piece.get_dtype()) * _count(piece.get_shape())
        write_text(self.folder / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _element_size(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 4)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (or another write failure) while writing `path` into one clear StreamingError."""
    try:
        yield
    except StreamingError:
        raise
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise StreamingError(error.errno, f"could not write {path}: {reason}") from None
    except SafetensorError as error:  # safetensors reports its I/O errors in its own type ("... (os error 28)")
        code = int(found.group(1)) if (found := re.search(r"os error (\d+)", str(error))) else None
        reason = "the disk is full" if code == errno.ENOSPC else str(error).splitlines()[0]
        raise StreamingError(code, f"could not write {path}: {reason}") from None


def write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (a temporary name, then a rename)."""
    partial = path.with_name(path.name + ".partial")
    with writing(path), removed_on_failure(partial):
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Remove the half-written file `path` if the enclosed writing fails."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise
