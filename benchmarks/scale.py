"""Memory and time of pruning models of growing size, streamed block by block from bfloat16 safetensors shards.

Synthetic Llama models (random weights, built from a config in code and written shard by shard, never whole in
memory) are pruned with SparseGPT 50 % on 8 windows of 128 tokens by the `prune` command, each run in its own
process; the peak resident memory is that process's (getrusage, in report.json). One width at several depths
shows whether memory grows with the model; `--seven-b` adds a LLaMA-7B-shaped model, larger than this machine
could hold in float32.

    python benchmarks/scale.py                      # hidden 2048 / intermediate 5632 at depths 4, 8, 16
    python benchmarks/scale.py --depths "" --seven-b
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from accelerate import init_empty_weights
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calibration.corpora import wiki_sample
from prune.models import default_cache_dir, embedded_model_folder, transformer_blocks
from prune.weights import ShardWriter

RESULTS = Path(__file__).resolve().parent / "results" / "scale"


def llama_tokenizer(vocabulary: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocabulary` tokens (LLaMA's 32,000) trained on the embedded Wikipedia sample."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(wiki_sample().documents, trainers.BpeTrainer(vocab_size=vocabulary, special_tokens=["<s>", "</s>", "<unk>"],
                                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(folder: Path, depth: int, hidden: int, intermediate: int, heads: int, vocabulary: int | None = None, seed: int = 0) -> Path:
    """A Llama with random bfloat16 weights (matrices N(0, 0.02²), norms 1), written one block per shard; SmolLM2's
    tokenizer, or one of `vocabulary` tokens trained for it."""
    if (folder / "config.json").is_file():
        return folder
    if vocabulary is None:
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_folder("smollm2-135m", default_cache_dir()))
    else:
        tokenizer = llama_tokenizer(vocabulary)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    blocks_name, blocks = transformer_blocks(skeleton)
    generator = torch.Generator().manual_seed(seed)

    def random(shape: torch.Size) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    partial = folder.with_name(folder.name + ".building")
    writer = ShardWriter(partial, depth + 1)
    for index, block in enumerate(blocks):
        writer.write(index, {f"{blocks_name}.{index}.{name}": random(parameter.shape) for name, parameter in block.named_parameters()})
    writer.write(depth, {name: random(parameter.shape) for name, parameter in skeleton.named_parameters() if not name.startswith(blocks_name + ".")})
    writer.finish()
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


SCALE_RUN = ("--nsamples", "8", "--seqlen", "128", "--eval-windows", "4", "--eval-seqlen", "128")
SMOLLM2_RUN = ("--nsamples", "32", "--seqlen", "256", "--eval-windows", "32")  # `make demo`'s sizes


def prune_in_a_process(model: Path, output: Path, sizes: tuple[str, ...] = SCALE_RUN, extra: tuple[str, ...] = ()) -> dict:
    """The `prune` command on the model (SparseGPT 50 %; by default 8 x 128 calibration tokens and perplexity on 4 x 128),
    in its own process, streamed to `output`."""
    command = [str(Path(sys.executable).with_name("prune")), "--model", str(model), "--method", "sparsegpt", "--sparsity", "0.5", *sizes, *extra,
               "--output", str(output), "--overwrite", "--quiet"]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise click.ClickException(f"prune failed on {model}: {finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else finished.returncode}")
    report = json.loads((output / "report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - started
    return report


def size_on_disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def measure(name: str, model: Path, work: Path) -> dict:
    output = work / f"{name}-pruned"
    report = prune_in_a_process(model, output)
    depth = int(report["model"]["blocks"].split("(")[1].rstrip(")"))
    row = {
        "model": name, "depth": depth, "bytes_on_disk": size_on_disk(model), "output_bytes": size_on_disk(output),
        "peak_rss_mb": report["peak_memory_mb"], "streamed": report["model"]["streamed"], "dtype": report["model"]["dtype"],
        "sparsity": report["sparsity"], "seconds": report["seconds"], "prune_breakdown": report["prune_breakdown"], "wall_seconds": report["wall_seconds"],
        "perplexity": {key: report["perplexity"][key]["value"] for key in ("dense", "pruned")},
    }
    row["peak_over_model"] = row["peak_rss_mb"] * 2**20 / row["bytes_on_disk"]
    row["seconds_per_block"] = report["seconds"]["prune"] / depth
    click.echo(f"{name:>12}  {depth:>3} blocks  {row['bytes_on_disk'] / 2**30:6.2f} GiB on disk  peak RSS {row['peak_rss_mb'] / 1024:5.2f} GiB "
               f"({row['peak_over_model']:.1%} of the model)  {row['seconds_per_block']:6.1f} s/block  total {report['seconds']['total']:7.1f} s  "
               f"sparsity {row['sparsity']:.2%}")
    return row


def check_loads(output: Path, sparsity: float) -> dict:
    """The pruned output loads with plain from_pretrained in bfloat16 and has the reported sparsity."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    _, blocks = transformer_blocks(model)
    weights = [layer.weight for block in blocks for layer in block.modules() if isinstance(layer, torch.nn.Linear)]
    zeros = sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)
    return {"dtype": str(model.dtype), "sparsity_reloaded": zeros, "matches_report": abs(zeros - sparsity) < 1e-6}


