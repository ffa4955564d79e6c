"""Writing a pruned model, its tokenizer and its report to a folder, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prune.models import LoadedModel
from prune.report import Report


class OutputError(ValueError):
    """An output folder that must not or cannot be written."""


def check_output_dir(directory: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder (unless `overwrite`), a file in the way, or a parent that cannot be made."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"--output {directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise OutputError(f"--output {directory} exists and is not empty (pass --overwrite to replace it)")
    parent = directory.resolve().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise OutputError(f"cannot create --output {directory}: {existing} is not a folder")


def write_atomically(directory: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Let `write` fill a temporary sibling folder, then put it in place of `directory` in one rename.

    If anything fails, the temporary folder is removed and `directory` is left as it was.
    """
    check_output_dir(directory, overwrite)
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder the user makes
    try:
        write(staging)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            directory.rename(retired / directory.name)
            staging.rename(directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_pruned(loaded: LoadedModel, report: Report, directory: Path, *, overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> None:
    """Save the model (`save_pretrained`, safetensors), its tokenizer and `report.json` to `directory`."""

    def write(folder: Path) -> None:
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        (folder / "report.json").write_text(report.to_json() + "\n", encoding="utf-8")
        if extra is not None:
            extra(folder)

    write_atomically(directory, write, overwrite)
