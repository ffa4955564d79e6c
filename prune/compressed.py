"""The compressed-tensors checkpoint format (the `compressed-tensors` package, read by transformers and vLLM):
quantized layers stored as packed integers with their scales ("pack-quantized"), the other tensors as they are.

compressed-tensors removed its sparse formats (sparse-bitmask, 2:4) after version 0.14, and transformers 5 needs
0.15 or later: a sparse layer that is not quantized has no compressed form a current loader reads, so it is only
ever stored dense.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from methods.base import PruningError
from methods.quantize import QuantGrid

FORMAT = "pack-quantized"
SCALE = "weight_scale"  # the buffer a quantized layer carries its scales in until they are written, and its name on disk


def check_available() -> None:
    """Refuse a compressed save when the package is missing."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise PruningError("--save-format compressed needs the compressed-tensors package: pip install 'compressed-tensors>=0.15'")


def weight_args(grid: QuantGrid):
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {"strategy": "group", "group_size": grid.group_size} if grid.group_size else {"strategy": "channel"}
    # act-order with static groups is compressed-tensors' actorder "weight": the same layout, no permutation index
    return QuantizationArgs(num_bits=grid.bits, type="int", symmetric=True, actorder="weight" if grid.act_order else None, **strategy)


def compress_layer(weight: Tensor, scale: Tensor, grid: QuantGrid) -> dict[str, Tensor]:
    """One layer's tensors in the packed format: weight_packed (int32), weight_scale and weight_shape. The weight is
    handed over in float32 so that w / s gives back exactly the level it was rebuilt from."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(grid), format=FORMAT)
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    return compressor.compress({"weight": weight.to(torch.float32), SCALE: scale}, scheme)


def compress_tensors(tensors: dict[str, Tensor], grid: QuantGrid) -> dict[str, Tensor]:
    """A state dict with each quantized layer (one that has `<layer>.weight_scale` beside `<layer>.weight`) replaced by
    its packed tensors."""
    compressed = {}
    for name, tensor in tensors.items():
        layer, _, suffix = name.rpartition(".")
        if suffix == SCALE:
            continue
        if suffix == "weight" and f"{layer}.{SCALE}" in tensors:
            packed = compress_layer(tensor, tensors[f"{layer}.{SCALE}"], grid)
            compressed.update({f"{layer}.{key}": value.contiguous() for key, value in packed.items()})
        else:
            compressed[name] = tensor
    return compressed


def layer_scales(model: nn.Module) -> dict[str, Tensor]:
    """`<layer>.weight_scale` of every quantized layer of the model."""
    return {f"{name}.{SCALE}": scale for name, module in model.named_modules() if (scale := kept_scales(module)) is not None}


def kept_scales(layer: nn.Module) -> Tensor | None:
    """The scales a quantized layer carries (None: not quantized)."""
    return layer.get_buffer(SCALE) if SCALE in layer._buffers else None


def keep_scales(layer: nn.Module, scale: Tensor) -> None:
    """Let a quantized layer carry its scales (a buffer outside its state dict) until the output is written."""
    layer.register_buffer(SCALE, scale.detach().to("cpu"), persistent=False)


def quantization_config(model: nn.Module, quantized: set[str], grid: QuantGrid) -> dict:
    """The `quantization_config` of config.json: every Linear quantized but those listed in `ignore` (as
    llm-compressor writes it), stored in the packed format."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    ignore = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weight_args(grid), format=FORMAT)},
                                ignore=ignore, format=FORMAT, quantization_status="compressed")
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            **config.model_dump(exclude={"quant_method"})}


def on_disk(folder: Path) -> int:
    """Bytes of the weights files of a model folder."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def storage_figures(folder: Path, stored: torch.dtype, input_bytes: int | None) -> dict:
    """What the output's weights take on disk: its bytes, against the input's and against the same weights stored
    dense in `stored`; bits per weight overall and of the quantized layers (packed values + scales + shape)."""
    from safetensors import safe_open

    sizes, shapes = {}, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open has no iterator)
                piece = tensors.get_slice(name)
                shape = piece.get_shape()
                sizes[name] = _element_bytes(piece.get_dtype()) * _count(shape)
                if name.endswith(".weight_shape"):
                    shapes[name.removesuffix(".weight_shape")] = [int(value) for value in tensors.get_tensor(name).tolist()]
                else:
                    shapes.setdefault(name, shape)
    element = torch.finfo(stored).bits // 8
    quantized = set(name for name in shapes if f"{name}.weight_packed" in sizes)
    weights = {name: _count(shape) for name, shape in shapes.items() if name not in quantized and not name.endswith((f".{SCALE}", ".weight_packed"))}
    weights.update({name: _count(shapes[name]) for name in quantized})
    total_weights, output_bytes = sum(weights.values()), on_disk(folder)
    quantized_bytes = sum(sizes[f"{name}.{suffix}"] for name in quantized for suffix in ("weight_packed", SCALE, "weight_shape"))
    figures = {"format": "compressed-tensors " + FORMAT if quantized else "dense", "output_bytes": output_bytes,
               "dense_bytes": total_weights * element, "input_bytes": input_bytes,
               "ratio": output_bytes / input_bytes if input_bytes else None,
               "bits_per_weight": 8 * output_bytes / max(total_weights, 1),
               "quantized_bits_per_weight": 8 * quantized_bytes / sum(weights[name] for name in quantized) if quantized else None}
    return figures


def _count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _element_bytes(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 4)


def add_quantization_config(folder: Path, model: nn.Module, grid: QuantGrid) -> None:
    """Write the `quantization_config` of the layers that carry scales into the folder's config.json."""
    import json

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    quantized = {name for name, module in model.named_modules() if SCALE in module._buffers}
    config["quantization_config"] = quantization_config(model, quantized, grid)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)