def smollm2_in_bfloat16(work: Path) -> dict:
    """SmolLM2 (float32, de-quantized from its GGUF) and a bfloat16 copy of it saved to a folder, pruned alike."""
    from prune.models import load_model

    folder = work / "smollm2-bf16"
    if not (folder / "config.json").is_file():
        loaded = load_model("smollm2-135m")
        loaded.model.to(torch.bfloat16).save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    runs = {}
    for name, model in (("float32", embedded_model_folder("smollm2-135m", default_cache_dir())), ("bfloat16", folder)):
        report = prune_in_a_process(model, work / f"smollm2-{name}-pruned", SMOLLM2_RUN)
        runs[name] = {"dtype": report["model"]["dtype"], "streamed": report["model"]["streamed"], "output_bytes": size_on_disk(work / f"smollm2-{name}-pruned"),
                      "perplexity": {key: report["perplexity"][key]["value"] for key in ("dense", "pruned")}, "peak_rss_mb": report["peak_memory_mb"]}
    ratio = {key: runs["bfloat16"]["perplexity"][key] / runs["float32"]["perplexity"][key] - 1 for key in ("dense", "pruned")}
    for name, row in runs.items():
        click.echo(f"SmolLM2 {name:>8}: perplexity dense {row['perplexity']['dense']:.3f}, pruned {row['perplexity']['pruned']:.3f}; output "
                   f"{row['output_bytes'] / 2**20:.0f} MiB ({row['dtype']})")
    click.echo(f"bfloat16 against float32: dense {ratio['dense']:+.2%}, pruned {ratio['pruned']:+.2%} (target within 1 %)")
    return {"runs": runs, "relative_difference": ratio}


