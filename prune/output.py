"""Writing a pruned model, its tokenizer and its report to a folder, atomically."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from methods.quantize import QuantGrid
from prune.compressed import SCALE, add_quantization_config, compress_tensors, layer_scales, on_disk, storage_figures
from prune.models import LoadedModel, transformer_blocks
from prune.report import Report, Section
from prune.weights import Checkpoint, ShardWriter, current_umask, parameter_names, writing

STORAGE = "storage"  # the report section of the output: its format, bytes on disk against the input's, bits per weight


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
    try:
        with writing(staging):
            write(staging)
        put_in_place(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def put_in_place(staging: Path, directory: Path) -> None:
    """Rename the finished `staging` folder to `directory`, replacing what was there (in one rename each)."""
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should look like any folder the user makes
    if directory.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        directory.rename(retired / directory.name)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(directory)


def write_figures(report: Report, folder: Path) -> None:
    """The figures each section of the report draws (allocation.png, refine.png, ...)."""
    for section in report.sections.values():
        if section.draw is not None:
            section.draw(section.figures, folder)


def storage_lines(stored: dict) -> list[str]:
    against = f", {stored['ratio']:.3f}x the input's {stored['input_bytes'] / 2**20:.1f} MB" if stored.get("ratio") else ""
    quantized = (f"; quantized layers {stored['quantized_bits_per_weight']:.3f} bits per weight (values + scales)"
                 if stored.get("quantized_bits_per_weight") else "")
    return [f"output ({stored['format']}): {stored['output_bytes'] / 2**20:.1f} MB on disk{against}, "
            f"{stored['bits_per_weight']:.2f} bits per weight overall{quantized}"]


def write_companions(loaded: LoadedModel, report: Report, folder: Path) -> None:
    """Everything of the output but the weights: the tokenizer, report.json and the figures."""
    loaded.tokenizer.save_pretrained(folder)
    (folder / "report.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_figures(report, folder)


def input_bytes(loaded: LoadedModel) -> int | None:
    """Bytes of the safetensors weights the model was loaded from (None when it came from elsewhere)."""
    if loaded.checkpoint is not None:
        return sum(path.stat().st_size for path in set(loaded.checkpoint.files.values()))
    folder = Path(loaded.source)
    return (on_disk(folder) or None) if folder.is_dir() else None


def save_pruned(loaded: LoadedModel, report: Report, directory: Path, *, overwrite: bool = False, grid: QuantGrid | None = None) -> None:
    """Save a model held in memory (`save_pretrained`, safetensors), its tokenizer, `report.json` and the figures;
    with a `grid`, its quantized layers packed in the compressed-tensors format."""

    def write(folder: Path) -> None:
        model = loaded.model
        if grid is None:
            model.save_pretrained(folder)
        else:
            model.save_pretrained(folder, state_dict=compress_tensors({**model.state_dict(), **layer_scales(model)}, grid))
            add_quantization_config(folder, model, grid)
        report.put(STORAGE, Section(storage_figures(folder, loaded.dtype, input_bytes(loaded)), lines=storage_lines))
        write_companions(loaded, report, folder)

    write_atomically(directory, write, overwrite)


def complete_streamed(loaded: LoadedModel, report: Report, writer: ShardWriter, grid: QuantGrid | None = None) -> None:
    """Complete a streamed output in its staging folder: the blocks no stage changed and the weights outside the
    blocks copied from the checkpoint (one block at a time), each pruned block's shard in its final format (with a
    `grid`, its quantized layers packed; else without their scales), the shards' index, the config, tokenizer,
    report and figures."""
    checkpoint, stored = loaded.checkpoint, loaded.dtype
    blocks_name, blocks = transformer_blocks(loaded.model)
    for index, block in enumerate(blocks):
        if not writer.has(index):
            writer.write(index, checkpoint.read(parameter_names(block, f"{blocks_name}.{index}."), stored))
        else:
            finish_shard(writer, index, grid)
    writer.write(len(blocks), checkpoint.read(sorted(name for name in checkpoint.names() if not name.startswith(blocks_name + ".")), stored))
    writer.finish()
    with writing(writer.folder):
        loaded.model.config.save_pretrained(writer.folder)
        if grid is not None:
            add_quantization_config(writer.folder, loaded.model, grid)
        if getattr(loaded.model, "generation_config", None) is not None and loaded.model.can_generate():
            loaded.model.generation_config.save_pretrained(writer.folder)
        report.put(STORAGE, Section(storage_figures(writer.folder, stored, input_bytes(loaded)), lines=storage_lines))
        write_companions(loaded, report, writer.folder)


def finish_shard(writer: ShardWriter, index: int, grid: QuantGrid | None) -> None:
    """A finished block's shard holds its layers' scales beside their weights: pack them (`grid`), or drop them."""
    tensors = Checkpoint.read_file(writer.folder / writer.shard_name(index))
    if not any(name.endswith(f".{SCALE}") for name in tensors):
        return
    writer.write(index, compress_tensors(tensors, grid) if grid is not None else {name: tensor for name, tensor in tensors.items()
                                                                                  if not name.endswith(f".{SCALE}")})