def seven_b_quantized(work: Path, depth: int) -> dict:
    """The 7B shape at `depth` blocks, streamed: SparseGPT 50 % saved dense and 50 % + int4 g128 (one sweep) saved compressed. A block's
    shard and the shard of everything else are measured, and the 32-block checkpoints' sizes follow from them."""
    model = build_model(work / f"llama-7b-shape-d{depth}", depth, 4096, 11008, 32, vocabulary=32000)
    rows = {}
    for name, extra in (("dense 50 %", ("--save-format", "dense")), ("50 % + int4 g128 compressed", ("--quantize", "int4"))):
        output = work / f"7b-d{depth}-{'int4' if extra[0] == '--quantize' else 'dense'}"
        report = prune_in_a_process(model, output, extra=extra)
        shards = sorted(output.glob("model-*.safetensors"))
        block, rest = sum(path.stat().st_size for path in shards[:-1]) / depth, shards[-1].stat().st_size
        rows[name] = {"block_bytes": block, "rest_bytes": rest, "bytes_32_blocks": 32 * block + rest, "peak_rss_mb": report["peak_memory_mb"],
                      "prune_seconds": report["seconds"]["prune"], "storage": report["storage"]}
    inputs = sorted(model.glob("model-*.safetensors"))
    input_32 = 32 * sum(path.stat().st_size for path in inputs[:-1]) / depth + inputs[-1].stat().st_size
    for name, row in rows.items():
        row["ratio_32_blocks"] = row["bytes_32_blocks"] / input_32
        row["block_ratio"] = row["block_bytes"] / (sum(path.stat().st_size for path in inputs[:-1]) / depth)
        click.echo(f"7B shape {name}: {row['bytes_32_blocks'] / 2**30:.2f} GiB at 32 blocks ({row['ratio_32_blocks']:.3f}x the bfloat16 "
                   f"{input_32 / 2**30:.2f} GiB; a block {row['block_ratio']:.3f}x), peak RSS {row['peak_rss_mb'] / 1024:.2f} GiB at depth {depth}, "
                   f"prune {row['prune_seconds']:.0f} s")
    return {"depth": depth, "input_bytes_32_blocks": input_32, "rows": rows}


@click.command()
@click.option("--depths", default="4,8,16", help="Depths of the hidden-2048 model (empty: none).")
@click.option("--hidden", type=int, default=2048)
@click.option("--intermediate", type=int, default=5632)
@click.option("--heads", type=int, default=16)
@click.option("--seven-b", is_flag=True, help="Also the LLaMA-7B shape: hidden 4096, intermediate 11008, 32 blocks, 32 heads (~13.5 GB).")
@click.option("--smollm2", is_flag=True, help="Also SmolLM2 in float32 against a bfloat16 copy of it (make demo's sizes).")
@click.option("--quantized-depth", type=int, default=0, help="Also the 7B shape at this depth, 50 % dense against 50 % + int4 g128 "
              "compressed: bytes per block shard, extrapolated to 32 blocks (0: not run).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/obs-prune-scale"), help="Where the models and outputs are written.")
def main(depths: str, hidden: int, intermediate: int, heads: int, seven_b: bool, smollm2: bool, quantized_depth: int, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for depth in [int(value) for value in depths.split(",") if value.strip()]:
        model = build_model(work / f"llama-{hidden}-d{depth}", depth, hidden, intermediate, heads)
        rows.append(measure(f"d{depth}", model, work))
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        click.echo(f"peak RSS at depth {rows[-1]['depth']} / depth {rows[0]['depth']}: {ratio:.3f} (target <= 1.15)")
        context = click.get_current_context()
        reduced = any(context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT for name in ("depths", "hidden", "intermediate", "heads"))
        folder = Path(tempfile.mkdtemp(prefix="scale-")) if reduced else RESULTS  # the committed table is the default shapes' only
        (folder / "depths.json").write_text(json.dumps({"rows": rows, "peak_ratio": ratio}, indent=2))
        click.echo(f"written to {folder / 'depths.json'}")
    if smollm2:
        (RESULTS / "smollm2_bfloat16.json").write_text(json.dumps(smollm2_in_bfloat16(work), indent=2))
    if quantized_depth:
        (RESULTS / "seven_b_quantized.json").write_text(json.dumps(seven_b_quantized(work, quantized_depth), indent=2))
    if seven_b:
        model = build_model(work / "llama-7b-shape", 32, 4096, 11008, 32, vocabulary=32000)
        row = measure("7b-shape", model, work)
        row.update(check_loads(work / "7b-shape-pruned", row["sparsity"]))
        click.echo(f"7B shape: peak RSS {row['peak_over_model']:.1%} of the model on disk (target <= 25 %); reloads as {row['dtype']} with "
                   f"sparsity {row['sparsity_reloaded']:.4%} (report {row['sparsity']:.4%})")
        (RESULTS / "seven_b.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
